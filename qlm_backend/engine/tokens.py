"""Synthetic tokens for the simulated engine: prompt token counting and meaningless output words.

Prompt tokens are counted by one documented approximation: one token per 4 UTF-8 bytes, rounded up
(the common rule of thumb for BPE tokenizers on English text), at least one. Output tokens are words
from a fixed list followed by a space, drawn from a generator seeded by the request, so a replay of
the same request yields the same text and the same synthetic log-probabilities.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass

BYTES_PER_TOKEN = 4

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "it",
    "be",
    "are",
    "or",
    "an",
    "which",
    "have",
    "not",
    "queue",
    "model",
    "token",
    "serve",
    "batch",
    "request",
    "deadline",
    "engine",
    "cache",
    "block",
    "plan",
    "group",
    "instance",
    "swap",
    "warm",
    "cold",
    "load",
    "time",
    "first",
    "output",
    "input",
    "prompt",
    "stream",
    "class",
    "slo",
    "order",
    "wait",
    "pull",
    "evict",
]


def count_prompt_tokens(text: str) -> int:
    return max(1, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN))


def request_seed(prompt: str, seed: int | None) -> int:
    h = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") ^ (seed if seed is not None else 0)


@dataclass(frozen=True)
class SynthToken:
    token_id: int
    text: str
    logprob: float


class TokenStream:
    """Deterministic synthetic tokens for one request."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def next(self) -> SynthToken:
        tid = self._rng.randrange(len(_WORDS))
        # Log-probabilities of a confident sampler: mostly near 0, sometimes a few nats below.
        lp = -self._rng.expovariate(2.0)
        return SynthToken(tid, _WORDS[tid] + " ", lp)


def draw_output_length(seed: int, mean_tokens: float, max_tokens: int) -> int:
    """Output length before EOS: geometric around the mean (heavy short tail, as chat traces show)."""
    rng = random.Random(seed ^ 0x5EED)
    p = 1.0 / max(1.0, mean_tokens)
    n = 1
    # Inverse-CDF sample of a geometric distribution on {1, 2, ...}.
    u = rng.random()
    if p < 1.0:
        n = 1 + int(math.log(1.0 - u) / math.log(1.0 - p))
    return max(1, min(n, max_tokens))


def logprobs_json(tokens: list[SynthToken], top_k: int = 0) -> str:
    """vLLM's per-token logprob dicts as Triton's vllm_backend serialises them: the sampled token
    first, then the top `top_k` (the sampling parameters' `logprobs`). A synthetic token is always
    the most likely one (rank 1), so a token has max(1, top_k) entries, as vLLM gives when the
    sampled token is among the top k."""
    return json.dumps([_token_logprobs(t, top_k) for t in tokens])


def _token_logprobs(t: SynthToken, top_k: int) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {
        str(t.token_id): {"logprob": t.logprob, "rank": 1, "decoded_token": t.text}
    }
    # The runners-up share what the sampled token leaves, each half the one before and all below
    # it, so the ranks and a total probability <= 1 stay consistent. No draw from the token
    # stream: asking for logprobs must not change the text.
    p = math.exp(t.logprob)
    share = max(min(p, 1.0 - p), 1e-12)
    for rank in range(2, top_k + 1):
        tid = (t.token_id + rank - 1) % len(_WORDS)
        out[str(tid)] = {
            "logprob": math.log(share * 0.5 ** (rank - 1)),
            "rank": rank,
            "decoded_token": _WORDS[tid] + " ",
        }
    return out
