"""The tensors of the engine and router models: one table each, and everything else derives from them.

Four parts of the system must agree on every name and type here: the config.pbtxt Triton checks
requests against (triton/repository.py, deploy.py), the models' request decoding (parse_generate,
router/request.py), the responses they build (output_arrays) and the router's gRPC client of the
engines (router/dispatch.py). A disagreement shows only at run time, as a request Triton rejects
or an output that silently never arrives, so all of them read these tables instead of spelling
the names out again.

Datatypes are Triton's wire names (what a client's InferInput takes); `config_type` is the same type
as config.pbtxt spells it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Wire datatype -> (config.pbtxt data_type, numpy dtype of the tensor).
DATATYPES: Mapping[str, tuple[str, Any]] = {
    "BOOL": ("TYPE_BOOL", np.bool_),
    "INT32": ("TYPE_INT32", np.int32),
    "UINT32": ("TYPE_UINT32", np.uint32),
    "FP32": ("TYPE_FP32", np.float32),
    "FP64": ("TYPE_FP64", np.float64),
    "BYTES": ("TYPE_STRING", np.object_),
}

_INT_RANGES = {"INT32": (-(2**31), 2**31 - 1), "UINT32": (0, 2**32 - 1)}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a model."""

    name: str
    datatype: str  # a key of DATATYPES
    dims: tuple[int, ...]  # -1: any length (vllm_backend declares some outputs so)
    optional: bool  # inputs only: the request may leave the tensor out
    meaning: str

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"{self.name}: unknown datatype {self.datatype!r}")

    @property
    def config_type(self) -> str:
        return DATATYPES[self.datatype][0]

    @property
    def numpy_dtype(self) -> Any:
        return DATATYPES[self.datatype][1]

    def array(self, value: Any) -> np.ndarray:
        """`value` as this tensor's one-element array. A value of the wrong kind is a bug in the
        caller (these build our own requests and responses), so it raises instead of converting."""
        dt = self.datatype
        if dt == "BYTES":
            if isinstance(value, str):
                value = value.encode("utf-8")
            elif isinstance(value, bytes | np.bytes_):
                value = bytes(value)
            else:
                raise TypeError(f"{self.name}: BYTES takes str or bytes, got {value!r}")
            return np.asarray([value], dtype=np.object_)
        if dt == "BOOL":
            if not isinstance(value, bool | np.bool_):
                raise TypeError(f"{self.name}: BOOL takes a bool, got {value!r}")
            return np.asarray([value], dtype=np.bool_)
        if isinstance(value, bool | np.bool_):
            raise TypeError(f"{self.name}: {dt} takes a number, got {value!r}")
        if dt in ("INT32", "UINT32"):
            if not isinstance(value, int | np.integer):
                raise TypeError(f"{self.name}: {dt} takes an integer, got {value!r}")
            lo, hi = _INT_RANGES[dt]
            if not lo <= value <= hi:
                raise ValueError(f"{self.name}: {value} is out of {dt}'s range")
            return np.asarray([value], dtype=DATATYPES[dt][1])
        if not isinstance(value, int | float | np.integer | np.floating):
            raise TypeError(f"{self.name}: {dt} takes a number, got {value!r}")
        return np.asarray([value], dtype=DATATYPES[dt][1])


def names(table: Iterable[TensorSpec]) -> tuple[str, ...]:
    return tuple(s.name for s in table)


def _flag(output: str) -> TensorSpec:
    return TensorSpec(
        f"return_{output}", "BOOL", (1,), True, f"Send `{output}` with each response."
    )


# Triton's vllm_backend (its current release), which a real `backend: "vllm"` engine serves as is.
VLLM_BACKEND_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "BYTES", (1,), False, "The prompt, UTF-8."),
    TensorSpec("stream", "BOOL", (1,), True, "One response per step instead of one at the end."),
    TensorSpec(
        "sampling_parameters",
        "BYTES",
        (1,),
        True,
        "vLLM SamplingParams as a JSON object; without it they come from the request parameters.",
    ),
    TensorSpec(
        "exclude_input_in_output",
        "BOOL",
        (1,),
        True,
        "Leave the prompt out of a non-streamed text_output; must be true when streaming.",
    ),
    _flag("finish_reason"),
    _flag("cumulative_logprob"),
    _flag("logprobs"),
    _flag("num_input_tokens"),
    _flag("num_output_tokens"),
)
VLLM_BACKEND_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec(
        "text_output",
        "BYTES",
        (-1,),
        False,
        "The text: this step's new text when streaming, else all of it.",
    ),
    TensorSpec(
        "finish_reason",
        "BYTES",
        (-1,),
        False,
        "Why generation ended (stop, length, abort); 'None' on a response that is not the last.",
    ),
    TensorSpec(
        "cumulative_logprob", "FP32", (-1,), False, "Sum of the logprobs of the tokens so far."
    ),
    TensorSpec(
        "logprobs", "BYTES", (-1,), False, "JSON list of the logprobs of this response's tokens."
    ),
    TensorSpec("num_input_tokens", "UINT32", (1,), False, "Tokens in the prompt."),
    TensorSpec("num_output_tokens", "UINT32", (-1,), False, "Tokens this response carries."),
)

