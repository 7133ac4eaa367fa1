"""The contract tables (qlm_backend/contract/tensors.py) against everything that restates them: the
committed and generated config.pbtxt files, the config override a load carries, the name lists the
models decode with, the tensors the router's engine client and qlm-client send, and the responses
the engines build. Triton only checks a request against config.pbtxt, so a drift between any two of
these shows up as a rejected request or a missing output at run time; here it fails at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from qlm_backend import deploy
from qlm_backend.client import Request, grpc_inputs
from qlm_backend.contract import (
    BOOL_INPUTS,
    DATATYPES,
    ENGINE_INPUT_NAMES,
    ENGINE_INPUTS,
    ENGINE_OUTPUTS,
    QLM_FIELDS,
    RETURN_FLAGS,
    ROUTER_INPUT_NAMES,
    ROUTER_INPUTS,
    ROUTER_OUTPUTS,
    ROUTER_OWN,
    ROUTER_PASS_THROUGH,
    ROUTER_READS,
    VLLM_BACKEND_INPUTS,
    VLLM_BACKEND_OUTPUTS,
    TensorSpec,
    engine_request_tensors,
    io_pbtxt,
    names,
    output_arrays,
    router_request_tensors,
)
from qlm_backend.triton.repository import (
    engine_config_dict,
    router_config_pbtxt,
    sim_engine_config_pbtxt,
    write_router,
    write_sim_engine,
)

ROOT = Path(__file__).resolve().parents[2]
REPOSITORIES = (ROOT / "model_repository", ROOT / "docker" / "model_repository")
COMMITTED = sorted(p for repo in REPOSITORIES for p in repo.glob("*/config.pbtxt"))
ModelConfig = model_config_pb2.ModelConfig


def _parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, ModelConfig())


def _io(cfg: model_config_pb2.ModelConfig) -> tuple[list[tuple], list[tuple]]:
    dt = model_config_pb2.DataType.Name
    ins = [(i.name, dt(i.data_type), tuple(i.dims), i.optional) for i in cfg.input]
    outs = [(o.name, dt(o.data_type), tuple(o.dims)) for o in cfg.output]
    return ins, outs


def _table_io(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]):
    return (
        [(s.name, s.config_type, s.dims, s.optional) for s in inputs],
        [(s.name, s.config_type, s.dims) for s in outputs],
    )


def _tables_for(cfg: model_config_pb2.ModelConfig):
    if "__" not in cfg.name:
        return ROUTER_INPUTS, ROUTER_OUTPUTS
    if cfg.backend == "vllm":  # the stock vllm_backend: no `priority`
        return VLLM_BACKEND_INPUTS, VLLM_BACKEND_OUTPUTS
    return ENGINE_INPUTS, ENGINE_OUTPUTS


def test_the_committed_repositories_have_engines_and_routers():
    assert any("__" in p.parent.name for p in COMMITTED)
    assert any(p.parent.name == "qlm" for p in COMMITTED)
    # Every engine is ours or Triton's vllm_backend (the GPU repository's `--engine vllm` option,
    # checked in test_generated_configs_declare_the_tables and tests/unit/test_docker.py).
    assert {_parse(p.read_text()).backend for p in COMMITTED} <= {"python", "vllm"}


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_config_pbtxt_declares_the_table(path):
    cfg = _parse(path.read_text())
    assert cfg.name == path.parent.name
    assert _io(cfg) == _table_io(*_tables_for(cfg))


@pytest.mark.parametrize(
    "path",
    [p for p in COMMITTED if p.parent.parent == REPOSITORIES[0]],
    ids=lambda p: p.parent.name,
)
def test_committed_cpu_repository_is_what_the_writers_write(path, tmp_path):
    name = path.parent.name
    text = path.read_text()
    if name == "qlm":
        assert text == router_config_pbtxt(name)
    elif (path.parent / "1" / "engine.json").exists():  # a simulated engine
        assert text == sim_engine_config_pbtxt(name)
    else:  # the hand-written real vLLM CPU engine: its own parameters, the engines' I/O
        assert io_pbtxt(ENGINE_INPUTS, ENGINE_OUTPUTS) in text


def test_generated_configs_declare_the_tables(tmp_path):
    router = write_router(tmp_path, {"policy": "qlm"}, name="qlm")
    engine = write_sim_engine(tmp_path, "mistral-7b", "a10-0", {"gpu": "A10"})
    gpu_engine = _parse(deploy.qlm_config_pbtxt("mistral-7b__h100-0", 0))
    stock_engine = _parse(deploy.vllm_config_pbtxt("mistral-7b__h100-0", 0))
    for cfg in (
        _parse((router / "config.pbtxt").read_text()),
        _parse((engine / "config.pbtxt").read_text()),
        gpu_engine,
        stock_engine,
    ):
        assert _io(cfg) == _table_io(*_tables_for(cfg)), cfg.name
    assert gpu_engine.backend == "python"  # our vLLM engine model: ENGINE tables, with priority
    assert "priority" in {i.name for i in gpu_engine.input}
    assert stock_engine.backend == "vllm"
    # The config override a swap or recovery load carries (router/dispatch.py) is a full config.
    override = json_format.ParseDict(
        json.loads(json.dumps(engine_config_dict("mistral-7b__a10-0", {"time_scale": "1"}))),
        ModelConfig(),
    )
    assert _io(override) == _table_io(ENGINE_INPUTS, ENGINE_OUTPUTS)


def test_tables_are_well_formed():
    for table in (ENGINE_INPUTS, ENGINE_OUTPUTS, ROUTER_INPUTS, ROUTER_OUTPUTS):
        assert len(set(names(table))) == len(table)
        for s in table:
            assert s.datatype in DATATYPES and s.dims and s.meaning
    assert not any(s.optional for s in (*ENGINE_OUTPUTS, *ROUTER_OUTPUTS))  # inputs only
    assert [s for s in ENGINE_INPUTS if not s.optional] == [ENGINE_INPUTS[0]]  # text_input
    # The router sets the engine's priority from the plan; clients cannot.
    assert "priority" in ENGINE_INPUT_NAMES and "priority" not in ROUTER_INPUT_NAMES
    assert "priority" not in names(VLLM_BACKEND_INPUTS)
    assert set(ROUTER_INPUT_NAMES) == set(names(VLLM_BACKEND_INPUTS)) | QLM_FIELDS


def test_derived_name_lists():
    assert BOOL_INPUTS == (
        "stream",
        "exclude_input_in_output",
        "return_finish_reason",
        "return_cumulative_logprob",
        "return_logprobs",
        "return_num_input_tokens",
        "return_num_output_tokens",
        "return_num_cached_tokens",
    )
    assert set(RETURN_FLAGS) == {f"return_{n}" for n in names(ENGINE_OUTPUTS)} - {
        "return_text_output"
    }
    # The router takes vllm_backend's flags; num_cached_tokens is for the router itself.
    assert set(BOOL_INPUTS) - set(ROUTER_INPUT_NAMES) == {"return_num_cached_tokens"}


def test_router_pass_through_and_reads_are_engine_outputs():
    engine_out = names(ENGINE_OUTPUTS)
    for name in (*ROUTER_PASS_THROUGH, *ROUTER_READS):
        assert name in engine_out
        assert name in names(ROUTER_OUTPUTS)  # the router's client gets them too
    for name in ROUTER_OWN:  # read for the plan, not sent on
        assert name in engine_out and name not in names(ROUTER_OUTPUTS)
    assert sorted((*ROUTER_PASS_THROUGH, *ROUTER_READS, *ROUTER_OWN)) == sorted(engine_out)
    for name in (*ROUTER_PASS_THROUGH, *ROUTER_OWN):  # the engine sends them only when asked
        assert f"return_{name}" in ENGINE_INPUT_NAMES


def _old_tensor(name, value):
    """router/dispatch.py's former `_tensor`: the type followed the Python value."""
    if isinstance(value, bool):
        return name, np.array([value], dtype=bool), "BOOL"
    if isinstance(value, int):
        return name, np.array([value], dtype=np.int32), "INT32"
    return name, np.array([str(value).encode()], dtype=np.object_), "BYTES"


