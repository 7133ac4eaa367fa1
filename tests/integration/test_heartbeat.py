"""Heartbeats on a real server: a stream that asked (`qlm_heartbeat_s`) and waits behind other work
gets empty responses (no text, 0 tokens) until its first token, then its text whole; a stream that
did not ask gets none. qlm-openai relies on them to tell a router that drains during a reload from
a dead one (docs/reliability.md).

Behind `fcfs-test` (one mistral-7b instance taking 4 requests, ten times real time): four long
requests fill the instance, so the next ones wait ~2 s of wall time for a slot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import tritonclient.grpc.aio as grpcaio
from streams import is_final, make_inputs

from qlm_backend.client import GrpcClient, HttpClient, Request, Result

# A hang fails the test instead of stalling the whole run (a clean clone hung 20 minutes here
# after a failure in test_faults.py, 2026-12-03).
pytestmark = pytest.mark.timeout(180)

ROUTER = "fcfs-test"
T = TypeVar("T")


def fields(max_tokens: int, text: str, **extra: Any) -> dict[str, Any]:
    return {
        "text_input": text,
        "model": "mistral-7b",
        "slo_class": "batch-1",
        "stream": True,
        "sampling_parameters": json.dumps({"max_tokens": max_tokens, "ignore_eos": True}),
        "return_num_output_tokens": True,
        "return_finish_reason": True,
        **extra,
    }


@dataclass
class Seen:
    """Every response of one stream: (text, tokens, finish_reason), and the error if one came."""

    responses: list[tuple[str, int, str]] = field(default_factory=list)
    error: str | None = None
    first_token: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def stream(client: Any, f: dict[str, Any], seen: Seen) -> Seen:
    async def requests():
        yield {"model_name": ROUTER, "inputs": make_inputs(f)}
        await seen.stop.wait()

    it = client.stream_infer(inputs_iterator=requests())
    try:
        async for result, error in it:
            if error is not None:
                seen.error = str(error)
                break
            text = b"".join(result.as_numpy("text_output").reshape(-1)).decode()
            n = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
            reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
            seen.responses.append((text, n, reason))
            if n > 0:
                seen.first_token.set()
            if is_final(result):
                break
            if seen.stop.is_set():
                it.cancel()
                break
    finally:
        seen.stop.set()
    return seen


async def behind_four_fillers(url: str, then: Callable[[Any], Awaitable[T]]) -> T:
    """`then(client)` while four long requests fill the instance."""
    client = grpcaio.InferenceServerClient(url)
    fillers = [Seen() for _ in range(4)]
    tasks = [
        asyncio.create_task(stream(client, fields(600, f"filler {i}"), s))
        for i, s in enumerate(fillers)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(s.first_token.wait() for s in fillers)), 30)
        return await then(client)
    finally:
        for s in fillers:
            s.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


async def asked_and_plain(client: Any) -> tuple[Seen, Seen]:
    asked, plain = Seen(), Seen()
    await asyncio.gather(
        stream(client, fields(8, "asked", qlm_heartbeat_s=0.2), asked),
        stream(client, fields(8, "plain"), plain),
    )
    return asked, plain


def test_a_waiting_stream_that_asked_gets_empty_heartbeats_then_its_text(triton):
    asked, plain = asyncio.run(behind_four_fillers(triton.grpc_url, asked_and_plain))
    assert asked.error is None and plain.error is None, (asked.error, plain.error)
    first = next(i for i, r in enumerate(asked.responses) if r[1] > 0)
    beats = asked.responses[:first]
    # ~2 s of waiting at one heartbeat per 0.2 s: at least a few, each empty and not the end.
    assert len(beats) >= 3, asked.responses
    assert all(b == ("", 0, "None") for b in beats), beats
    # After them, the request's own responses: 8 tokens, ending for its length.
    assert sum(r[1] for r in asked.responses) == 8
    assert asked.responses[-1][2] == "length"
    # The stream that did not ask waited as long and got no empty response.
    assert plain.responses and all(r[1] > 0 for r in plain.responses), plain.responses
    assert sum(r[1] for r in plain.responses) == 8


def test_qlm_client_with_heartbeats_waits_them_out_and_completes(triton):
    """The sync gRPC and HTTP clients skip the heartbeats: the same text and tokens as without."""
    req = Request("hb", model="mistral-7b", slo_class="batch-1", max_tokens=8, ignore_eos=True,
                  router=ROUTER, heartbeat_s=0.2)  # fmt: skip

    async def both(_client: Any) -> list[Result]:
        def one(c: Any) -> Result:
            try:
                return c.generate(req)
            finally:
                c.close()

        return await asyncio.gather(
            asyncio.to_thread(one, GrpcClient(triton.grpc_url, timeout_s=60)),
            asyncio.to_thread(one, HttpClient(triton.http_url, timeout_s=60)),
        )

    results = asyncio.run(behind_four_fillers(triton.grpc_url, both))
    for r in results:
        assert r.ok and r.tokens == 8 and r.finish_reason == "length", r.summary()
        # it waited ~2 s for a slot: heartbeats (0.2 s) came before its tokens, as responses
        assert r.responses - len(r.token_times_s) >= 3, r
