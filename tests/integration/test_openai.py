"""qlm-openai, the OpenAI-compatible endpoint, driven by the official `openai` SDK against the real
`qlm` router of the session's tritonserver (the default fleet, real time).

qlm-openai runs as a subprocess on a free loopback port, in its own process group, stopped by that
group. What is shown: chat and completions, streamed and not, usage equal to the tokens received;
closing a stream (or dropping a non-streamed request) cancels the request in the router and its
engine (the router's `cancelled` outcome and the engine's abort counter); a request the router
sheds is a 429 with Retry-After; bad input a 400 naming the parameter; a request over a size cap
is refused before the router sees it; an unknown model a 404; a wrong API key a 401; the SLO class
mapping reaches the router.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from streams import metric_value

from qlm_backend.engine.tokens import count_prompt_tokens
from qlm_backend.openai_front.template import PlainTemplate
from qlm_backend.triton.server import free_port

KEY = "test-openai-key"
ROUTER = "qlm"
MISTRAL_ENGINES = ("mistral-7b__a10-0", "mistral-7b__a10-1", "mistral-7b__a100-0")
HI = [{"role": "user", "content": "hi"}]


@contextlib.contextmanager
def running_front(triton, log_path: Path, router: str, api_key: str | None) -> Iterator[str]:
    """qlm-openai for `router` on a free loopback port, in its own process group."""
    port = free_port()
    cmd = [sys.executable, "-m", "qlm_backend.openai_front", "--port", str(port)]
    cmd += ["--triton-grpc", triton.grpc_url, "--router", router, "--log-level", "warning"]
    cmd += ["--model-repository", str(triton.model_repository)]
    cmd += ["--api-key", api_key] if api_key else []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log_path.read_text()
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{url}/health", timeout=1) as r,
            ):
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, "qlm-openai not healthy in 30 s"
            time.sleep(0.1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    assert "Traceback" not in log_path.read_text(errors="replace"), log_path.read_text()


@pytest.fixture(scope="module")
def front(triton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """In front of `qlm`, the shipped router and fleet, with an API key."""
    log_path = tmp_path_factory.mktemp("openai") / "qlm-openai.log"
    with running_front(triton, log_path, ROUTER, KEY) as url:
        yield url


@pytest.fixture
def client(front: str) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{front}/v1", api_key=KEY, max_retries=0, timeout=60)
    yield c
    c.close()


def metrics(triton) -> str:
    with urllib.request.urlopen(triton.metrics_url) as r:
        return r.read().decode()


def outcomes(triton, slo_class: str, outcome: str) -> float:
    v = metric_value(metrics(triton), "qlm_requests_total", router=ROUTER, slo_class=slo_class, outcome=outcome)  # fmt: skip
    return v or 0.0


def aborts(triton) -> float:
    text = metrics(triton)
    return sum(
        metric_value(text, "vllm:request_success_total", model=e, finished_reason="abort") or 0.0
        for e in MISTRAL_ENGINES
    )


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_models_are_the_fleets(client):
    assert sorted(m.id for m in client.models.list()) == ["llama-2-13b", "mistral-7b"]
    assert client.models.retrieve("mistral-7b").id == "mistral-7b"


def test_chat_not_streamed_usage_counts_the_tokens(client):
    r = client.chat.completions.create(
        model="mistral-7b", messages=HI, max_tokens=12, extra_body={"ignore_eos": True}
    )
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    # Each simulated token is one word and a space: the usage equals what arrived.
    assert r.usage.completion_tokens == len(text.split()) == 12
    assert r.usage.prompt_tokens == count_prompt_tokens(PlainTemplate().render(HI, True))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.model_extra["qlm"]["instance"] and r.model_extra["qlm"]["slo_class"] == "interactive"


def test_chat_streamed_with_usage(client):
    stream = client.chat.completions.create(
        model="mistral-7b",
        messages=[{"role": "system", "content": "be brief"}, *HI],
        max_completion_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        seed=7,
        temperature=0.5,
        top_p=0.9,
        extra_body={"ignore_eos": True},
        extra_headers={"x-slo-class": "interactive"},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == len(text.split()) == 10


def test_completions_streamed_and_not(client):
    prompt = "Tell me about queues"
    r = client.completions.create(
        model="llama-2-13b", prompt=prompt, max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == len(r.choices[0].text.split()) == 8
    assert r.usage.prompt_tokens == count_prompt_tokens(prompt)
    chunks = list(
        client.completions.create(
            model="mistral-7b",
            prompt=prompt,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"min_tokens": 6},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == len(text.split()) == 6
    assert chunks[-1].usage.prompt_tokens == count_prompt_tokens(prompt)


def test_the_readme_curl_streams_sse_to_done(front):
    # The acceptance call, as curl sends it (a form Content-Type, no max_tokens).
    body = {"model": "mistral-7b", "messages": HI, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", int(front.rsplit(":", 1)[1]), timeout=60)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body),
        {
            "x-slo-class": "interactive",
            "Authorization": f"Bearer {KEY}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [ln[6:] for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
    conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip()


def test_closing_the_stream_cancels_the_request(client, triton, front):
    c0, a0 = outcomes(triton, "batch-1", "cancelled"), aborts(triton)
    stream = client.chat.completions.create(
        model="mistral-7b",
        messages=HI,
        max_tokens=4000,
        stream=True,
        service_tier="flex",  # -> batch-1
        extra_body={"ignore_eos": True},
    )
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got >= 3:
            break
    stream.close()
    assert wait_for(lambda: outcomes(triton, "batch-1", "cancelled") >= c0 + 1)
    assert wait_for(lambda: aborts(triton) >= a0 + 1)  # the engine aborted it too

    # A non-streamed request whose client gives up (a read timeout closes the connection).
    c1, a1 = outcomes(triton, "batch-1", "cancelled"), aborts(triton)
    host, port = front.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=1.0)
    body = {"model": "mistral-7b", "prompt": "long", "max_tokens": 4000, "ignore_eos": True}
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        {"Authorization": f"Bearer {KEY}", "x-slo-class": "batch-1"},
    )
    with pytest.raises(socket.timeout):
        conn.getresponse()
    conn.close()
    assert wait_for(lambda: outcomes(triton, "batch-1", "cancelled") >= c1 + 1)
    assert wait_for(lambda: aborts(triton) >= a1 + 1)


def test_a_shed_request_is_429_with_retry_after(triton, tmp_path_factory):
    """batch-2 is sheddable. Behind the test fleet's router (`qlm-test`, ten times real time), the
    one mistral-7b instance takes 4 requests at once: with 4 long ones running, a batch-2 request
    whose first token is due in 5 s cannot be served in time anywhere, and is shed at admission."""

    def rejected() -> float:
        v = metric_value(metrics(triton), "qlm_requests_total", router="qlm-test", slo_class="batch-2", outcome="rejected")  # fmt: skip
        return v or 0.0

    def shed_count() -> float:  # the same refusals by reason (queue_full is the other)
        return metric_value(metrics(triton), "qlm_rejected_total", router="qlm-test", reason="shed") or 0.0  # fmt: skip

    log_path = tmp_path_factory.mktemp("openai-test") / "qlm-openai.log"
    with running_front(triton, log_path, "qlm-test", None) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        fillers = []
        try:
            for i in range(4):
                s = c.completions.create(
                    model="mistral-7b",
                    prompt=f"filler {i}",
                    max_tokens=3000,
                    stream=True,
                    extra_body={"ignore_eos": True},
                    extra_headers={"x-slo-class": "batch-1"},
                )
                fillers.append(s)
                next(iter(s))  # its first token: it runs on the instance
            r0, s0 = rejected(), shed_count()
            shed = {"x-slo-class": "batch-2", "x-ttft-slo-s": "5"}
            for stream in (False, True):
                with pytest.raises(openai.RateLimitError) as e:
                    c.chat.completions.create(
                        model="mistral-7b",
                        messages=HI,
                        max_tokens=4,
                        stream=stream,
                        extra_headers=shed,
                    )
                assert int(e.value.response.headers["retry-after"]) >= 1
                assert "request shed" in e.value.body["message"]
                assert e.value.body["code"] == "rate_limit_exceeded"
            assert rejected() == r0 + 2 and shed_count() == s0 + 2
            # qlm-openai's own metrics (prometheus-client on /metrics): the two 429s by class and
            # model, and the fillers' times to first token.
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
                text = r.read().decode()
            mb = {"model": "mistral-7b", "slo_class": "batch-2", "code": "429"}
            assert metric_value(text, "qlm_openai_requests_total", **mb) == 2
            ttft = {"model": "mistral-7b", "slo_class": "batch-1"}
            assert (metric_value(text, "qlm_openai_ttft_seconds_count", **ttft) or 0) >= 4
        finally:
            for s in fillers:
                s.close()  # and so cancelled
            c.close()


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
        ({"messages": []}, "messages"),
        ({"stop": 5}, "stop"),
        ({"logprobs": True}, "logprobs"),
        ({"service_tier": "scale"}, "service_tier"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"extra_body": {"min_tokens": 9}, "max_tokens": 4}, "min_tokens"),
        ({"extra_headers": {"x-slo-class": "gold"}}, "x-slo-class"),
        ({"extra_headers": {"x-ttft-slo-s": "-1"}}, "x-ttft-slo-s"),
    ],
)
def test_bad_input_is_400_naming_the_parameter(client, kwargs, param):
    args = {"model": "mistral-7b", "messages": HI, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["code"] is None


def test_size_caps_refuse_before_the_router_while_a_stream_completes(client, triton):
    """The default caps (4 MiB body, 2048 messages, a 1 MiB prompt, 16 stop strings) are refused
    by qlm-openai itself: the router executes nothing for them, and a stream running meanwhile
    gets every token."""
    stream = client.chat.completions.create(
        model="mistral-7b",
        messages=HI,
        max_tokens=60,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)  # it runs
    given = metric_value(metrics(triton), "nv_inference_count", model=ROUTER)
    assert given is not None
    big = [{"role": "user", "content": "x" * (5 << 20)}]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="mistral-7b", messages=big, max_tokens=4)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    cases = [
        ({"messages": HI * 2049}, "messages", "2049 messages"),
        ({"messages": [{"role": "user", "content": "y" * (1 << 20)}]}, "messages", "bytes"),
        ({"stop": ["s"] * 17}, "stop", "17 entries"),
    ]
    for kwargs, param, what in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": "mistral-7b", "messages": HI, "max_tokens": 4, **kwargs})  # fmt: skip
        assert e.value.body["param"] == param and what in e.value.body["message"]
    assert metric_value(metrics(triton), "nv_inference_count", model=ROUTER) == given
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 60


def test_bad_completion_prompt_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="mistral-7b", prompt=["a", "b"], max_tokens=4)
    assert e.value.body["param"] == "prompt"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=4)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_wrong_api_key_is_401(front):
    wrong = openai.OpenAI(base_url=f"{front}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="mistral-7b", messages=HI, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    wrong.close()


@pytest.mark.parametrize(
    ("how", "slo_class"),
    [
        ({"service_tier": "flex"}, "batch-1"),
        ({"service_tier": "default"}, "interactive"),
        ({"extra_body": {"priority": 1}}, "batch-1"),
        ({"extra_body": {"priority": 5}}, "batch-2"),
        ({"extra_body": {"priority": -3}}, "interactive"),
        ({"extra_headers": {"x-slo-class": "batch-2"}, "service_tier": "flex"}, "batch-2"),
    ],
)
def test_slo_class_mapping_reaches_the_router(client, triton, how, slo_class):
    def served() -> float:
        return outcomes(triton, slo_class, "attained") + outcomes(triton, slo_class, "missed")

    s0 = served()
    raw = client.chat.completions.with_raw_response.create(
        model="mistral-7b", messages=HI, max_tokens=2, **how
    )
    assert raw.headers["x-qlm-slo-class"] == slo_class
    assert raw.parse().model_extra["qlm"]["slo_class"] == slo_class
    assert wait_for(lambda: served() == s0 + 1, 5.0)


def test_health_needs_no_key(front):
    with urllib.request.urlopen(f"{front}/health", timeout=5) as r:
        assert json.loads(r.read()) == {"status": "ok", "router": ROUTER}