def _same(a, b):
    assert [(n, d) for n, _, d in a] == [(n, d) for n, _, d in b]
    for (_, x, _), (_, y, _) in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tolist() == y.tolist()


def test_engine_request_tensors_match_the_table_and_the_former_encoding():
    fields = {  # what the router's _engine_fields builds
        "text_input": "héllo",
        "stream": True,
        "exclude_input_in_output": True,
        "sampling_parameters": json.dumps({"max_tokens": 4}),
        "return_finish_reason": True,
        "return_num_output_tokens": True,
        "return_cumulative_logprob": True,
        "return_logprobs": True,
        "return_num_input_tokens": True,
        "priority": 3,
    }
    got = engine_request_tensors(fields)
    _same(got, [_old_tensor(k, v) for k, v in fields.items()])
    specs = {s.name: s for s in ENGINE_INPUTS}
    for name, arr, datatype in got:
        assert datatype == specs[name].datatype
        assert list(arr.shape) == [d if d > 0 else 1 for d in specs[name].dims]
    with pytest.raises(KeyError, match="model"):
        engine_request_tensors({"text_input": "hi", "model": "mistral-7b"})
    with pytest.raises(TypeError, match="stream"):
        engine_request_tensors({"stream": "true"})
    with pytest.raises(TypeError, match="priority"):
        engine_request_tensors({"priority": True})
    with pytest.raises(ValueError, match="priority"):
        engine_request_tensors({"priority": 2**31})


