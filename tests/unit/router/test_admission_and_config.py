"""The request contract, the router's admission and the settings files, without Triton."""

import json
import math

import numpy as np
import pytest

from qlm_backend.contract import ContractError, parse_generate
from qlm_backend.core.fleet import parse_fleet
from qlm_backend.engine.config import EngineConfig, EngineConfigError, load_engine_config
from qlm_backend.engine.tokens import count_prompt_tokens
from qlm_backend.router.config import RouterConfig, RouterConfigError, load_router_config
from qlm_backend.router.request import parse_router_request

MODELS = {"mistral-7b": 8192}
CLASSES = {"interactive": 20.0, "batch-1": 60.0}


def text(s: str | bytes) -> np.ndarray:
    return np.array([s.encode() if isinstance(s, str) else s], dtype=np.object_)


def admit(inputs: dict, params: dict | None = None):
    return parse_router_request(
        inputs,
        json.dumps(params or {}),
        models=MODELS,
        slo_classes=CLASSES,
        default_slo_class="interactive",
        count_tokens=count_prompt_tokens,
        max_prompt_bytes=1000,
    )


def test_engine_request_defaults_follow_vllm_backend():
    p = parse_generate({"text_input": text("hi")}, None)
    # No `stream` tensor: non-streaming, and the prompt is prepended, as vllm_backend does.
    assert (p.stream, p.prepend_input, p.sampling.max_tokens) == (False, True, 16)


def test_sampling_keys_come_from_the_tensor_before_the_parameters():
    p = parse_generate(
        {"text_input": text("hi"), "sampling_parameters": text('{"max_tokens": 5}')},
        json.dumps({"max_tokens": 9}),
    )
    assert p.sampling.max_tokens == 5


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"bogus": 1}, "bogus"),
        ({"n": 2}, "n"),
    ],
)
def test_bad_sampling_values_name_their_field(params, field):
    with pytest.raises(ContractError) as e:
        parse_generate({"text_input": text("hi")}, json.dumps(params))
    assert e.value.field == field


def test_router_takes_qlm_fields_from_tensors_or_parameters_and_not_as_sampling_keys():
    r = admit(
        {"text_input": text("hi"), "model": text("mistral-7b")},
        {"slo_class": "batch-1", "max_tokens": 4},
    )
    assert (r.model, r.slo_class, r.ttft_slo_s, r.params.sampling.max_tokens) == (
        "mistral-7b",
        "batch-1",
        None,
        4,
    )
    # As Triton's vllm_backend: no `stream`, no streaming (one response with the whole text),
    # and the whole text then includes the prompt (exclude_input_in_output defaults to false).
    assert not r.params.stream and r.params.prepend_input


def test_a_stream_may_ask_for_heartbeats_as_a_tensor_or_a_parameter():
    base = {"text_input": text("hi"), "model": text("mistral-7b"), "stream": np.array([True])}
    assert admit(base).heartbeat_s is None
    assert admit({**base, "qlm_heartbeat_s": np.array([0.5])}).heartbeat_s == 0.5
    assert admit(base, {"qlm_heartbeat_s": "2"}).heartbeat_s == 2.0  # HTTP parameters: text


@pytest.mark.parametrize(
    ("inputs", "params", "field"),
    [
        ({"text_input": text("hi")}, {}, "model"),
        ({"text_input": text("hi"), "model": text("gpt")}, {}, "model"),
        (
            {"text_input": text("hi"), "model": text("mistral-7b")},
            {"slo_class": "gold"},
            "slo_class",
        ),
        (
            {
                "text_input": text("hi"),
                "model": text("mistral-7b"),
                "ttft_slo_s": np.array([math.nan]),
            },
            {},
            "ttft_slo_s",
        ),
        (
            {"text_input": text("hi"), "model": text("mistral-7b"), "stream": np.array([True])},
            {"qlm_heartbeat_s": 0.01},  # would flood the stream
            "qlm_heartbeat_s",
        ),
        (
            {"text_input": text("hi"), "model": text("mistral-7b")},
            {"qlm_heartbeat_s": 1.0},  # not streamed: nowhere to put a heartbeat
            "qlm_heartbeat_s",
        ),
        ({"text_input": text("x" * 2000), "model": text("mistral-7b")}, {}, "text_input"),
        ({"text_input": text(b"\xff"), "model": text("mistral-7b")}, {}, "text_input"),
    ],
)
def test_router_admission_errors_name_the_field(inputs, params, field):
    with pytest.raises(ContractError) as e:
        admit(inputs, params)
    assert e.value.field == field


