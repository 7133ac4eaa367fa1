"""One request's responses, step by step, as Triton's vllm_backend sends them.

Our two engines and the router each learn what a request produced in their own way (a simulated
token list, vLLM's delta outputs, an engine's responses relayed), but what the client receives must
be the same in all three and the same as vllm_backend's: a streaming request gets one response per
engine step carrying what is new since the previous one; a non-streaming request gets one final
response carrying everything, the prompt first unless `exclude_input_in_output`. `Responder` holds
that rule; the table of every output per mode is in docs/request-contract.md ("Conformance with
vllm_backend"), and tests/unit/test_conformance_matrix.py checks it case by case.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from qlm_backend.contract.encode import output_arrays
from qlm_backend.contract.generate import GenerateParams


def join_logprobs(parts: Iterable[str | None]) -> str | None:
    """The per-token logprobs of several responses as one JSON list, in order; None when none of
    them had any (vLLM computed none: the request asked for no `logprobs`).

    Spliced as text, not parsed and re-encoded: a long non-streamed request has one part per step,
    and re-encoding the growing list at each would cost quadratic time."""
    items: list[str] = []
    seen = False
    for part in parts:
        if part is None:
            continue
        seen = True
        body = part.strip()
        if not (body.startswith("[") and body.endswith("]")):
            raise ValueError(f"logprobs: expected a JSON list, got {part[:40]!r}")
        inner = body[1:-1].strip()
        if inner:
            items.append(inner)
    return f"[{', '.join(items)}]" if seen else None


def logprobs_text(arr: np.ndarray | None) -> str | None:
    """An engine's `logprobs` output as received: its JSON text, None for vllm_backend's "null"."""
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    text = b"".join(bytes(v) for v in flat).decode("utf-8")
    return None if text == "null" else text


def vllm_logprobs_json(per_token: Iterable[Mapping[int, Any]]) -> str:
    """vLLM's sample logprobs (per token: token id -> Logprob) in vllm_backend's JSON: per token an
    object keyed by the token id (a string, as json.dumps writes int keys) whose values are
    {logprob, rank, decoded_token}. vLLM puts the sampled token first, then the top k."""
    return json.dumps(
        [
            {
                str(tid): {
                    "logprob": lp.logprob,
                    "rank": lp.rank,
                    "decoded_token": lp.decoded_token,
                }
                for tid, lp in token.items()
            }
            for token in per_token
        ]
    )


class Responder:
    """The responses of one request: `step()` takes what the engine produced since the last step
    and returns the output tensors to send now, or None (a non-streaming request before its end)."""

    def __init__(self, params: GenerateParams) -> None:
        self.params = params
        self._texts: list[str] = []
        self._tokens = 0
        self._logprobs: list[str | None] = []

    def step(
        self,
        text: str,
        num_tokens: int,
        *,
        final: bool,
        finish_reason: str | None = None,
        logprobs: str | None = None,
        cumulative_logprob: float | None = None,
        num_input_tokens: int = 0,
        num_cached_tokens: int = 0,
    ) -> dict[str, np.ndarray] | None:
        """`text`, `num_tokens`, `logprobs` (a JSON list, one entry per token; None when vLLM
        computed none): this step's new tokens. `cumulative_logprob`: the whole output's so far
        (None when computed none: sent as NaN, as vllm_backend's float32 array of None is)."""
        p = self.params
        if not p.stream:
            # vllm_backend answers from the last engine output with a fresh state: all of it.
            self._texts.append(text)
            self._tokens += num_tokens
            self._logprobs.append(logprobs)
            if not final:
                return None
            text, num_tokens = "".join(self._texts), self._tokens
            logprobs = join_logprobs(self._logprobs)
            if p.prepend_input:
                text = p.prompt + text
        # Streaming never prepends the prompt: vllm_backend refuses stream with
        # exclude_input_in_output=false (parse_generate does too).
        return output_arrays(
            p.returns,
            text,
            finish_reason,
            math.nan if cumulative_logprob is None else float(cumulative_logprob),
            logprobs,
            num_input_tokens,
            num_tokens,
            num_cached_tokens,
        )