# Our engines (simulated and real vLLM): vllm_backend's contract plus an optional priority, so the
# router's plan orders the engine's own queue too, and the prompt tokens the engine's prefix cache
# held (vLLM's RequestOutput.num_cached_tokens), so the router sees what a resume after an
# eviction really re-prefilled.
ENGINE_INPUTS: tuple[TensorSpec, ...] = (
    *VLLM_BACKEND_INPUTS,
    TensorSpec(
        "priority",
        "INT32",
        (1,),
        True,
        "Scheduling priority, lower first (vLLM's convention); not in vllm_backend.",
    ),
    _flag("num_cached_tokens"),
)
ENGINE_OUTPUTS: tuple[TensorSpec, ...] = (
    *VLLM_BACKEND_OUTPUTS,
    TensorSpec(
        "num_cached_tokens",
        "UINT32",
        (1,),
        False,
        "Prompt tokens found in the engine's prefix cache; not in vllm_backend.",
    ),
)

# The router: vllm_backend's inputs without `priority` (the router sets it from the SLO class) plus
# QLM's fields, which HTTP generate may also send as request parameters.
QLM_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec(
        "model",
        "BYTES",
        (1,),
        True,
        "The logical model to serve the request; required, here or as a request parameter.",
    ),
    TensorSpec(
        "slo_class",
        "BYTES",
        (1,),
        True,
        "The request's SLO class; default: the router's default_slo_class.",
    ),
    TensorSpec(
        "ttft_slo_s", "FP64", (1,), True, "A time-to-first-token SLO (s) instead of the class's."
    ),
    TensorSpec(
        "qlm_heartbeat_s",
        "FP64",
        (1,),
        True,
        "Streaming only: an empty response (no text, 0 tokens) whenever the stream has been silent"
        " this long (s), so a client tells a live router, one draining included, from a dead one.",
    ),
)
# QLM's report on the final response.
QLM_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("qlm_queue_s", "FP64", (1,), False, "Seconds queued in the router before dispatch."),
    TensorSpec("qlm_instance", "BYTES", (1,), False, "The instance that finished the request."),
)
ROUTER_INPUTS: tuple[TensorSpec, ...] = (*VLLM_BACKEND_INPUTS, *QLM_INPUTS)
ROUTER_OUTPUTS: tuple[TensorSpec, ...] = (*VLLM_BACKEND_OUTPUTS, *QLM_OUTPUTS)

# Derived name lists: what the models read from a request (read_inputs) and how they decode it.
ENGINE_INPUT_NAMES = names(ENGINE_INPUTS)
ROUTER_INPUT_NAMES = names(ROUTER_INPUTS)
BOOL_INPUTS = tuple(s.name for s in ENGINE_INPUTS if s.datatype == "BOOL")
# `return_<output>` asks for that output; text_output is always sent.
RETURN_FLAGS = tuple(
    f"return_{s.name}" for s in ENGINE_OUTPUTS if f"return_{s.name}" in ENGINE_INPUT_NAMES
)
QLM_FIELDS = frozenset(names(QLM_INPUTS))
# vllm_backend's own five (RETURN_FLAGS adds ours, return_num_cached_tokens).
VLLM_BACKEND_FLAGS = tuple(s.name for s in VLLM_BACKEND_INPUTS if s.name.startswith("return_"))

# The engine outputs the router's client consumes to drive the client's stream; the router
# rebuilds them for each of its own responses.
ROUTER_READS = ("text_output", "finish_reason", "num_output_tokens")
# The engine outputs the router hands on to its client as the engine sent them.
ROUTER_PASS_THROUGH = ("cumulative_logprob", "logprobs", "num_input_tokens")
# The engine outputs the router reads for itself and its plan, never sent on.
ROUTER_OWN = ("num_cached_tokens",)
