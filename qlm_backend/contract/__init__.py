"""The request and response contract of the engine and router models, in one place.

- tensors.py: the tables of each model's input and output tensors (names, datatypes, dims,
  optional), and the name lists derived from them;
- model_config.py: the config.pbtxt / config JSON sections rendered from a table;
- values.py, sampling.py, generate.py: a request decoded and validated (errors name their field);
- encode.py: responses and requests built from the tables;
- respond.py: one request's responses, streamed or not, as vllm_backend sends them.

Pure Python and numpy: no Triton import, so the CPU test suite checks all of it.
"""

from qlm_backend.contract.encode import (
    Tensor,
    engine_request_tensors,
    output_arrays,
    request_tensors,
    router_request_tensors,
)
from qlm_backend.contract.generate import GenerateParams, parse_generate
from qlm_backend.contract.model_config import io_config, io_pbtxt
from qlm_backend.contract.respond import (
    Responder,
    join_logprobs,
    logprobs_text,
    vllm_logprobs_json,
)
from qlm_backend.contract.sampling import (
    DEFAULT_MAX_TOKENS,
    RESERVED_PARAMETERS,
    SAMPLING_KEYS,
    Sampling,
    parse_sampling,
    sampling_source,
)
from qlm_backend.contract.tensors import (
    BOOL_INPUTS,
    DATATYPES,
    ENGINE_INPUT_NAMES,
    ENGINE_INPUTS,
    ENGINE_OUTPUTS,
    QLM_FIELDS,
    QLM_INPUTS,
    QLM_OUTPUTS,
    RETURN_FLAGS,
    ROUTER_INPUT_NAMES,
    ROUTER_INPUTS,
    ROUTER_OUTPUTS,
    ROUTER_OWN,
    ROUTER_PASS_THROUGH,
    ROUTER_READS,
    VLLM_BACKEND_FLAGS,
    VLLM_BACKEND_INPUTS,
    VLLM_BACKEND_OUTPUTS,
    TensorSpec,
    names,
)
from qlm_backend.contract.values import ContractError, decode_text, scalar

__all__ = [
    "BOOL_INPUTS",
    "DATATYPES",
    "DEFAULT_MAX_TOKENS",
    "ENGINE_INPUTS",
    "ENGINE_INPUT_NAMES",
    "ENGINE_OUTPUTS",
    "QLM_FIELDS",
    "QLM_INPUTS",
    "QLM_OUTPUTS",
    "RESERVED_PARAMETERS",
    "RETURN_FLAGS",
    "VLLM_BACKEND_FLAGS",
    "ROUTER_INPUTS",
    "ROUTER_INPUT_NAMES",
    "ROUTER_OUTPUTS",
    "ROUTER_OWN",
    "ROUTER_PASS_THROUGH",
    "ROUTER_READS",
    "SAMPLING_KEYS",
    "VLLM_BACKEND_INPUTS",
    "VLLM_BACKEND_OUTPUTS",
    "ContractError",
    "GenerateParams",
    "Responder",
    "Sampling",
    "Tensor",
    "TensorSpec",
    "decode_text",
    "engine_request_tensors",
    "io_config",
    "io_pbtxt",
    "join_logprobs",
    "logprobs_text",
    "names",
    "output_arrays",
    "parse_generate",
    "parse_sampling",
    "request_tensors",
    "router_request_tensors",
    "sampling_source",
    "scalar",
    "vllm_logprobs_json",
]
