"""qlm-openai's router client ends its open streams when the router goes down (upstream.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

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


class FakeServer:
    def __init__(self, readiness: list[bool | Exception]) -> None:
        self.readiness, self.calls = readiness, []

    def stream_infer(self, inputs_iterator: Any) -> SilentCall:
        call = SilentCall()
        self.calls.append(call)
        return call

    async def is_model_ready(self, model: str) -> bool:
        r = self.readiness.pop(0) if len(self.readiness) > 1 else self.readiness[0]
        if isinstance(r, Exception):
            raise r
        return r

    async def close(self) -> None:
        return None


def client(readiness: list[bool | Exception]) -> tuple[RouterClient, FakeServer]:
    c = RouterClient("127.0.0.1:1", watch_s=0.01)
    fake = FakeServer(readiness)
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