def test_router_config_reads_the_file_and_parameters_win(tmp_path):
    (tmp_path / "router.json").write_text(json.dumps({"policy": "edf", "tick_s": 0.05}))
    cfg = load_router_config({"parameters": {"tick_s": {"string_value": "0.01"}}}, tmp_path)
    assert (cfg.policy, cfg.tick_s) == ("edf", 0.01)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"policy": "lifo"}, "policy"),
        ({"tick_s": 0}, "tick_s"),
        ({"forward_priority": "sometimes"}, "forward_priority"),
        ({"instance_servers": {"a": "http://x"}}, "instance_servers.a"),
        ({"engine_backend": "trt"}, "engine_backend"),
        ({"manager": {"nope": 1}}, "manager.nope"),
        ({"polcy": "qlm"}, "polcy"),
        ({"max_pending_requests": 0}, "max_pending_requests"),
        ({"max_pending_requests": 2.5}, "max_pending_requests"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"request_timeout_s": "inf"}, "request_timeout_s"),
        ({"request_timeout_s": "nan"}, "request_timeout_s"),
    ],
)
def test_router_config_errors_name_the_key(raw, key):
    with pytest.raises(RouterConfigError) as e:
        RouterConfig.from_mapping(raw)
    assert e.value.key == key


def test_router_config_remote_urls_and_backends():
    cfg = RouterConfig.from_mapping(
        {
            "instance_servers": {"b": "grpc://10.0.0.2:8001"},
            "instance_backends": {"b": "vllm"},
            "engine_url": "h:1",
        }
    )
    assert (cfg.url_for("a"), cfg.url_for("b")) == ("h:1", "10.0.0.2:8001")
    assert (cfg.backend_for("a"), cfg.backend_for("b")) == ("sim", "vllm")


@pytest.mark.parametrize(
    ("backend", "warm", "sent"),
    [
        ("sim", True, {"load_mode": "warm"}),
        ("sim", False, {"load_mode": "cold"}),
        # A config override would replace a real engine's config: none is sent, warm or not.
        ("vllm", True, None),
        ("vllm", False, None),
        ("qlm-vllm", True, None),
        ("qlm-vllm", False, None),
    ],
)
def test_what_a_swap_or_recovery_load_sends_each_engine_backend(backend, warm, sent):
    cfg = RouterConfig.from_mapping({"instance_backends": {"x": backend}})
    assert cfg.load_params("x", warm) == sent


def test_engine_config_from_json_and_parameters(tmp_path):
    (tmp_path / "engine.json").write_text(
        json.dumps({"model": "mistral-7b", "gpu": "A10", "time_scale": 0.5})
    )
    cfg = load_engine_config({"parameters": {"max_num_seqs": {"string_value": "8"}}}, tmp_path)
    assert (cfg.gpu, cfg.time_scale, cfg.max_num_seqs) == ("A10", 0.5, 8)
    assert isinstance(cfg, EngineConfig)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"model": "mistral-7b"}, "gpu"),
        ({"model": "mistral-7b", "gpu": "V100"}, "gpu"),
        ({"model": "llama-2-13b", "gpu": "A10", "tp": 1}, "tp"),
        ({"model": "mistral-7b", "gpu": "A10", "time_scale": "fast"}, "time_scale"),
        ({"model": "mistral-7b", "gpu": "A10", "scheduling": "lifo"}, "scheduling"),
        ({"model": "mistral-7b", "gpu": "A10", "colour": "red"}, "colour"),
    ],
)
def test_engine_config_errors_name_the_key(raw, key):
    with pytest.raises(EngineConfigError) as e:
        EngineConfig.from_mapping(raw)
    assert e.value.key == key


@pytest.mark.parametrize(
    ("sampling", "fixed"),
    [
        ({"max_tokens": 64, "ignore_eos": True}, True),
        ({"max_tokens": 64, "min_tokens": 64}, True),
        ({"max_tokens": 64}, False),  # EOS may end it sooner
        ({"max_tokens": 64, "ignore_eos": True, "stop": ["\n"]}, False),
        ({"max_tokens": 64, "ignore_eos": True, "stop_token_ids": [13]}, False),
    ],
)
def test_output_length_is_fixed_only_when_nothing_can_end_it_early(sampling, fixed):
    inputs = {"text_input": text("hi"), "model": text("mistral-7b")}
    rr = admit({**inputs, "sampling_parameters": text(json.dumps(sampling))})
    assert rr.params.sampling.output_fixed is fixed


