"""qlm-openai's translation of OpenAI requests into the router's contract, without a server: the
sampling parameters, the errors that name the request field, the SLO class mapping, the chat
templates, and the router's errors as HTTP statuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlm_backend.engine.tokens import count_prompt_tokens
from qlm_backend.openai_front.config import Fleet, FrontConfig, FrontConfigError, router_fleet
from qlm_backend.openai_front.errors import OpenAIError, from_router, retry_after_s
from qlm_backend.openai_front.slo import (
    SloConfigError,
    SloMapping,
    load_slo_mapping,
    resolve_slo,
)
from qlm_backend.openai_front.template import (
    PlainTemplate,
    TemplateError,
    load_tokenizer_template,
)
from qlm_backend.openai_front.translate import parse_body, parse_chat, parse_completion

ROOT = Path(__file__).resolve().parents[2]
FLEET = Fleet(
    {"mistral-7b": 8192, "llama-2-13b": 4096},
    {"interactive": 20.0, "batch-1": 60.0, "batch-2": 3600.0},
    "interactive",
    Path("fleet.json"),
)
CFG = FrontConfig(FLEET)
HI = [{"role": "user", "content": "hi"}]


def chat(headers: dict[str, str] | None = None, cfg: FrontConfig = CFG, **body):
    return parse_chat({"model": "mistral-7b", "messages": HI, **body}, headers or {}, cfg)


def completion(headers: dict[str, str] | None = None, **body):
    return parse_completion({"model": "mistral-7b", "prompt": "hi", **body}, headers or {}, CFG)


def param_of(fn, *args, **kwargs) -> str | None:
    with pytest.raises(OpenAIError) as e:
        fn(*args, **kwargs)
    assert e.value.status == 400, e.value.body()
    body = e.value.body()["error"]
    assert body["type"] == "invalid_request_error" and body["code"] is None
    return body["param"]


# --- the router request -----------------------------------------------------------------------
def test_chat_becomes_one_router_request_with_the_plain_template():
    call = chat(max_tokens=8, temperature=0.5, top_p=0.9, seed=3, stop=["\n"])
    assert call.prompt == "user: hi\nassistant: "
    assert call.sampling == {"max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["\n"]}  # fmt: skip
    f = call.fields()
    assert f["text_input"] == call.prompt and f["model"] == "mistral-7b" and f["stream"] is True
    assert json.loads(f["sampling_parameters"]) == call.sampling
    assert f["return_num_input_tokens"] and f["return_num_output_tokens"]
    assert f["return_finish_reason"]
    assert "slo_class" not in f and "ttft_slo_s" not in f  # the router's default class


def test_max_completion_tokens_wins_and_errors_name_the_field_used():
    assert chat(max_tokens=5, max_completion_tokens=7).sampling["max_tokens"] == 7
    assert param_of(chat, max_completion_tokens=0) == "max_completion_tokens"
    assert param_of(chat, max_tokens=0) == "max_tokens"
    assert chat(max_completion_tokens=7).params["max_tokens"] == "max_completion_tokens"


def test_chat_without_max_tokens_gets_the_rest_of_the_context():
    call = chat()
    assert call.sampling["max_tokens"] == 8192 - count_prompt_tokens(call.prompt)
    capped = FrontConfig(FLEET, default_max_tokens=100)
    assert chat(cfg=capped).sampling["max_tokens"] == 100


def test_completions_default_to_16_tokens_and_echo():
    call = completion(echo=True)
    assert call.sampling == {"max_tokens": 16} and call.echo == "hi" and call.kind == "completion"
    assert completion(prompt=["one prompt"]).prompt == "one prompt"


def test_vllm_sampling_extras_pass_through_typed():
    call = chat(
        max_tokens=9, ignore_eos=True, min_tokens=9, top_k=5, min_p=0.1, repetition_penalty=1.1
    )
    assert call.sampling["ignore_eos"] is True and call.sampling["min_tokens"] == 9
    assert call.sampling["top_k"] == 5 and call.sampling["repetition_penalty"] == 1.1
    assert param_of(chat, ignore_eos="yes") == "ignore_eos"
    assert param_of(chat, seed="7") == "seed"
    assert param_of(chat, stop=5) == "stop"
    assert param_of(chat, max_tokens=4, min_tokens=5) == "min_tokens"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"add_generation_prompt": "no"}, "add_generation_prompt"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
        ),
        ({"model": None}, "model"),
        ({"service_tier": "scale"}, "service_tier"),
        ({"priority": "high"}, "priority"),
    ],
)
def test_bad_chat_input_names_the_field(body, param):
    assert param_of(chat, **body) == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [[1, 2]]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"logprobs": 1}, "logprobs"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "!"}, "suffix"),
        ({"echo": "yes"}, "echo"),
        ({"n": 3}, "n"),
    ],
)
def test_bad_completion_input_names_the_field(body, param):
    assert param_of(completion, **body) == param


def test_accepted_defaults_and_ignored_fields():
    call = chat(
        max_tokens=4, logprobs=False, top_logprobs=0, tools=[], tool_choice="auto", n=1,
        response_format={"type": "text"}, user="u", metadata={"a": "b"}, store=False,
    )  # fmt: skip
    assert call.sampling == {"max_tokens": 4}
    assert completion(logprobs=None, best_of=1, suffix=None).sampling == {"max_tokens": 16}


def test_stream_options():
    call = chat(stream=True, stream_options={"include_usage": True})
    assert call.stream and call.include_usage and not call.continuous_usage
    call = completion(stream=True, stream_options={"continuous_usage_stats": True})
    assert call.continuous_usage and not call.include_usage


def test_messages_with_text_parts_and_empty_assistant_content():
    msgs = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
        },  # fmt: skip
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "again"},
    ]
    call = chat(messages=msgs, max_tokens=2)
    assert call.prompt == "system: be brief\nuser: hi\nassistant: \nuser: again\nassistant: "
    assert chat(messages=HI, add_generation_prompt=False, max_tokens=2).prompt == "user: hi\n"


def test_the_context_is_checked_before_anything_is_queued():
    long = [{"role": "user", "content": "x" * 4 * 4096}]
    with pytest.raises(OpenAIError) as e:
        parse_chat({"model": "llama-2-13b", "messages": long}, {}, CFG)
    assert e.value.body()["error"]["param"] == "messages"
    assert "maximum context length is 4096" in e.value.message
    assert param_of(chat, max_tokens=8192) == "max_tokens"
    prompt = "x" * 4 * 8190
    assert param_of(completion, prompt=prompt) == "prompt"  # the default 16 tokens do not fit
    assert param_of(completion, prompt=prompt, max_tokens=4) == "max_tokens"


def test_unknown_model_is_404_and_a_missing_one_400():
    with pytest.raises(OpenAIError) as e:
        chat(model="gpt-4o")
    assert e.value.status == 404
    assert e.value.body()["error"] == {
        "message": e.value.message,
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    with pytest.raises(OpenAIError) as e:
        parse_chat({"messages": HI}, {}, CFG)
    assert e.value.status == 400 and e.value.param == "model"


def test_body_must_be_a_json_object():
    assert parse_body(b'{"a": 1}') == {"a": 1}
    for raw in (b"{", b"[1]", b"\xff"):
        with pytest.raises(OpenAIError) as e:
            parse_body(raw)
        assert e.value.status == 400


# --- SLO classes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("headers", "body", "slo_class", "source"),
    [
        ({}, {}, None, "default"),
        (
            {"x-slo-class": "batch-2"},
            {"service_tier": "flex", "priority": 0},
            "batch-2",
            "x-slo-class",
        ),  # fmt: skip
        ({}, {"service_tier": "flex", "priority": 0}, "batch-1", "service_tier"),
        ({}, {"service_tier": "default"}, "interactive", "service_tier"),
        ({}, {"service_tier": "auto"}, "interactive", "service_tier"),
        ({}, {"priority": -5}, "interactive", "priority"),
        ({}, {"priority": 0}, "interactive", "priority"),
        ({}, {"priority": 1}, "batch-1", "priority"),
        ({}, {"priority": 2}, "batch-2", "priority"),
        ({}, {"priority": 99}, "batch-2", "priority"),
    ],
)
def test_slo_class_resolution(headers, body, slo_class, source):
    choice = resolve_slo(headers, body, SloMapping(), FLEET.classes)
    assert (choice.slo_class, choice.source, choice.ttft_slo_s) == (slo_class, source, None)


def test_ttft_header_overrides_the_deadline_and_reaches_the_router():
    call = chat({"x-slo-class": "batch-1", "x-ttft-slo-s": "2.5"}, max_tokens=2)
    assert call.fields()["slo_class"] == "batch-1" and call.fields()["ttft_slo_s"] == 2.5
    for bad in ("0", "-1", "soon", "nan", "inf"):
        assert param_of(chat, {"x-ttft-slo-s": bad}) == "x-ttft-slo-s"
    assert param_of(chat, {"x-slo-class": "gold"}) == "x-slo-class"
    assert chat({"x-slo-class": "batch-2"}).params["slo_class"] == "x-slo-class"


def test_slo_mapping_file_and_flags(tmp_path):
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"service_tier": {"flex": "batch-2"}, "priority": {"0": "interactive", "5": "batch-1"}}))  # fmt: skip
    m = load_slo_mapping(f, ["scale=batch-1"], ["10=batch-2"])
    assert dict(m.service_tier) == {"flex": "batch-2", "scale": "batch-1"}  # the file's table
    assert [m.class_for_priority(p) for p in (-1, 4, 5, 9, 10)] == [
        "interactive", "interactive", "batch-1", "batch-1", "batch-2",
    ]  # fmt: skip
    assert m.as_json()["priority"] == {"0": "interactive", "5": "batch-1", "10": "batch-2"}
    with pytest.raises(SloConfigError):
        load_slo_mapping(None, ["flex"])
    with pytest.raises(SloConfigError):
        load_slo_mapping(None, [], ["high=batch-1"])
    f.write_text(json.dumps({"tiers": {}}))
    with pytest.raises(SloConfigError):
        load_slo_mapping(f)
    with pytest.raises(SloConfigError, match="unknown class 'gold'"):
        FrontConfig(FLEET, slo=load_slo_mapping(None, ["flex=gold"]))


# --- configuration and templates --------------------------------------------------------------
def test_the_front_serves_the_routers_fleet():
    fleet = router_fleet(ROOT / "model_repository", "qlm")
    assert dict(fleet.models) == {"mistral-7b": 8192, "llama-2-13b": 4096}
    assert set(fleet.classes) == {"interactive", "batch-1", "batch-2"}
    assert fleet.default_class == "interactive"
    vllm = router_fleet(ROOT / "model_repository", "qlm", ROOT / "model_repository/fleet-vllm.json")
    assert "tiny-llama" in vllm.models
    with pytest.raises(FrontConfigError):
        router_fleet(ROOT / "model_repository", "qlm", ROOT / "nope.json")


def test_plain_template():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert PlainTemplate().render(msgs, True) == "system: s\nuser: u\nassistant: "
    assert PlainTemplate().render(msgs, False) == "system: s\nuser: u\n"


def test_a_local_tokenizers_chat_template(tmp_path):
    source = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": source, "bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    )
    tpl = load_tokenizer_template(tmp_path)
    assert tpl is not None
    assert tpl.render(HI, True) == "<s>[user]hi</s>[assistant]"
    cfg = FrontConfig(FLEET, templates={"mistral-7b": tpl})
    assert chat(cfg=cfg, max_tokens=2).prompt == "<s>[user]hi</s>[assistant]"
    assert chat(cfg=cfg, model="llama-2-13b", max_tokens=2).prompt == "user: hi\nassistant: "
    tool = [{"role": "tool", "content": "x"}]
    assert param_of(chat, cfg=cfg, messages=tool, max_tokens=2) == "messages"
    with pytest.raises(FrontConfigError):
        FrontConfig(FLEET, templates={"gpt-4o": tpl})


def test_named_templates_jinja_files_and_none(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "default", "template": "D"},
                    {"name": "x", "template": "X"},
                ]
            }
        )  # fmt: skip
    )
    assert load_tokenizer_template(tmp_path).render(HI, True) == "D"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert load_tokenizer_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_tokenizer_template(tmp_path).render(HI, True) == "hi"
    with pytest.raises(TemplateError):
        load_tokenizer_template(tmp_path / "missing")
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(TemplateError):
        load_tokenizer_template(tmp_path)


# --- the router's errors ----------------------------------------------------------------------
SHED = (
    "qlm: request shed: deadline in 2.0 s cannot be met (first token in ~9.3 s behind the work "
    "queued ahead of it; best P(meet) 0.000)"
)


def test_a_shed_request_is_429_with_retry_after():
    e = from_router(SHED, None, {})
    assert e.status == 429 and e.headers == {"Retry-After": "8"}
    assert e.body()["error"]["code"] == "rate_limit_exceeded" and "request shed" in e.message
    assert retry_after_s("request shed: no instance serves it", 1.0, 300.0) == 1
    assert retry_after_s("deadline in 1.0 s cannot be met (first token in ~9999 s", 1.0, 300.0) == 300  # fmt: skip
    assert retry_after_s("deadline in 1.0 s cannot be met (first token in ~0.2 s", 1.0, 300.0) == 1  # fmt: skip


def test_router_field_errors_name_the_request_field():
    params = {"text_input": "messages", "max_tokens": "max_completion_tokens"}
    e = from_router("qlm: text_input: is 2000000 bytes; the limit is 1048576", None, params)
    assert (e.status, e.param, e.message) == (400, "messages", "is 2000000 bytes; the limit is 1048576")  # fmt: skip
    e = from_router("qlm: max_tokens: must be >= 1, got 0", None, params)
    assert (e.status, e.param) == (400, "max_completion_tokens")
    e = from_router("qlm: temperature: must be in [0.0, 100.0], got -1", None, params)
    assert (e.status, e.param) == (400, "temperature")
    e = from_router("qlm: model: unknown model 'x'; served models: mistral-7b", None, params)
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")


@pytest.mark.parametrize(
    ("message", "status", "http"),
    [
        ("qlm: the router is unloading", None, 503),
        ("failed to connect to all addresses", "UNAVAILABLE", 503),
        ("the router's stream ended without a final response", "INCOMPLETE", 503),
        ("Request for unknown model: 'qlm' is not found", "NOT_FOUND", 503),
        # The router held unloaded by qlm-serve's supervisor, or its stub dead (stream errors).
        ("Request for unknown model: 'qlm' has no available versions", None, 503),
        ("Stub process 'qlm_0_0' is not healthy.", None, 503),
        ("qlm: engine failed: boom", None, 500),
        ("bad tensor", "INVALID_ARGUMENT", 400),
    ],
)
def test_other_router_errors(message, status, http):
    e = from_router(message, status, {})
    assert e.status == http
    assert e.body()["error"]["type"] == ("server_error" if http >= 500 else "invalid_request_error")


# --- size caps --------------------------------------------------------------------------------
CAPPED = FrontConfig(FLEET, max_messages=3, max_prompt_bytes=64, max_tokens_limit=100, max_stop=2)


def test_size_caps_are_400s_naming_the_parameter():
    many = [{"role": "user", "content": "hi"}] * 4
    assert param_of(chat, cfg=CAPPED, messages=many) == "messages"
    assert param_of(chat, cfg=CAPPED, messages=[{"role": "user", "content": "é" * 40}]) == "messages"  # fmt: skip
    big = {"model": "mistral-7b", "prompt": "x" * 65}
    assert param_of(parse_completion, big, {}, CAPPED) == "prompt"
    assert param_of(chat, cfg=CAPPED, max_tokens=101) == "max_tokens"
    assert param_of(chat, cfg=CAPPED, max_completion_tokens=101) == "max_completion_tokens"
    assert param_of(chat, cfg=CAPPED, stop=["a", "b", "c"]) == "stop"
    assert param_of(chat, cfg=CAPPED, stop_token_ids=[1, 2, 3]) == "stop_token_ids"
    with pytest.raises(OpenAIError) as e:
        chat(cfg=CAPPED, messages=many)
    assert e.value.message == "messages has 4 messages; this server allows at most 3"
    with pytest.raises(OpenAIError) as e:
        parse_completion(big, {}, CAPPED)
    assert e.value.message == "prompt is 65 bytes; this server allows at most 64"


def test_at_the_caps_a_request_passes_and_a_default_max_tokens_is_capped_not_refused():
    three = [{"role": "user", "content": "hi"}] * 3
    call = chat(cfg=CAPPED, messages=three[:1], max_tokens=100, stop=["a", "b"])
    assert call.sampling["max_tokens"] == 100
    assert chat(cfg=CAPPED).sampling["max_tokens"] == 100  # the rest of the context, capped
    assert len(chat(cfg=CAPPED, messages=three).prompt.encode()) <= 64
    # Defaults: OpenAI's 2048 messages, the router's 1 MiB prompt, 16 stop entries, 4 MiB body.
    assert (CFG.max_messages, CFG.max_prompt_bytes, CFG.max_stop) == (2048, 1 << 20, 16)
    assert CFG.max_body_bytes == 4 << 20 and CFG.max_tokens_limit is None
    assert chat(messages=[{"role": "user", "content": "x"}] * 2048).prompt
    assert param_of(chat, messages=[{"role": "user", "content": "x"}] * 2049) == "messages"


@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("max_body_bytes", "--max-body-bytes"),
        ("max_messages", "--max-messages"),
        ("max_prompt_bytes", "--max-prompt-bytes"),
        ("max_tokens_limit", "--max-tokens-limit"),
        ("max_stop", "--max-stop"),
    ],
)
def test_cap_settings_must_be_positive(field, flag):
    with pytest.raises(FrontConfigError, match=f"^{flag} must be >= 1, got 0$"):
        FrontConfig(FLEET, **{field: 0})


def test_a_body_nested_past_the_parser_is_a_400():
    with pytest.raises(OpenAIError) as e:
        parse_body(b"[" * 100_000)
    assert e.value.status == 400 and "nested too deeply" in e.value.message


def test_a_full_router_queue_is_503_with_retry_after_and_a_timeout_is_504():
    full = (
        "qlm: request refused: the router's queue is full (3 requests pending, queued or in "
        "engines; max_pending_requests is 3)"
    )
    e = from_router(full, None, {}, retry_default_s=2.0)
    assert (e.status, e.code, e.headers) == (503, "queue_full", {"Retry-After": "2"})
    assert "max_pending_requests is 3" in e.message and e.type == "server_error"
    e = from_router("qlm: request timed out: not finished 600 s after receipt (request_timeout_s)", None, {})  # fmt: skip
    assert (e.status, e.code) == (504, "timeout") and "request_timeout_s" in e.message
