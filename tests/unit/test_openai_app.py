"""qlm-openai's app against a scripted router (no Triton): response and chunk shapes, usage,
statuses before and after a stream has begun, the API key, and that a client that leaves cancels
the router's stream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from qlm_backend.openai_front.app import create_app
from qlm_backend.openai_front.config import Fleet, FrontConfig
from qlm_backend.openai_front.upstream import Piece, RouterError

FLEET = Fleet(
    {"mistral-7b": 8192},
    {"interactive": 20.0, "batch-1": 60.0, "batch-2": 3600.0},
    "interactive",
    Path("fleet.json"),
)
HANG = "hang"  # a script item: the router says nothing more
SHED = "qlm: request shed: deadline in 1.0 s cannot be met (first token in ~4.5 s behind the work"


def pieces(n: int, reason: str = "length") -> list[Any]:
    out: list[Any] = [Piece(f"w{i} ", 1, 7 if i == 0 else None) for i in range(n)]
    out.append(Piece("", 0, None, reason, True, 0.25, "a10-0"))
    return out


class FakeStream:
    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.cancelled = self.finished = False

    async def get(self) -> Piece:
        await asyncio.sleep(0)
        item = self.script.pop(0) if self.script else HANG
        if item == HANG:
            await asyncio.Event().wait()
        if isinstance(item, float):
            await asyncio.sleep(item)
            item = self.script.pop(0)
        if isinstance(item, RouterError):
            self.finished = True
            raise item
        self.finished = item.final
        return item

    def cancel(self) -> None:
        self.cancelled = not self.finished


class FakeRouter:
    script: list[Any] = []
    opened: list[tuple[dict[str, Any], FakeStream]] = []

    def __init__(self, url: str, router: str) -> None:
        pass

    def open(self, fields: dict[str, Any]) -> FakeStream:
        s = FakeStream(FakeRouter.script)
        FakeRouter.opened.append((fields, s))
        return s

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


@pytest.fixture
def client():
    FakeRouter.opened = []
    app = create_app(FrontConfig(FLEET, api_key="k", status_wait_s=0.5), FakeRouter)
    with TestClient(app, headers={"Authorization": "Bearer k"}) as c:
        yield c


def events(text: str) -> list[Any]:
    data = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def post(client, path: str, script: list[Any], headers: dict[str, str] | None = None, **body):
    FakeRouter.script = script
    return client.post(path, json={"model": "mistral-7b", **body}, headers=headers or {})


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_chat_answer_and_usage(client):
    r = post(client, "/v1/chat/completions", pieces(3), {"x-slo-class": "batch-1"}, **CHAT)
    assert r.status_code == 200 and r.headers["x-qlm-slo-class"] == "batch-1"
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "w0 w1 w2 "}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert body["qlm"] == {"slo_class": "batch-1", "queue_s": 0.25, "instance": "a10-0"}
    fields, _ = FakeRouter.opened[-1]
    assert fields["slo_class"] == "batch-1" and fields["text_input"] == "user: hi\nassistant: "


def test_chat_stream_with_usage(client):
    r = post(
        client, "/v1/chat/completions", pieces(2, "stop"), stream=True,
        stream_options={"include_usage": True}, **CHAT,
    )  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = events(r.text)
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"].get("content") for e in ev[1:3]] == ["w0 ", "w1 "]
    assert ev[3]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}  # fmt: skip
    assert all(e["usage"] is None for e in ev[:-1])
    assert ev[-1]["choices"] == [] and ev[-1]["usage"]["completion_tokens"] == 2
    assert len({e["id"] for e in ev}) == 1


def test_completion_stream_with_echo_and_continuous_usage(client):
    r = post(
        client, "/v1/completions", pieces(2), prompt="hi", echo=True, stream=True,
        stream_options={"continuous_usage_stats": True},
    )  # fmt: skip
    ev = events(r.text)
    assert [e["choices"][0]["text"] for e in ev] == ["hi", "w0 ", "w1 ", ""]
    assert ev[-1]["choices"][0]["finish_reason"] == "length"
    assert [e["usage"] and e["usage"]["completion_tokens"] for e in ev] == [None, 1, 2, 2]
    r = post(client, "/v1/completions", pieces(2), prompt="hi", echo=True)
    assert r.json()["choices"][0]["text"] == "hiw0 w1 " and r.json()["object"] == "text_completion"


def test_a_refusal_before_the_first_token_has_its_own_status(client):
    for stream in (False, True):
        r = post(client, "/v1/chat/completions", [RouterError(SHED)], stream=stream, **CHAT)
        assert r.status_code == 429 and r.headers["retry-after"] == "4"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    bad = RouterError("qlm: text_input: is 2000000 bytes; the limit is 1048576")
    r = post(client, "/v1/chat/completions", [bad], stream=True, **CHAT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(client, "/v1/completions", [RouterError("down", "UNAVAILABLE")], prompt="hi")
    assert r.status_code == 503


def test_an_error_after_the_stream_began_is_an_error_event(client):
    # The router is silent past status_wait_s (0.5 s): the stream starts, the error comes inside.
    script = [0.8, RouterError(SHED)]
    r = post(client, "/v1/chat/completions", script, stream=True, **CHAT)
    assert r.status_code == 200
    ev = events(r.text)
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    assert ev[-1]["error"]["code"] == "rate_limit_exceeded"
    r = post(client, "/v1/completions", [*pieces(1)[:1], RouterError("qlm: engine failed")], prompt="hi", stream=True)  # fmt: skip
    ev = events(r.text)
    assert ev[0]["choices"][0]["text"] == "w0 " and ev[-1]["error"]["type"] == "server_error"


def test_api_key(client):
    FakeRouter.script = pieces(1)
    for headers, code in (({"Authorization": "Bearer nope"}, "invalid_api_key"), ({"Authorization": ""}, None)):  # fmt: skip
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == code
    r = client.post(
        "/v1/completions", json={"model": "x"}, headers={"Authorization": "Bearer nope"}
    )
    assert r.status_code == 401
    assert client.get("/health", headers={"Authorization": ""}).json()["status"] == "ok"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["mistral-7b"]
    assert client.get("/v1/models/mistral-7b").json()["max_model_len"] == 8192
    assert client.get("/v1/models/nope").status_code == 404
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


async def call_and_leave(app, body: dict[str, Any], leave_after_s: float) -> list[dict[str, Any]]:
    """Call the ASGI app directly; the client disconnects after `leave_after_s`."""
    sent: list[dict[str, Any]] = []
    raw = json.dumps(body).encode()
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(leave_after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"",
        "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 9000),
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_the_router_stream(stream):
    FakeRouter.opened = []
    FakeRouter.script = [Piece("w0 ", 1, 7), HANG]
    app = create_app(FrontConfig(FLEET), FakeRouter)

    async def run() -> list[dict[str, Any]]:
        async with app.router.lifespan_context(app):
            return await call_and_leave(app, {"model": "mistral-7b", "stream": stream, **CHAT}, 0.2)

    sent = asyncio.run(run())
    _, s = FakeRouter.opened[-1]
    assert s.cancelled
    if stream:  # the stream had begun: its first token went out before the client left
        assert sent[0]["status"] == 200 and b"w0" in b"".join(m.get("body", b"") for m in sent)


def test_a_body_over_the_cap_is_413_before_the_router_sees_anything():
    FakeRouter.opened = []
    cfg = FrontConfig(FLEET, api_key="k", max_body_bytes=1000)
    with TestClient(create_app(cfg, FakeRouter), headers={"Authorization": "Bearer k"}) as c:
        FakeRouter.script = pieces(1)
        big = {"model": "mistral-7b", "messages": [{"role": "user", "content": "x" * 2000}]}
        r = c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "request_too_large" and "at most 1000" in err["message"]
        raw = json.dumps(big).encode()
        chunked = c.post(  # no Content-Length: refused once the bytes read pass the cap
            "/v1/completions", content=(raw[i : i + 256] for i in range(0, len(raw), 256))
        )
        assert chunked.status_code == 413 and "over 1000" in chunked.json()["error"]["message"]
        assert FakeRouter.opened == []
        ok = c.post("/v1/chat/completions", json={**CHAT, "model": "mistral-7b"})
        assert ok.status_code == 200  # the connection and the app serve on


def test_a_full_router_queue_is_503_with_retry_after_streamed_or_not(client):
    full = RouterError(
        "qlm: request refused: the router's queue is full (3 requests pending, queued or in "
        "engines; max_pending_requests is 3)"
    )
    for stream in (False, True):
        r = post(client, "/v1/chat/completions", [full], stream=stream, **CHAT)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
