"""vLLM's sampling parameters, validated before they reach an engine.

They come as the `sampling_parameters` JSON tensor or, as vllm_backend also allows, as request
parameters. Unknown keys and out-of-range values are the client's error, named by their key,
rather than something vLLM would reject (or silently default) deep inside the engine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qlm_backend.contract.values import ContractError, decode_text, scalar

# vLLM SamplingParams fields (0.6 .. 0.11) plus Triton's lora_name. Unknown keys are an error, as in
# vllm_backend, so a typo never silently falls back to a default.
SAMPLING_KEYS = frozenset(
    [
        "n",
        "best_of",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "bad_words",
        "include_stop_str_in_output",
        "ignore_eos",
        "max_tokens",
        "min_tokens",
        "logprobs",
        "prompt_logprobs",
        "detokenize",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "truncate_prompt_tokens",
        "logit_bias",
        "allowed_token_ids",
        "guided_decoding",
        "structured_outputs",
        "lora_name",
    ]
)
# Request parameters Triton's frontends may set themselves; never sampling keys.
RESERVED_PARAMETERS = frozenset(
    {"priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "headers"}
)
DEFAULT_MAX_TOKENS = 16  # vLLM's SamplingParams default


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = DEFAULT_MAX_TOKENS
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    stop: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)  # validated keys passed through to vLLM

    @property
    def output_fixed(self) -> bool:
        """The engine will produce exactly max_tokens tokens: EOS ignored (or not allowed before
        max_tokens) and nothing else that stops it early."""
        no_eos = self.ignore_eos or self.min_tokens >= self.max_tokens
        return no_eos and not self.stop and not self.extra.get("stop_token_ids")

    def as_vllm_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            ignore_eos=self.ignore_eos,
        )
        if self.seed is not None:
            d["seed"] = self.seed
        if self.logprobs is not None:
            d["logprobs"] = self.logprobs
        if self.stop:
            d["stop"] = list(self.stop)
        return d


def _int(d: Mapping[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    if key not in d or d[key] is None:
        return None
    v = d[key]
    if isinstance(v, str):  # request parameters over HTTP arrive as strings sometimes
        try:
            v = int(v)
        except ValueError:
            raise ContractError(key, f"must be an integer, got {d[key]!r}") from None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ContractError(key, f"must be an integer, got {d[key]!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ContractError(key, f"must be {rng}, got {v}")
    return v


def _float(
    d: Mapping[str, Any], key: str, lo: float, hi: float, lo_open: bool = False
) -> float | None:
    if key not in d or d[key] is None:
        return None
    v = d[key]
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise ContractError(key, f"must be a number, got {d[key]!r}") from None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ContractError(key, f"must be a finite number, got {d[key]!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise ContractError(key, f"must be in {left}{lo}, {hi}], got {v}")
    return float(v)


def _bool(d: Mapping[str, Any], key: str) -> bool | None:
    if key not in d or d[key] is None:
        return None
    v = d[key]
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise ContractError(key, f"must be a boolean, got {v!r}")


def parse_sampling(raw: Mapping[str, Any], max_context_tokens: int | None = None) -> Sampling:
    unknown = sorted(set(raw) - SAMPLING_KEYS)
    if unknown:
        raise ContractError(unknown[0], "unknown sampling parameter")
    n = _int(raw, "n", 1)
    if n is not None and n != 1:
        # vllm_backend would answer n outputs per tensor; the router serves one sequence per
        # request (its plan, resume and accounting are per sequence), and so do our engines.
        raise ContractError("n", f"only n=1 is supported (one output sequence), got {n}")
    hi = max_context_tokens
    max_tokens = _int(raw, "max_tokens", 1, hi)
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    min_tokens = _int(raw, "min_tokens", 0) or 0
    if min_tokens > max_tokens:
        raise ContractError("min_tokens", f"must be <= max_tokens ({max_tokens}), got {min_tokens}")
    temperature = _float(raw, "temperature", 0.0, 100.0)
    top_p = _float(raw, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _int(raw, "top_k", -1)
    if top_k == 0:
        raise ContractError("top_k", "must be -1 (disabled) or >= 1, got 0")
    for key in ("presence_penalty", "frequency_penalty"):
        _float(raw, key, -2.0, 2.0)
    _float(raw, "repetition_penalty", 0.0, 100.0, lo_open=True)
    _float(raw, "min_p", 0.0, 1.0)
    seed = _int(raw, "seed", -(2**63), 2**63 - 1)
    logprobs = _int(raw, "logprobs", 0, 20)
    ignore_eos = _bool(raw, "ignore_eos")
    for key in ("include_stop_str_in_output", "detokenize", "skip_special_tokens"):
        _bool(raw, key)
    stop_raw = raw.get("stop")
    stop: tuple[str, ...] = ()
    if isinstance(stop_raw, str):
        stop = (stop_raw,)
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        stop = tuple(stop_raw)
    elif stop_raw is not None:
        raise ContractError("stop", f"must be a string or a list of strings, got {stop_raw!r}")
    handled = {
        "max_tokens",
        "min_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "ignore_eos",
        "logprobs",
        "stop",
    }
    return Sampling(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=-1 if top_k is None else top_k,
        seed=seed,
        ignore_eos=bool(ignore_eos),
        logprobs=logprobs,
        stop=stop,
        extra={k: v for k, v in raw.items() if k not in handled},
    )


def sampling_source(
    sampling_tensor: np.ndarray | None,
    parameters_json: str | None,
    ignore: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The sampling dict: the JSON tensor if present, else the request parameters (as vllm_backend)."""
    if sampling_tensor is not None:
        text = decode_text(scalar(sampling_tensor, "sampling_parameters"), "sampling_parameters")
        try:
            raw = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            raise ContractError(
                "sampling_parameters", f"is not valid JSON ({e.msg} at char {e.pos})"
            ) from None
        if not isinstance(raw, dict):
            raise ContractError(
                "sampling_parameters", f"must be a JSON object, got {type(raw).__name__}"
            )
        return raw
    if not parameters_json:
        return {}
    params = json.loads(parameters_json)
    return {k: v for k, v in params.items() if k not in RESERVED_PARAMETERS and k not in ignore}
