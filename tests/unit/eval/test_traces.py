"""Trace files: both formats, auto-detection, and errors that name file, line and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlm_backend.eval.traces import DEFAULT_TRACE, TraceError, load_trace, window


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_azure_format_gives_relative_arrivals(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n",
    )
    tr = load_trace(p)
    assert tr.format == "azure"
    assert [r.input_tokens for r in tr.records] == [374, 396]
    assert tr.records[0].arrival_s == 0.0
    assert tr.records[1].arrival_s == pytest.approx(4.314579, abs=1e-6)


def test_generic_csv_with_optional_columns_in_any_order(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "model,arrival_s,output_tokens,input_tokens,slo_class\n"
        "mistral-7b,1.5,10,100,interactive\n"
        ",0.5,20,200,\n",
    )
    tr = load_trace(p, "auto")
    assert tr.format == "csv"
    first, second = tr.records  # sorted by arrival
    assert (first.arrival_s, first.input_tokens, first.model, first.slo_class) == (
        0.5,
        200,
        None,
        None,
    )
    assert (second.model, second.slo_class, second.output_tokens) == (
        "mistral-7b",
        "interactive",
        10,
    )


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("arrival_s,input_tokens,output_tokens\n0,10,5\n1,abc,5\n", 3, "input_tokens"),
        ("arrival_s,input_tokens,output_tokens\n0,10,0\n", 2, "output_tokens"),
        ("arrival_s,input_tokens,output_tokens\n-1,10,5\n", 2, "arrival_s"),
        ("arrival_s,input_tokens,output_tokens\nsoon,10,5\n", 2, "arrival_s"),
        ("arrival_s,input_tokens,output_tokens\n0,10\n", 2, None),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,1,1\nyesterday,1,1\n",
            3,
            "TIMESTAMP",
        ),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,1,x\n",
            2,
            "GeneratedTokens",
        ),
        ("arrival_s,input_tokens,output_tokens,colour\n0,1,1,red\n", 1, "colour"),
    ],
)
def test_malformed_rows_name_line_and_column(
    tmp_path: Path, text: str, line: int, column: str | None
) -> None:
    p = write(tmp_path, text)
    with pytest.raises(TraceError) as ei:
        load_trace(p)
    e = ei.value
    assert (e.line, e.column) == (line, column)
    assert str(p) in str(e) and f"line {line}" in str(e)
    if column:
        assert repr(column) in str(e)


def test_unknown_header_and_forced_format_mismatch(tmp_path: Path) -> None:
    p = write(tmp_path, "a,b,c\n1,2,3\n")
    with pytest.raises(TraceError, match="unrecognised header"):
        load_trace(p)
    q = write(tmp_path, "arrival_s,input_tokens,output_tokens\n0,1,1\n", "q.csv")
    with pytest.raises(TraceError, match="missing column") as ei:
        load_trace(q, "azure")
    assert ei.value.column == "TIMESTAMP"


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        load_trace(tmp_path / "nope.csv")
    with pytest.raises(TraceError, match="empty"):
        load_trace(write(tmp_path, ""))
    with pytest.raises(TraceError, match="no requests"):
        load_trace(write(tmp_path, "arrival_s,input_tokens,output_tokens\n", "h.csv"))


def test_shipped_trace_loads_and_windows() -> None:
    tr = load_trace(DEFAULT_TRACE)
    assert len(tr.records) == 19366 and tr.format == "azure"
    w = window(tr, max_requests=100, duration_s=None)
    assert len(w.records) == 100 and w.records[0].arrival_s == 0.0
    w2 = window(tr, max_requests=None, duration_s=60.0)
    assert all(r.arrival_s <= 60.0 for r in w2.records)
