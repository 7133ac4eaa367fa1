"""Write engine models into a Triton model repository (the default fleet, test fleets, user fleets).

An engine model is named `<logical-model>__<instance>`: one Triton model per (model, serving
instance) pair, so the router addresses an instance directly and a model swap on an instance is an
unload of one name and a load of another.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlm_backend.engine.config import CONFIG_FILE, EngineConfig

SEP = "__"

# The vllm_backend contract (current release), plus our optional `priority`.
ENGINE_IO = """\
input [
  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "sampling_parameters" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "exclude_input_in_output" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "return_finish_reason" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "return_cumulative_logprob" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "return_logprobs" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "return_num_input_tokens" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "return_num_output_tokens" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "priority" data_type: TYPE_INT32 dims: [ 1 ] optional: true }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "finish_reason" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "cumulative_logprob" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "logprobs" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "num_input_tokens" data_type: TYPE_UINT32 dims: [ 1 ] },
  { name: "num_output_tokens" data_type: TYPE_UINT32 dims: [ -1 ] }
]
"""

SIM_MODEL_PY = '''\
"""Simulated vLLM engine (see qlm_backend/triton/sim_engine.py); its settings are in engine.json."""

from qlm_backend.triton.sim_engine import SimEngineModel as TritonPythonModel  # noqa: F401
'''


def engine_model_name(model: str, instance: str) -> str:
    return f"{model}{SEP}{instance}"


def split_engine_name(name: str) -> tuple[str, str]:
    model, sep, instance = name.partition(SEP)
    if not sep:
        raise ValueError(f"engine model name {name!r} is not <model>{SEP}<instance>")
    return model, instance


def sim_engine_config_pbtxt(name: str, parameters: Mapping[str, Any] | None = None) -> str:
    params = "".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
        for k, v in (parameters or {}).items()
    )
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        "model_transaction_policy { decoupled: true }\n"
        f"{ENGINE_IO}"
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        f"{params}"
    )


def write_sim_engine(repo: Path, model: str, instance: str, settings: Mapping[str, Any]) -> Path:
    """Create `<repo>/<model>__<instance>/` with config.pbtxt, 1/model.py and 1/engine.json."""
    cfg = EngineConfig.from_mapping(
        {"model": model, "instance": instance, **settings}
    )  # validate now
    name = engine_model_name(model, instance)
    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(sim_engine_config_pbtxt(name))
    (d / "1" / "model.py").write_text(SIM_MODEL_PY)
    body = {k: v for k, v in vars(cfg).items() if k in {"model", "instance", *settings}}
    (d / "1" / CONFIG_FILE).write_text(json.dumps(body, indent=2) + "\n")
    return d
