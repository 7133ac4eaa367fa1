"""Trace files: the Azure LLM inference 2023 format and a generic CSV, detected from the header.

Formats (one request per row, header first):

- azure: ``TIMESTAMP,ContextTokens,GeneratedTokens`` with timestamps such as
  ``2023-11-16 18:15:46.6805900``; arrival times become seconds since the first row.
- csv: ``arrival_s,input_tokens,output_tokens`` and optionally ``model`` and ``slo_class``
  (empty cells mean "let the scenario assign one"); columns may come in any order.

A malformed row raises `TraceError` naming the file, the 1-based line number (the header is line 1)
and the column, so a user can fix a hand-made trace without reading this code.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

TraceFormat = Literal["auto", "azure", "csv"]
TRACE_FORMATS: tuple[TraceFormat, ...] = ("auto", "azure", "csv")

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
CSV_REQUIRED = ("arrival_s", "input_tokens", "output_tokens")
CSV_OPTIONAL = ("model", "slo_class")

# The trace shipped inside the package (see data/traces/ATTRIBUTION.md).
TRACES_DIR = Path(__file__).resolve().parent.parent / "data" / "traces"
DEFAULT_TRACE = TRACES_DIR / "AzureLLMInferenceTrace_conv.csv"


class TraceError(ValueError):
    """A trace file could not be read; `line` and `column` locate the problem when known."""

    def __init__(self, path: str | Path, line: int | None, column: str | None, msg: str) -> None:
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {msg}")
        self.path = str(path)
        self.line = line
        self.column = column


@dataclass(frozen=True)
class TraceRecord:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    model: str | None = None
    slo_class: str | None = None


@dataclass(frozen=True)
class Trace:
    path: str
    format: Literal["azure", "csv"]
    records: tuple[TraceRecord, ...]

    @property
    def duration_s(self) -> float:
        return self.records[-1].arrival_s - self.records[0].arrival_s if self.records else 0.0


def detect_format(header: Sequence[str]) -> Literal["azure", "csv"] | None:
    cols = {c.strip() for c in header}
    if set(AZURE_COLUMNS) <= cols:
        return "azure"
    if set(CSV_REQUIRED) <= cols:
        return "csv"
    return None


def _parse_timestamp(text: str) -> float:
    # Azure writes 7 fractional digits, which datetime.strptime's %f (max 6) rejects: split them off.
    base, _, frac = text.strip().partition(".")
    dt = datetime.strptime(base, "%Y-%m-%d %H:%M:%S")
    return dt.timestamp() + (float("0." + frac) if frac else 0.0)


def _int_cell(path: Path, line: int, col: str, text: str, minimum: int) -> int:
    try:
        v = int(text.strip())
    except ValueError:
        raise TraceError(path, line, col, f"expected an integer, got {text!r}") from None
    if v < minimum:
        raise TraceError(path, line, col, f"expected an integer >= {minimum}, got {v}")
    return v


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    with path.open(newline="") as f:
        for k, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue  # blank lines carry nothing
            yield k, row


def load_trace(path: str | Path, fmt: TraceFormat = "auto") -> Trace:
    """Read a whole trace, sorted by arrival (stable, so ties keep file order)."""
    p = Path(path)
    if fmt not in TRACE_FORMATS:
        raise ValueError(f"trace format must be one of {TRACE_FORMATS}, got {fmt!r}")
    if not p.is_file():
        raise TraceError(p, None, None, "no such file")
    rows = _rows(p)
    try:
        header_line, header = next(rows)
    except StopIteration:
        raise TraceError(p, None, None, "empty file (expected a header line)") from None
    header = [h.strip() for h in header]
    detected = detect_format(header)
    if fmt == "auto":
        if detected is None:
            raise TraceError(
                p,
                header_line,
                None,
                f"unrecognised header {header}; expected {','.join(AZURE_COLUMNS)} (azure) or "
                f"{','.join(CSV_REQUIRED)}[,{','.join(CSV_OPTIONAL)}] (csv)",
            )
        fmt = detected
    need = AZURE_COLUMNS if fmt == "azure" else CSV_REQUIRED
    missing = [c for c in need if c not in header]
    if missing:
        raise TraceError(p, header_line, missing[0], f"missing column in header {header}")
    if fmt == "csv":
        unknown = [c for c in header if c not in CSV_REQUIRED + CSV_OPTIONAL]
        if unknown:
            raise TraceError(
                p,
                header_line,
                unknown[0],
                f"unknown column; known: {', '.join(CSV_REQUIRED + CSV_OPTIONAL)}",
            )
    idx = {c: header.index(c) for c in header}
    out: list[TraceRecord] = []
    t0: float | None = None
    for line, row in rows:
        if len(row) != len(header):
            raise TraceError(
                p,
                line,
                None,
                f"expected {len(header)} columns ({','.join(header)}), got {len(row)}",
            )
        if fmt == "azure":
            ts_text = row[idx["TIMESTAMP"]]
            try:
                ts = _parse_timestamp(ts_text)
            except ValueError:
                raise TraceError(
                    p,
                    line,
                    "TIMESTAMP",
                    f"expected a time like 2023-11-16 18:15:46.6805900, got {ts_text!r}",
                ) from None
            t0 = ts if t0 is None else t0
            arrival = ts - t0
            inp = _int_cell(p, line, "ContextTokens", row[idx["ContextTokens"]], 1)
            outp = _int_cell(p, line, "GeneratedTokens", row[idx["GeneratedTokens"]], 1)
            out.append(TraceRecord(arrival, inp, outp))
        else:
            a_text = row[idx["arrival_s"]]
            try:
                arrival = float(a_text)
            except ValueError:
                raise TraceError(
                    p, line, "arrival_s", f"expected seconds (a number), got {a_text!r}"
                ) from None
            if not arrival >= 0.0 or arrival == float("inf"):
                raise TraceError(
                    p, line, "arrival_s", f"expected a finite number >= 0, got {a_text!r}"
                )
            inp = _int_cell(p, line, "input_tokens", row[idx["input_tokens"]], 1)
            outp = _int_cell(p, line, "output_tokens", row[idx["output_tokens"]], 1)
            model = row[idx["model"]].strip() or None if "model" in idx else None
            cls = row[idx["slo_class"]].strip() or None if "slo_class" in idx else None
            out.append(TraceRecord(arrival, inp, outp, model, cls))
    if not out:
        raise TraceError(p, None, None, "no requests after the header")
    if fmt == "azure":
        # Timestamps may be slightly out of order; relative times are from the earliest request.
        first = min(r.arrival_s for r in out)
        out = [TraceRecord(r.arrival_s - first, r.input_tokens, r.output_tokens) for r in out]
    out.sort(key=lambda r: r.arrival_s)
    return Trace(str(p), fmt, tuple(out))


def window(trace: Trace, *, max_requests: int | None, duration_s: float | None) -> Trace:
    """The first `max_requests` requests arriving within the first `duration_s` seconds."""
    recs = trace.records
    if duration_s is not None:
        t0 = recs[0].arrival_s
        recs = tuple(r for r in recs if r.arrival_s - t0 <= duration_s)
    if max_requests is not None:
        recs = recs[:max_requests]
    if not recs:
        raise ValueError(f"{trace.path}: the trace window holds no request")
    t0 = recs[0].arrival_s
    shifted = tuple(
        TraceRecord(r.arrival_s - t0, r.input_tokens, r.output_tokens, r.model, r.slo_class)
        for r in recs
    )
    return Trace(trace.path, trace.format, shifted)


__all__ = [
    "DEFAULT_TRACE",
    "TRACE_FORMATS",
    "Trace",
    "TraceError",
    "TraceFormat",
    "TraceRecord",
    "detect_format",
    "load_trace",
    "window",
]