def test_router_request_tensors_are_what_qlm_client_sends():
    class Module:
        class InferInput:
            def __init__(self, name, shape, datatype):
                self.name, self.shape, self.datatype = name, shape, datatype

            def set_data_from_numpy(self, arr):
                self.arr = arr

    req = Request(prompt="hi", model="mistral-7b", slo_class="interactive", ttft_slo_s=2)
    sent = grpc_inputs(req, Module)
    specs = {s.name: s for s in ROUTER_INPUTS}
    for inp in sent:
        assert inp.datatype == specs[inp.name].datatype
        assert inp.arr.dtype == specs[inp.name].numpy_dtype
    assert {i.name for i in sent} >= {"text_input", "model", "slo_class", "ttft_slo_s"}
    with pytest.raises(KeyError):
        router_request_tensors({"priority": 1})


def test_output_arrays_follow_the_engine_table():
    everything = output_arrays(frozenset(RETURN_FLAGS), "x", "stop", -1.5, "[]", 3, 2)
    assert list(everything) == list(names(ENGINE_OUTPUTS))
    for s in ENGINE_OUTPUTS:
        # num_input_tokens is 0-d, as vllm_backend sends it (tests/unit/test_conformance_matrix.py).
        shape = () if s.name == "num_input_tokens" else (1,)
        assert everything[s.name].dtype == s.numpy_dtype and everything[s.name].shape == shape
    assert list(output_arrays(frozenset(), "x", None, 0.0, None, 3, 2)) == ["text_output"]
    # vllm_backend's conventions for values not there yet.
    some = output_arrays(
        frozenset({"return_finish_reason", "return_logprobs"}), "", None, 0, None, 0, 0
    )
    assert some["finish_reason"].tolist() == [b"None"] and some["logprobs"].tolist() == [b"null"]


def test_vllm_backend_flags_are_its_five_return_inputs() -> None:
    from qlm_backend.contract import RETURN_FLAGS, VLLM_BACKEND_FLAGS

    # vllm_backend's _get_input_tensors reads exactly these; ours add num_cached_tokens.
    assert VLLM_BACKEND_FLAGS == (
        "return_finish_reason",
        "return_cumulative_logprob",
        "return_logprobs",
        "return_num_input_tokens",
        "return_num_output_tokens",
    )
    assert set(RETURN_FLAGS) - set(VLLM_BACKEND_FLAGS) == {"return_num_cached_tokens"}
