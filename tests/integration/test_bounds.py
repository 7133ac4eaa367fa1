"""The router's bounds through a real tritonserver: the bound on pending requests
(`max_pending_requests`) and the wall deadline (`request_timeout_s`), directly over gRPC and through
qlm-openai.

A router of its own, `bounds` (policy fcfs, real time), on a server of its own for this module (not
the session's: a router unloaded after these tests sometimes stays UNLOADING for good under Triton
2.51, which made the session server unready for every later test; docs/triton-vllm-facts.md section
8): it holds at most 5 requests and a request must finish within 15 s. Its fleet has a fast
instance (mistral-7b, real time) and a slow one (llama-2-13b at a tenth of real speed, prefilling in
16-token chunks): it takes a request of a 3,000-token prompt and gives no token for ~36 s, an engine
that does not answer within the deadline, yet steps (and so notices cancellations) every ~0.2 s.
Its classes have first-token SLOs of a few seconds, so the 15 s deadline leaves each its SLO (the
router checks that at load).
fcfs pulls every request into an engine at once: its pull count tells when a request is admitted.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator

import openai
import pytest
import tritonclient.grpc.aio as grpcaio
from conftest import ADMIN_KEY, QUICK_EXIT
from streams import TimedStream, grpc_stream, metric_value, timed_stream
from test_openai import running_front

from qlm_backend.triton.repository import write_router, write_sim_engine
from qlm_backend.triton.server import TritonServer

pytestmark = pytest.mark.timeout(180)

ROUTER = "bounds"
MAX_PENDING = 5
TIMEOUT_S = 15.0
SLOW, FAST = "llama-2-13b__b-slow-0", "mistral-7b__b-fast-0"
LONG = "x" * 12_000  # 3,000 prompt tokens (4 bytes each): ~188 prefill steps on the slow engine
FLEET = {
    "slo_classes": [
        {"name": "interactive", "ttft_slo_s": 2, "weight": 10, "sheddable": False, "priority": 0},
        {"name": "batch-1", "ttft_slo_s": 3, "weight": 2, "sheddable": False, "priority": 1},
        {"name": "batch-2", "ttft_slo_s": 4, "weight": 1, "sheddable": False, "priority": 2},
    ],
    "instances": [
        {
            "instance_id": "b-slow-0",
            "gpu": "A100-80G",
            "models_allowed": ["llama-2-13b"],
            "initial_model": "llama-2-13b",
        },
        {
            "instance_id": "b-fast-0",
            "gpu": "A10",
            "models_allowed": ["mistral-7b"],
            "initial_model": "mistral-7b",
            "max_in_flight": 4,
        },
    ],
}


@pytest.fixture(scope="module")
def bounds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    base = tmp_path_factory.mktemp("bounds")
    repo = base / "repo"
    repo.mkdir()
    (repo / "fleet-bounds.json").write_text(json.dumps(FLEET, indent=2) + "\n")
    write_sim_engine(repo, "llama-2-13b", "b-slow-0", {"gpu": "A100-80G", "time_scale": 10.0, "max_num_batched_tokens": 16})  # fmt: skip
    write_sim_engine(repo, "mistral-7b", "b-fast-0", {"gpu": "A10", "time_scale": 1.0, "max_num_seqs": 4})  # fmt: skip
    settings = {
        "policy": "fcfs",
        "fleet": "fleet-bounds.json",
        "max_pending_requests": MAX_PENDING,
        "request_timeout_s": TIMEOUT_S,
    }
    write_router(repo, settings, name=ROUTER)
    server = TritonServer(
        repo, load_models=[SLOW, FAST, ROUTER], log_path=base / "server.log",
        admin_key=ADMIN_KEY, extra_args=QUICK_EXIT,
    )  # fmt: skip
    server.start(timeout_s=120)
    try:
        yield server
    finally:
        server.stop()


def scrape(server: TritonServer) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        return r.read().decode()


def counted(server: TritonServer, name: str, **labels: str) -> float:
    return metric_value(scrape(server), name, router=ROUTER, **labels) or 0.0


def pulls(server: TritonServer) -> float:
    return counted(server, "qlm_lso_total", kind="pull")


def fields(model: str, max_tokens: int, text: str = "tell me a story") -> dict:
    return {
        "text_input": text,
        "model": model,
        "stream": True,
        "sampling_parameters": json.dumps({"max_tokens": max_tokens, "ignore_eos": True}),
        "return_num_output_tokens": True,
        "return_finish_reason": True,
    }


async def until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


def test_a_full_router_refuses_at_once_and_a_request_no_engine_answers_times_out(bounds):
    """2 requests run on the fast engine and 3 in the slow one: the router holds its bound, so the
    next request is refused at once, naming the bound, while the two fast ones complete untouched.
    The 3 slow ones end with an explicit timeout error 15 s after receipt, and their engine
    requests are aborted there."""

    def snapshot() -> dict[str, float]:
        text = scrape(bounds)
        out = {}
        for o in ("attained", "missed", "rejected", "failed"):
            v = metric_value(text, "qlm_requests_total", router=ROUTER, slo_class="interactive", outcome=o)  # fmt: skip
            out[o] = v or 0
        out["queue_full"] = metric_value(text, "qlm_rejected_total", router=ROUTER, reason="queue_full") or 0  # fmt: skip
        out["aborts"] = metric_value(text, "vllm:request_success_total", model=SLOW, finished_reason="abort") or 0  # fmt: skip
        # The router probes an instance silent under open streams for 10 s (stall watch): a probe
        # the slow engine took and never answered is cancelled, an abort of its own.
        out["probes"] = metric_value(text, "qlm_engine_probes_total", router=ROUTER, instance="b-slow-0", result="no-answer") or 0  # fmt: skip
        return out

    base, pulled = snapshot(), pulls(bounds)
    fast_tokens = 200  # ~6 s on a real-time A10: still running at the refusal, done before 15 s

    async def scenario() -> tuple[list[TimedStream], list[TimedStream], TimedStream, float]:
        client = grpcaio.InferenceServerClient(bounds.grpc_url)
        fast = [TimedStream() for _ in range(2)]
        slow = [TimedStream() for _ in range(MAX_PENDING - 2)]
        tasks = [
            asyncio.create_task(
                timed_stream(client, ROUTER, fields("mistral-7b", fast_tokens, f"f{i}"), s)
            )
            for i, s in enumerate(fast)
        ]
        tasks += [
            asyncio.create_task(
                timed_stream(client, ROUTER, fields("llama-2-13b", 8, f"s{i} {LONG}"), s)
            )
            for i, s in enumerate(slow)
        ]
        t_slow = time.monotonic()
        await until(lambda: pulls(bounds) >= pulled + MAX_PENDING, 10, "not all admitted")
        await until(lambda: all(s.tokens for s in fast), 10, "the fast requests never started")
        states = [(s.done_s, s.error, s.tokens) for s in fast]
        assert not any(s.done_s or s.error for s in fast), f"precondition: still running {states}"
        refused = TimedStream()
        t0 = time.monotonic()
        await timed_stream(client, ROUTER, fields("mistral-7b", 4, "one too many"), refused)
        refused_s = time.monotonic() - t0
        still_running = not any(s.done_s for s in fast)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        assert time.monotonic() - t_slow >= TIMEOUT_S - 1
        await client.close()
        assert still_running, "precondition: the fast ones ran past the refusal"
        return fast, slow, refused, refused_s

    fast, slow, refused, refused_s = asyncio.run(scenario())
    assert refused.error is not None and refused_s < 2.0, (refused.error, refused_s)
    assert "queue is full" in refused.error, refused.error
    assert f"max_pending_requests is {MAX_PENDING}" in refused.error
    for s in fast:  # undisturbed: every token, then the final response
        assert s.error is None and s.done_s is not None and s.tokens == fast_tokens, s.error
    for s in slow:
        assert s.error is not None and "request timed out" in s.error, s.error
        assert "request_timeout_s" in s.error and s.tokens == 0
    # Counted: the 2 fast ones as served (attained or missed), the refusal as rejected (reason
    # queue_full), the 3 timeouts as failed; the slow engine aborted them and holds nothing.
    deadline = time.monotonic() + 15
    while True:
        now, text = snapshot(), scrape(bounds)
        got = {k: now[k] - base[k] for k in now}
        got["served"] = got.pop("attained") + got.pop("missed")
        probes = got.pop("probes")
        busy = [metric_value(text, f"vllm:num_requests_{k}", model=SLOW) for k in ("running", "waiting")]  # fmt: skip
        want = {"served": 2, "rejected": 1, "failed": 3, "queue_full": 1, "aborts": 3 + probes}
        if got == want and busy == [0, 0]:
            break
        assert time.monotonic() < deadline, (got, busy)
        time.sleep(0.2)
    print(f"the slow instance was probed {probes:g} time(s) while silent (no answer)")
    assert metric_value(text, "qlm_rejected_total", router=ROUTER, reason="shed") is not None
    # And the router serves on.
    res = grpc_stream(bounds.grpc_url, ROUTER, fields("mistral-7b", 3), timeout_s=60)
    assert res.error is None and sum(r["num_output_tokens"][0] for r in res.responses) == 3


def test_through_qlm_openai_a_full_router_is_503_with_retry_after_and_a_timeout_504(
    bounds, tmp_path_factory
):
    log_path = tmp_path_factory.mktemp("openai-bounds") / "qlm-openai.log"
    with running_front(bounds, log_path, ROUTER, None) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        timed_out: list[BaseException] = []
        pulled = pulls(bounds)

        def slow_chat() -> None:
            try:
                c.chat.completions.create(
                    model="llama-2-13b", messages=[{"role": "user", "content": LONG}], max_tokens=4
                )
            except openai.APIStatusError as e:
                timed_out.append(e)

        async def fillers() -> list[TimedStream]:
            client = grpcaio.InferenceServerClient(bounds.grpc_url)
            slow = [TimedStream() for _ in range(MAX_PENDING - 1)]
            tasks = [
                asyncio.create_task(
                    timed_stream(client, ROUTER, fields("llama-2-13b", 8, f"o{i} {LONG}"), s)
                )
                for i, s in enumerate(slow)
            ]
            await until(lambda: pulls(bounds) >= pulled + MAX_PENDING, 10, "not all admitted")
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as e:
                    c.chat.completions.create(
                        model="mistral-7b",
                        messages=[{"role": "user", "content": "hi"}],
                        max_tokens=4,
                        stream=stream,
                    )
                assert e.value.status_code == 503
                assert int(e.value.response.headers["retry-after"]) >= 1
                assert e.value.body["code"] == "queue_full"
                assert f"max_pending_requests is {MAX_PENDING}" in e.value.body["message"]
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
            await client.close()
            return slow

        worker = threading.Thread(target=slow_chat)
        worker.start()  # with the 4 fillers the router holds its bound
        try:
            slow = asyncio.run(fillers())
        finally:
            worker.join(timeout=60)
            c.close()
        assert all(s.error and "request timed out" in s.error for s in slow)
        assert len(timed_out) == 1, timed_out
        e = timed_out[0]
        assert isinstance(e, openai.APIStatusError) and e.status_code == 504
        assert e.body["code"] == "timeout" and "request_timeout_s" in e.body["message"]
