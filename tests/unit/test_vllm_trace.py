"""The vLLM engine's log lines, parsed back (qlm_backend/vllm_engine/trace.py): its per-request
trace and its load / unload lifecycle, as Triton's log writes them."""

from __future__ import annotations

import pytest

from qlm_backend.vllm_engine.trace import (
    lifecycle_line,
    parse_lifecycle_lines,
    parse_trace_lines,
    parse_trace_text,
)


def _triton(msg: str) -> str:
    """A Python-backend log line as tritonserver 2.51 writes it."""
    return f'I1202 12:00:00.000000 4242 pb_stub.cc:384] "{msg}"'


def test_lifecycle_lines_round_trip_among_other_lines() -> None:
    log = "\n".join(
        [
            _triton(lifecycle_line("tiny-llama__cpu-0", "unload", 100.0, 103.25)),
            _triton("tiny-llama__cpu-0: vLLM engine stopped"),
            _triton(
                "tiny-llama-deep__cpu-0: trace rid=tiny-llama-deep__cpu-0-ab priority=2 "
                "arrival=1.0 finished=2.0 output_tokens=8 cached_tokens=0 exact_resume=1 "
                "reason=length triton_id=q7.2"
            ),
            _triton(lifecycle_line("tiny-llama-deep__cpu-0", "load", 103.5, 131.0)),
        ]
    )
    assert parse_lifecycle_lines(log) == [
        {
            "model": "tiny-llama__cpu-0",
            "event": "unload",
            "start": 100.0,
            "end": 103.25,
            "seconds": 3.25,
        },
        {
            "model": "tiny-llama-deep__cpu-0",
            "event": "load",
            "start": 103.5,
            "end": 131.0,
            "seconds": 27.5,
        },
    ]
    # The request trace ignores lifecycle lines and keeps the engine name in the request id.
    (rid,) = parse_trace_lines(log)
    assert rid.startswith("tiny-llama-deep__cpu-0-")
    assert parse_trace_lines(log)[rid] == {
        "priority": 2.0,
        "arrival": 1.0,
        "finished": 2.0,
        "output_tokens": 8.0,
        "cached_tokens": 0.0,
        "exact_resume": 1.0,
    }
    # The text fields: why it ended, and the client's request id (the router's stream id).
    assert parse_trace_text(log) == {rid: {"reason": "length", "triton_id": "q7.2"}}


def test_lifecycle_event_is_checked() -> None:
    with pytest.raises(ValueError, match="lifecycle event"):
        lifecycle_line("m", "nap", 0.0, 1.0)
