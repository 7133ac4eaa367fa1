"""The engine's per-request trace lines (model parameter TRACE_REQUESTS), parsed back.

Each line carries the glue's and vLLM's own monotonic timestamps for one request: arrival in the
glue, when vLLM's scheduler queued and scheduled it, vLLM's first and last tokens (EngineCore's clock: the same
CLOCK_MONOTONIC), when the glue sent the first response, when the request ended, and its token
counts. Benches and tests judge engine-side timing from them: what a
Python client sees on a busy 2-core machine adds its own stalls (seen up to seconds).

Beside them, whatever TRACE_REQUESTS says, one line per load, unload, sleep and wake of the engine
model (its lifecycle: initialize() from its start to the engine ready, finalize() from the unload
request to the engine processes stopped, a sleep or wake control request from its start to its
reply), so that a swap shows in the engine's own log with its times.
"""

from __future__ import annotations

MARK = ": trace rid="
LIFECYCLE_MARK = ": lifecycle event="
LIFECYCLE_EVENTS = ("load", "unload", "sleep", "wake")


def lifecycle_line(model: str, event: str, start: float, end: float) -> str:
    """The log line of one lifecycle event of engine model `model` (monotonic seconds)."""
    if event not in LIFECYCLE_EVENTS:
        raise ValueError(f"lifecycle event must be one of {LIFECYCLE_EVENTS}, got {event!r}")
    return (
        f"{model}: lifecycle event={event} start={start:.4f} end={end:.4f} "
        f"seconds={end - start:.3f}"
    )


def parse_lifecycle_lines(log_text: str) -> list[dict[str, str | float]]:
    """Every lifecycle line, in log order: {model, event, start, end, seconds}."""
    out: list[dict[str, str | float]] = []
    for line in log_text.splitlines():
        if LIFECYCLE_MARK not in line:
            continue
        head, body = line.split(": lifecycle ", 1)
        model = head.rsplit(" ", 1)[-1].lstrip('"')
        kv = dict(f.split("=", 1) for f in body.rstrip('"').split() if "=" in f)
        out.append(
            {
                "model": model,
                "event": kv["event"],
                **{k: float(kv[k]) for k in ("start", "end", "seconds")},
            }
        )
    return out


TEXT_FIELDS = ("reason", "triton_id")


def _trace_fields(log_text: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for line in log_text.splitlines():
        if MARK not in line:
            continue
        body = line.split(": trace ", 1)[1].rstrip('"')
        kv = dict(f.split("=", 1) for f in body.split() if "=" in f)
        out[kv.pop("rid")] = kv
    return out


def parse_trace_lines(log_text: str) -> dict[str, dict[str, float]]:
    """rid -> {arrival, queued, scheduled, engine_first_token, engine_last_token, glue_first_token,
    first_sent, finished, prompt_tokens, output_tokens, cached_tokens, exact_resume, priority}
    (floats; the text fields are in parse_trace_text)."""
    return {
        rid: {k: float(v) for k, v in kv.items() if k not in TEXT_FIELDS}
        for rid, kv in _trace_fields(log_text).items()
    }


def parse_trace_text(log_text: str) -> dict[str, dict[str, str]]:
    """rid -> {reason (why it ended: stop, length, abort, error), triton_id (the client's
    request id; the router's stream id `<rid>.<gen>`)}."""
    return {
        rid: {k: kv.get(k, "") for k in TEXT_FIELDS} for rid, kv in _trace_fields(log_text).items()
    }


__all__ = ["lifecycle_line", "parse_lifecycle_lines", "parse_trace_lines", "parse_trace_text"]
