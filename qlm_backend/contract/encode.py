"""Tensors built from the tables: the engines' responses and the requests sent to a model.

Built here, from the declared datatypes, so a response or request always carries what config.pbtxt
declares; a value of the wrong kind fails where it is built, not as a type error from Triton.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qlm_backend.contract.tensors import ENGINE_INPUTS, ENGINE_OUTPUTS, ROUTER_INPUTS, TensorSpec

# (name, one-element array, wire datatype): what a tritonclient InferInput is made of.
Tensor = tuple[str, np.ndarray, str]


def request_tensors(table: tuple[TensorSpec, ...], fields: Mapping[str, Any]) -> list[Tensor]:
    """One tensor per field, typed by `table`; a field the table lacks is a KeyError (the server
    would reject it)."""
    specs = {s.name: s for s in table}
    out: list[Tensor] = []
    for name, value in fields.items():
        spec = specs.get(name)
        if spec is None:
            raise KeyError(f"{name!r} is not an input of this model; inputs: {sorted(specs)}")
        out.append((name, spec.array(value), spec.datatype))
    return out


def engine_request_tensors(fields: Mapping[str, Any]) -> list[Tensor]:
    """The tensors of a request to an engine model (the router's dispatch)."""
    return request_tensors(ENGINE_INPUTS, fields)


def router_request_tensors(fields: Mapping[str, Any]) -> list[Tensor]:
    """The tensors of a request to the router; engines take the same fields but QLM's."""
    return request_tensors(ROUTER_INPUTS, fields)


# Each engine output with the flag that asks for it (None: always sent).
_RESPONSE = tuple(
    (s, None if s.name == "text_output" else f"return_{s.name}") for s in ENGINE_OUTPUTS
)


def output_arrays(
    returns: frozenset[str],
    text: str,
    finish_reason: str | None,
    cumulative_logprob: float,
    logprobs: str | None,
    num_input_tokens: int,
    num_output_tokens: int,
    num_cached_tokens: int = 0,
) -> dict[str, np.ndarray]:
    """One response's output tensors, as vllm_backend sends them: text_output always, every other
    output only when its `return_<name>` flag is in `returns`."""
    values: dict[str, Any] = {
        "text_output": text,
        "finish_reason": str(finish_reason),  # vllm_backend sends 'None' before the end
        "cumulative_logprob": cumulative_logprob,
        "logprobs": logprobs or "null",
        "num_input_tokens": num_input_tokens,
        "num_output_tokens": num_output_tokens,
        "num_cached_tokens": num_cached_tokens,
    }
    out = {
        s.name: s.array(values[s.name]) for s, flag in _RESPONSE if flag is None or flag in returns
    }
    if "num_input_tokens" in out:
        # vllm_backend builds it as np.asarray(n) (a 0-d array), not a list: a gRPC client gets
        # shape [] and as_numpy() a 0-d array, where indexing with [0] fails; HTTP JSON gives the
        # same bare number either way. Sent alike, so a client written for one works with the other.
        out["num_input_tokens"] = out["num_input_tokens"].reshape(())
    return out
