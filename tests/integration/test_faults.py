"""Faults through a real tritonserver: a killed engine stub, a reloaded router, clients that leave.

After each fault: no request lost (each completed or got an explicit error, and the router counted
an outcome for every one it accepted), nothing left queued in the router or running in an engine,
the engine's work for cancelled requests stopped, and the server still ready and serving.
(An engine unloaded mid-stream is in test_router.py, a remote engine server stopped mid-load in
test_fleet.py.) Fleets run at time_scale 0.1: one simulated second is 0.1 s of wall time.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc.aio as grpcaio
from conftest import ADMIN_KEY, QUICK_EXIT, TIME_SCALE
from streams import TimedStream, grpc_stream, metric_value, timed_stream

from qlm_backend.triton.repository import add_fleet
from qlm_backend.triton.server import TritonServer, admin_headers

pytestmark = pytest.mark.timeout(180)

FAULT_ROUTER = "faults"
FAULT_ENGINES = ("mistral-7b__fa-0", "mistral-7b__fa-1")
TEST_ENGINES = ("mistral-7b__q-a10-0",)


def fields(max_tokens: int, slo_class: str = "batch-1", text: str = "tell me a story") -> dict:
    return {
        "text_input": text,
        "model": "mistral-7b",
        "slo_class": slo_class,
        "sampling_parameters": json.dumps({"max_tokens": max_tokens, "ignore_eos": True}),
        "return_num_output_tokens": True,
        "return_finish_reason": True,
    }


def scrape(server: TritonServer) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        return r.read().decode()


def outcomes(text: str, router: str) -> float:
    """Every outcome the router has counted (attained, missed, rejected, cancelled, failed)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("qlm_requests_total{") and f'router="{router}"' in line:
            total += float(line.rpartition(" ")[2])
    return total


def queued(text: str, router: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("qlm_queue_length{") and f'router="{router}"' in line
    )


def executed(text: str, router: str) -> float:
    """Requests Triton handed to the router's execute(); one cancelled before that never reached it."""
    return metric_value(text, "nv_inference_count", model=router) or 0


def settle(
    server: TritonServer, router: str, engines: tuple[str, ...], base: str, exact: bool = True
) -> str:
    """Wait until the router counted an outcome for every request it was given since `base` (a
    scrape), queues nothing and no engine runs anything; returns the last scrape."""
    deadline = time.monotonic() + 30
    while True:
        text = scrape(server)
        given = executed(text, router) - executed(base, router)
        counted = outcomes(text, router) - outcomes(base, router)
        running = [metric_value(text, "vllm:num_requests_running", model=e) or 0 for e in engines]
        if (counted == given or not exact) and queued(text, router) == 0 and not any(running):
            return text
        if time.monotonic() > deadline:
            pytest.fail(
                f"not settled: {counted:g} outcomes for {given:g} requests given to {router}, "
                f"queued {queued(text, router)}, engines running "
                f"{dict(zip(engines, running, strict=True))}"
            )
        time.sleep(0.2)


def aborted(text: str, engines: tuple[str, ...]) -> float:
    return sum(
        metric_value(text, "vllm:request_success_total", model=e, finished_reason="abort") or 0
        for e in engines
    )


def ends_explicitly(s: TimedStream, max_tokens: int) -> None:
    """Completed with exactly its tokens, or an explicit error from the server (not a hang)."""
    if s.error is None:
        assert s.done_s is not None, "stream ended without its final response"
        assert s.tokens == max_tokens and len("".join(s.texts).split()) == max_tokens
    else:
        assert "StatusCode" in s.error or "unavailable" in s.error.lower(), s.error


def serves(server: TritonServer, router: str, model: str = "mistral-7b") -> None:
    f = fields(3, "interactive")
    f["model"] = model
    res = grpc_stream(server.grpc_url, router, f, timeout_s=60)
    assert res.error is None, res.error
    assert sum(r["num_output_tokens"][0] for r in res.responses) == 3


# --- a server of our own: killing a stub damages it -----------------------------------------------
@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    base = tmp_path_factory.mktemp("faults")
    repo = base / "repo"
    repo.mkdir()
    loads = add_fleet(
        repo,
        FAULT_ROUTER,
        "qlm",
        [
            {
                "instance_id": f"fa-{k}",
                "gpu": "A10",
                "models_allowed": ["mistral-7b"],
                "initial_model": "mistral-7b",
                "max_in_flight": 4,
            }
            for k in range(2)
        ],
        {"time_scale": TIME_SCALE, "max_num_seqs": 4},
        {"time_scale": TIME_SCALE},
    )
    server = TritonServer(
        repo, load_models=loads, log_path=base / "server.log", admin_key=ADMIN_KEY,
        extra_args=QUICK_EXIT,
    )  # fmt: skip
    server.start(timeout_s=120)
    try:
        yield server
    finally:
        server.stop()
        assert server.descendants() == []


def stub_pid(server: TritonServer, model: str) -> int:
    """The Python-backend stub serving `model`: its command line names the model's directory."""
    found = []
    for pid in server.descendants():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"/{model}/" in cmdline and "stub" in cmdline:
            found.append(pid)
    assert len(found) == 1, f"stub of {model}: {found}"
    return found[0]


