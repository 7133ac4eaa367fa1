"""Decode and validate one request to the `qlm` router, without Triton.

The router accepts the vllm_backend contract plus QLM's fields (contract.QLM_INPUTS): `model` (the
logical model), `slo_class` (or a `ttft_slo_s` override), `qlm_heartbeat_s`. They may come as input tensors (HTTP
generate puts JSON fields with these names into tensors) or as request parameters, so they are
looked up in both. The model reads the tensors named by contract.ROUTER_INPUT_NAMES. Every error
names its field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from qlm_backend.contract import (
    QLM_FIELDS,
    ContractError,
    GenerateParams,
    decode_text,
    parse_generate,
    scalar,
)


@dataclass(frozen=True)
class RouterRequest:
    params: GenerateParams
    model: str
    slo_class: str
    ttft_slo_s: float | None
    prompt_tokens: int
    heartbeat_s: float | None = None  # qlm_heartbeat_s: an empty response after this much silence


def _field(inputs: Mapping[str, np.ndarray | None], params: Mapping[str, Any], name: str) -> Any:
    arr = inputs.get(name)
    if arr is not None:
        value = scalar(arr, name)
        if isinstance(value, bytes | np.bytes_):
            return decode_text(value, name)
        return value.item() if isinstance(value, np.generic) else value
    return params.get(name)


def parse_router_request(
    inputs: Mapping[str, np.ndarray | None],
    parameters_json: str | None,
    *,
    models: Mapping[str, int],
    slo_classes: Mapping[str, float],
    default_slo_class: str,
    count_tokens: Callable[[str], int],
    max_prompt_bytes: int,
    default_model: str = "",
) -> RouterRequest:
    """`models`: logical model -> context tokens; `slo_classes`: class -> TTFT SLO seconds;
    `default_model` serves requests that name none ("" : `model` is required)."""
    try:
        params = json.loads(parameters_json) if parameters_json else {}
    except json.JSONDecodeError:
        params = {}
    text = inputs.get("text_input")
    if text is not None:
        raw = scalar(text, "text_input")
        if isinstance(raw, bytes | np.bytes_) and len(raw) > max_prompt_bytes:
            raise ContractError(
                "text_input", f"is {len(raw)} bytes; the limit is {max_prompt_bytes}"
            )
    model = _field(inputs, params, "model")
    if model is None or model == "":
        model = default_model  # a vllm_backend client names no model: the router's default
    if model == "":
        raise ContractError("model", f"is required; served models: {', '.join(sorted(models))}")
    if not isinstance(model, str):
        raise ContractError("model", f"must be a string, got {model!r}")
    if model not in models:
        raise ContractError(
            "model", f"unknown model {model!r}; served models: {', '.join(sorted(models))}"
        )
    slo_class = _field(inputs, params, "slo_class")
    if slo_class is None or slo_class == "":
        slo_class = default_slo_class
    if not isinstance(slo_class, str) or slo_class not in slo_classes:
        raise ContractError(
            "slo_class", f"unknown class {slo_class!r}; known: {', '.join(sorted(slo_classes))}"
        )
    ttft = _seconds(_field(inputs, params, "ttft_slo_s"), "ttft_slo_s", 0.0)
    heartbeat = _seconds(_field(inputs, params, "qlm_heartbeat_s"), "qlm_heartbeat_s", 0.1)
    gp = parse_generate(
        inputs,
        parameters_json,
        models[model],
        count_tokens,
        ignore_parameters=QLM_FIELDS,
        default_stream=False,  # as Triton's vllm_backend: no `stream`, one response
    )
    if heartbeat is not None and not gp.stream:
        # A heartbeat is an empty response before the last one: only a stream can carry it.
        raise ContractError("qlm_heartbeat_s", "needs stream=true")
    return RouterRequest(gp, model, slo_class, ttft, count_tokens(gp.prompt), heartbeat)


def _seconds(value: Any, name: str, above: float) -> float | None:
    """A number of seconds, from a tensor, a JSON number or a numeric string (HTTP parameters)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ContractError(name, f"must be a number of seconds, got {value!r}") from None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= above
    ):
        raise ContractError(name, f"must be a finite number of seconds > {above:g}, got {value!r}")
    return float(value)
