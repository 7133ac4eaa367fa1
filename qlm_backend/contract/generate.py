"""A generate request to an engine, decoded and validated without Triton.

Engines (simulated and real vLLM) and the `qlm` router accept what Triton's vllm_backend accepts
(tensors.py has the table): `text_input`, optional `stream`, `exclude_input_in_output`,
`sampling_parameters` (JSON) or the same keys as request parameters, and the `return_*` flags; our
engines also take an optional `priority`. The Triton glue hands this module plain numpy arrays and
the request's parameters JSON; every error names its field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from qlm_backend.contract.sampling import Sampling, parse_sampling, sampling_source
from qlm_backend.contract.tensors import BOOL_INPUTS, RETURN_FLAGS
from qlm_backend.contract.values import ContractError, decode_text, scalar


@dataclass(frozen=True)
class GenerateParams:
    prompt: str
    stream: bool
    prepend_input: bool
    sampling: Sampling
    returns: frozenset[str]
    priority: int = 0


def parse_generate(
    inputs: Mapping[str, np.ndarray | None],
    parameters_json: str | None,
    max_context_tokens: int | None = None,
    count_tokens: Any = None,
    ignore_parameters: frozenset[str] = frozenset(),
    default_stream: bool = False,
) -> GenerateParams:
    """Validate one generate request. `count_tokens(text) -> int` checks the prompt against the context."""
    raw_prompt = scalar(inputs.get("text_input"), "text_input")
    if raw_prompt is None:
        raise ContractError("text_input", "is required")
    prompt = decode_text(raw_prompt, "text_input")
    if not prompt:
        raise ContractError("text_input", "must not be empty")
    flags = {k: scalar(inputs.get(k), k) for k in BOOL_INPUTS}
    for k, v in flags.items():
        if v is not None and not isinstance(v, bool | np.bool_):
            raise ContractError(k, f"must be BOOL, got {type(v).__name__}")
    stream = bool(flags["stream"]) if flags["stream"] is not None else default_stream
    exclude = flags["exclude_input_in_output"]
    prepend = (not bool(exclude)) if exclude is not None else not stream
    if prepend and stream:
        raise ContractError("exclude_input_in_output", "must be true when streaming (stream=true)")
    sampling = parse_sampling(
        sampling_source(inputs.get("sampling_parameters"), parameters_json, ignore_parameters),
        max_context_tokens,
    )
    if max_context_tokens is not None and count_tokens is not None:
        n_prompt = count_tokens(prompt)
        if n_prompt + sampling.max_tokens > max_context_tokens:
            raise ContractError(
                "text_input",
                f"prompt ({n_prompt} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                f"model's context of {max_context_tokens} tokens",
            )
    prio = scalar(inputs.get("priority"), "priority")
    if prio is not None and not isinstance(prio, int | np.integer):
        raise ContractError("priority", f"must be INT32, got {type(prio).__name__}")
    returns = frozenset(k for k in RETURN_FLAGS if flags[k])
    return GenerateParams(
        prompt, stream, prepend, sampling, returns, int(prio) if prio is not None else 0
    )
