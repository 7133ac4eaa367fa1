"""The engine's per-request trace lines (model parameter TRACE_REQUESTS), parsed back.

Each line carries the glue's and vLLM's own monotonic timestamps for one request: arrival in the
glue, when vLLM's scheduler queued and scheduled it, vLLM's first and last tokens (EngineCore's clock: the same
CLOCK_MONOTONIC), when the glue sent the first response, when the request ended, and its token
counts. Benches and tests judge engine-side timing from them: what a
Python client sees on a busy 2-core machine adds its own stalls (seen up to seconds).
"""

from __future__ import annotations

MARK = ": trace rid="


def parse_trace_lines(log_text: str) -> dict[str, dict[str, float]]:
    """rid -> {arrival, queued, scheduled, engine_first_token, engine_last_token, glue_first_token,
    first_sent, finished,
    prompt_tokens, output_tokens, priority} (floats; `reason` dropped)."""
    out: dict[str, dict[str, float]] = {}
    for line in log_text.splitlines():
        if MARK not in line:
            continue
        body = line.split(": trace ", 1)[1].rstrip('"')
        kv = dict(f.split("=", 1) for f in body.split() if "=" in f)
        rid = kv.pop("rid")
        kv.pop("reason", None)
        out[rid] = {k: float(v) for k, v in kv.items()}
    return out


__all__ = ["parse_trace_lines"]