def test_engine_stub_killed_mid_stream_costs_no_request(own):
    n, max_tokens = 8, 60  # 8 requests on 2 instances of 4 slots: both engines busy
    base = scrape(own)
    victim = stub_pid(own, FAULT_ENGINES[0])

    async def scenario() -> list[TimedStream]:
        client = grpcaio.InferenceServerClient(own.grpc_url)
        streams = [TimedStream() for _ in range(n)]
        tasks = [
            asyncio.create_task(
                timed_stream(client, FAULT_ROUTER, fields(max_tokens, text=f"k{i}"), s)
            )
            for i, s in enumerate(streams)
        ]
        await asyncio.sleep(1.0)  # every request is streaming by now (10 simulated seconds)
        assert any(s.tokens for s in streams), "nothing streamed before the kill"
        os.kill(victim, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        await client.close()
        return streams

    streams = asyncio.run(scenario())
    for s in streams:
        ends_explicitly(s, max_tokens)
    completed = sum(s.error is None for s in streams)
    # The victim's requests re-queue and finish elsewhere (or after the recovery): all complete.
    assert completed == n, [s.error for s in streams]
    text = settle(own, FAULT_ROUTER, FAULT_ENGINES, base)
    assert executed(text, FAULT_ROUTER) - executed(base, FAULT_ROUTER) == n
    assert own.is_ready()
    # Both instances serve again (the killed one was restored by the backend or the router).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = scrape(own)
        if all(
            metric_value(text, "vllm:num_requests_running", model=e) is not None
            for e in FAULT_ENGINES
        ):
            break
        time.sleep(0.5)
    for _ in range(4):
        serves(own, FAULT_ROUTER)


# --- the session server -------------------------------------------------------------------------
def test_router_reloaded_while_idle_serves_again(triton):
    import tritonclient.grpc as grpcclient

    serves(triton, "qlm-test")
    base = scrape(triton)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        t0 = time.monotonic()
        client.load_model("qlm-test", headers=admin_headers(ADMIN_KEY))
        reload_s = time.monotonic() - t0
        assert client.is_model_ready("qlm-test")
    finally:
        client.close()
    assert reload_s < 30
    # Both resident models (not llama-3-8b: test_router.py expects its first swap-in to be cold).
    serves(triton, "qlm-test", "mistral-7b")
    serves(triton, "qlm-test", "llama-2-13b")
    # Triton's request statistics restart with the reloaded model: no exact count here.
    settle(triton, "qlm-test", TEST_ENGINES, base, exact=False)
    assert triton.is_ready()


def test_grpc_clients_leaving_at_random_points(triton):
    rng = random.Random(1234)
    n = 40
    plan = [
        (
            rng.uniform(0.0, 2.5),
            rng.choice((100, 300, 600)),
            rng.choice(("interactive", "batch-1", "batch-2")),
        )
        for _ in range(n)
    ]
    base = scrape(triton)

    async def scenario() -> list[TimedStream]:
        client = grpcaio.InferenceServerClient(triton.grpc_url)
        streams = [TimedStream() for _ in range(n)]
        tasks = []
        for i, (leave_s, max_tokens, cls) in enumerate(plan):
            tasks.append(
                asyncio.create_task(
                    timed_stream(client, "qlm-test", fields(max_tokens, cls, f"g{i}"), streams[i])
                )
            )
            asyncio.get_running_loop().call_later(leave_s, streams[i].cancel)
            await asyncio.sleep(rng.uniform(0, 0.05))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        await client.close()
        return streams

    streams = asyncio.run(scenario())
    for s, (_, max_tokens, _) in zip(streams, plan, strict=True):
        if s.error is None:
            ends_explicitly(s, max_tokens)
    left = sum(s.error is not None for s in streams)
    assert left >= n // 2, "most clients should have left before their end"
    text = settle(triton, "qlm-test", TEST_ENGINES, base)
    # A client that left within a few ms may never have reached the router; the rest did.
    early = sum(leave_s < 0.1 for leave_s, _, _ in plan)
    assert executed(text, "qlm-test") - executed(base, "qlm-test") >= n - early
    # Requests cancelled mid-stream were aborted in the engine, not run to their end.
    assert aborted(text, TEST_ENGINES) > aborted(base, TEST_ENGINES)
    assert triton.is_ready()
    serves(triton, "qlm-test")


def http_leave(
    url: str, body: dict, leave_after_bytes: int, timeout_s: float = 60
) -> tuple[int, int]:
    """POST generate_stream, read `leave_after_bytes` of the SSE body (or all of it), then drop the
    connection. Returns (HTTP status, bytes read)."""
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        conn.request(
            "POST",
            "/v2/models/qlm-test/generate_stream",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        got = 0
        while got < leave_after_bytes:
            chunk = resp.read1(256) if hasattr(resp, "read1") else resp.read(256)
            if not chunk:
                break
            got += len(chunk)
        return resp.status, got
    finally:
        conn.close()  # mid-stream: the server sees the client leave


def test_http_clients_leaving_at_random_points(triton):
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(4321)
    n = 24
    plan = [(rng.randint(0, 3000), rng.choice((100, 300, 600))) for _ in range(n)]
    base = scrape(triton)

    def one(i: int) -> tuple[int, int]:
        leave_after, max_tokens = plan[i]
        body = {
            "text_input": f"h{i}",
            "model": "mistral-7b",
            "slo_class": "batch-1",
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        return http_leave(triton.http_url, body, leave_after)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(n)))
    assert all(status == 200 for status, _ in results), results
    text = settle(triton, "qlm-test", TEST_ENGINES, base)
    assert executed(text, "qlm-test") - executed(base, "qlm-test") == n
    # Triton passes an HTTP disconnect on as a cancellation: the engine work stopped too.
    assert aborted(text, TEST_ENGINES) > aborted(base, TEST_ENGINES)
    assert triton.is_ready()
    serves(triton, "qlm-test")