def test_router_evictions_resume_by_recompute_unless_configured():
    # The router aborts the engine request on Evict: the KV is gone, so the plan must say so.
    assert RouterConfig().manager_config().kv_swap_resume is False
    cfg = RouterConfig(manager={"kv_swap_resume": True})
    assert cfg.manager_config().kv_swap_resume is True


def _fleet(warm_slots: int = 3, warm_start_b: bool = True):
    inst = {"gpu": "A100-80G", "models_allowed": ["mistral-7b"], "initial_model": "mistral-7b"}
    return parse_fleet(
        {
            "instances": [
                {**inst, "instance_id": "a"},
                {**inst, "instance_id": "b", "warm_start": warm_start_b},
            ],
            "warm_slots_per_host": warm_slots,
        }
    )


def test_the_planner_gets_the_fleets_warm_slots_unless_router_json_says_otherwise():
    fleet = _fleet(warm_slots=3)
    assert RouterConfig().manager_config(fleet).warm_slots_per_host == 3
    assert RouterConfig().manager_config(_fleet(warm_slots=0)).warm_slots_per_host == 0
    cfg = RouterConfig(manager={"warm_slots_per_host": 1})
    assert cfg.manager_config(fleet).warm_slots_per_host == 1
    assert cfg.manager_config(fleet).kv_swap_resume is False


@pytest.mark.parametrize(
    ("backend", "planned_warm"),
    [("sim", True), ("qlm-vllm", True), ("vllm", False)],
)
def test_the_planner_counts_on_warm_starts_only_where_the_engine_can_start_warm(
    backend, planned_warm
):
    """Triton's stock vllm_backend has no sleep or wake: its swaps are planned cold (no KeepWarm, no
    warm swap priced cheap), whatever the fleet file says; `warm_start: false` stays false."""
    fleet = _fleet(warm_start_b=False)
    cfg = RouterConfig(instance_backends={"a": backend, "b": backend})
    planned = {i.instance_id: i.warm_start for i in cfg.planning_fleet(fleet).instances}
    assert planned == {"a": planned_warm, "b": False}
    # A mixed fleet: only the stock engines lose warm starts.
    mixed = RouterConfig(engine_backend="qlm-vllm", instance_backends={"b": "vllm"})
    planned = {i.instance_id: i.warm_start for i in mixed.planning_fleet(_fleet()).instances}
    assert planned == {"a": True, "b": False}


def test_a_request_naming_no_model_gets_the_default_model_or_a_clear_error() -> None:
    inputs = {"text_input": np.array([b"hi"], dtype=np.object_)}
    kw = dict(
        models={"mistral-7b": 4096, "llama-2-13b": 4096},
        slo_classes={"interactive": 20.0},
        default_slo_class="interactive",
        count_tokens=lambda t: 1,
        max_prompt_bytes=1 << 20,
    )
    r = parse_router_request(inputs, None, default_model="llama-2-13b", **kw)
    assert r.model == "llama-2-13b"
    with pytest.raises(ContractError, match="model.*is required"):
        parse_router_request(inputs, None, **kw)


def test_the_bound_on_pending_requests_refuses_at_the_bound_naming_it():
    cfg = RouterConfig.from_mapping({"max_pending_requests": 3})
    assert RouterConfig().max_pending_requests == 10_000
    assert cfg.queue_refusal(0) is None and cfg.queue_refusal(2) is None
    assert cfg.queue_refusal(3) == (
        "request refused: the router's queue is full (3 requests pending, queued or in engines; "
        "max_pending_requests is 3)"
    )


def test_the_wall_deadline_must_exceed_every_class_slo_in_wall_seconds():
    classes = {"interactive": 20.0, "batch-2": 3600.0}
    RouterConfig().check_timeout(classes)  # the default, 7200 s, leaves batch-2 its hour
    with pytest.raises(RouterConfigError) as e:
        RouterConfig.from_mapping({"request_timeout_s": 600}).check_timeout(classes)
    assert e.value.key == "request_timeout_s" and "'batch-2' has 3600 wall seconds" in str(e.value)
    # At ten times real time the hour is 360 wall seconds.
    RouterConfig.from_mapping({"request_timeout_s": 600, "time_scale": 0.1}).check_timeout(classes)
