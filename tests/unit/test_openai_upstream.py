"""qlm-openai's router client ends its open streams when the router goes down (upstream.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from qlm_backend.openai_front.upstream import RouterClient, RouterError

FIELDS = {"text_input": "hi", "model": "mistral-7b", "stream": True}


class SilentCall:
    """A gRPC stream whose router died: nothing ever comes."""

    def __init__(self) -> None:
        self.cancelled = False
        self._never = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled = True
        self._never.set()

    def __aiter__(self) -> AsyncIterator[tuple[Any, Any]]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[tuple[Any, Any]]:
        await self._never.wait()
        raise asyncio.CancelledError
        yield  # pragma: no cover - makes this an async generator


class Result:
    """A tritonclient InferResult of the router's: outputs by name and the final flag."""

    def __init__(self, text: str, tokens: int, final: bool = False) -> None:
        self.outputs = {
            "text_output": np.array([text.encode()], dtype=np.object_),
            "num_output_tokens": np.array([tokens], dtype=np.uint32),
        }
        self.final = final

    def as_numpy(self, name: str) -> Any:
        return self.outputs.get(name)

    def get_response(self) -> Any:
        flag = SimpleNamespace(bool_param=self.final)
        return SimpleNamespace(parameters={"triton_final_response": flag})


class DrainingCall(SilentCall):
    """A router that drains (reloaded through the repository API): the request waits in its queue
    and gets only heartbeats, then a token and its final response."""

    async def _gen(self) -> AsyncIterator[tuple[Any, Any]]:
        for _ in range(20):  # 0.2 s of heartbeats, far past the client's silence limit (0.06 s)
            await asyncio.sleep(0.01)
            yield Result("", 0), None
        yield Result("hello", 1), None
        yield Result("", 0, final=True), None


class FakeServer:
    def __init__(self, readiness: list[bool | Exception], call: type[SilentCall]) -> None:
        self.readiness, self.calls, self.call = readiness, [], call
        self.requests: list[dict[str, Any]] = []

    def stream_infer(self, inputs_iterator: Any) -> SilentCall:
        call = self.call()
        self.calls.append(call)
        self.inputs_iterator = inputs_iterator
        return call

    async def is_model_ready(self, model: str) -> bool:
        r = self.readiness.pop(0) if len(self.readiness) > 1 else self.readiness[0]
        if isinstance(r, Exception):
            raise r
        return r

    async def close(self) -> None:
        return None


def client(
    readiness: list[bool | Exception], call: type[SilentCall] = SilentCall
) -> tuple[RouterClient, FakeServer]:
    c = RouterClient("127.0.0.1:1", watch_s=0.01, heartbeat_s=0.02)
    fake = FakeServer(readiness, call)
    c._client = fake
    return c, fake


def test_open_streams_end_with_unavailable_once_the_router_is_not_ready_twice() -> None:
    async def main() -> None:
        c, fake = client([True, False, False])
        streams = [c.open(FIELDS) for _ in range(3)]
        for s in streams:
            with pytest.raises(RouterError) as e:
                await asyncio.wait_for(s.get(), timeout=2)
            assert e.value.status == "UNAVAILABLE" and "went down" in e.value.message
        assert all(call.cancelled for call in fake.calls) and c.abandoned == 3
        await c.close()

    asyncio.run(main())


def test_one_not_ready_answer_or_failed_calls_end_nothing() -> None:
    async def main() -> None:
        # A blip, then a busy server whose readiness calls fail: no answer, not "down".
        c, fake = client([False, True, RuntimeError("deadline"), RuntimeError("deadline")])
        s = c.open(FIELDS)
        await asyncio.sleep(0.2)
        assert not s.finished and not fake.calls[0].cancelled and c.abandoned == 0
        s.cancel()
        await c.close()

    asyncio.run(main())


def test_a_draining_router_s_heartbeats_keep_its_streams_and_never_reach_the_reader() -> None:
    async def main() -> None:
        c, fake = client([False], DrainingCall)  # not ready at once: the router is unloading
        s = c.open(FIELDS)
        first = await asyncio.wait_for(s.get(), timeout=2)
        final = await asyncio.wait_for(s.get(), timeout=2)
        # the heartbeats (empty, 0 tokens) are not pieces: the reader sees the token, then the end
        assert (first.text, first.tokens, first.final) == ("hello", 1, False)
        assert final.final and c.abandoned == 0 and not fake.calls[0].cancelled
        await c.close()

    asyncio.run(main())


def test_every_stream_asks_the_router_for_heartbeats() -> None:
    async def main() -> None:
        c, fake = client([True])
        s = c.open(FIELDS)
        request = await anext(fake.inputs_iterator)
        names = {i.name(): i for i in request["inputs"]}
        assert "qlm_heartbeat_s" in names and c.heartbeat_s == 0.02
        s.cancel()
        await c.close()

    asyncio.run(main())


def test_a_dead_router_s_streams_end_even_once_a_new_router_is_ready() -> None:
    async def main() -> None:
        # The supervisor holds the dead router unloaded ~1 s, then a new one is ready: the old
        # streams stay silent, and that is what counts.
        c, fake = client([True, False, False, True])
        s = c.open(FIELDS)
        with pytest.raises(RouterError) as e:
            await asyncio.wait_for(s.get(), timeout=2)
        assert "went down" in e.value.message and fake.calls[0].cancelled and c.abandoned == 1
        await c.close()

    asyncio.run(main())
