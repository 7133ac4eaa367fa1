"""The `qlm` router through a real tritonserver with simulated engines.

Test fleets run at time_scale 0.1: one simulated second is 0.1 s of wall time. SLOs and TTFTs below
are in simulated seconds unless their name says wall.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from conftest import ADMIN_KEY, TIME_SCALE
from streams import TimedStream, grpc_stream, http_post, metric_value, sse_events, timed_stream

from qlm_backend.triton.server import admin_headers

pytestmark = pytest.mark.timeout(180)


def router_fields(model: str, max_tokens: int, slo_class: str = "interactive", **extra) -> dict:
    sampling = {"max_tokens": max_tokens, "ignore_eos": True}
    return {
        "text_input": extra.pop("text_input", "tell me a story"),
        "model": model,
        "slo_class": slo_class,
        "stream": True,  # absent, the router answers once at the end (as vllm_backend)
        "sampling_parameters": json.dumps(sampling),
        "return_num_output_tokens": True,
        "return_finish_reason": True,
        **extra,
    }


def metrics(triton) -> str:
    with urllib.request.urlopen(triton.metrics_url) as r:
        return r.read().decode()


def test_router_streams_from_an_instance_of_the_named_model(triton):
    res = grpc_stream(triton.grpc_url, "qlm", router_fields("mistral-7b", 6))
    assert res.error is None, res.error
    assert sum(r["num_output_tokens"][0] for r in res.responses) == 6
    last = res.responses[-1]
    assert last["finish_reason"] == "length"
    assert last["qlm_instance"] in ("a10-0", "a10-1")  # mistral-7b's instances in the default fleet
    assert last["qlm_queue_s"][0] >= 0


def test_router_over_http_generate_stream_with_json_fields(triton):
    status, body = http_post(
        triton.http_url,
        "/v2/models/qlm/generate_stream",
        {
            "text_input": "hi",
            "stream": True,
            "max_tokens": 5,
            "ignore_eos": True,
            "model": "llama-2-13b",
            "slo_class": "batch-1",
        },
    )
    assert status == 200, body
    events = sse_events(body)
    assert len(events) == 5 and events[-1]["qlm_instance"] == "a100-0"


def test_a_vllm_backend_request_with_no_model_and_no_stream_gets_one_answer(triton):
    # What a client of Triton's vllm_backend sends: no `model` (the fleet's default_model serves
    # it), no `stream` (one response with prompt + text, as vllm_backend answers).
    status, body = http_post(
        triton.http_url,
        "/v2/models/qlm/generate",
        {"text_input": "Tell me", "max_tokens": 6, "ignore_eos": True},
    )
    assert status == 200, body
    text = json.loads(body)["text_output"]
    assert text.startswith("Tell me") and len(text[len("Tell me") :].split()) == 6


def test_router_non_streaming_response_prepends_the_prompt(triton):
    res = grpc_stream(
        triton.grpc_url, "qlm", router_fields("mistral-7b", 4, text_input="Once", stream=False)
    )
    assert res.error is None and len(res.responses) == 1
    assert res.text.startswith("Once") and len(res.text[4:].split()) == 4


async def _burst_then_interactive(
    url: str, router: str, n_batch: int
) -> tuple[TimedStream, list[TimedStream]]:
    client = grpcaio.InferenceServerClient(url)
    batch = [TimedStream() for _ in range(n_batch)]
    tasks = [
        asyncio.create_task(
            timed_stream(
                client,
                router,
                router_fields("mistral-7b", 100, "batch-2", text_input=f"job {i}"),
                b,
            )
        )
        for i, b in enumerate(batch)
    ]
    await asyncio.sleep(0.3)  # the burst is queued (fcfs: in the engine; qlm: in the router)
    inter = await timed_stream(
        client, router, router_fields("mistral-7b", 4, "interactive"), TimedStream()
    )
    for b in batch:
        b.cancel()
    await asyncio.gather(*tasks)
    await client.close()
    return inter, batch


def test_interactive_request_behind_a_batch_burst_is_served_far_sooner_under_qlm(triton):
    qlm, _ = asyncio.run(_burst_then_interactive(triton.grpc_url, "qlm-test", 16))
    fcfs, _ = asyncio.run(_burst_then_interactive(triton.grpc_url, "fcfs-test", 16))
    assert qlm.error is None and fcfs.error is None, (qlm.error, fcfs.error)
    print(
        f"\ninteractive TTFT behind 16 batch requests: qlm {qlm.first_token_s / TIME_SCALE:.2f} s, "
        f"fcfs {fcfs.first_token_s / TIME_SCALE:.2f} s (simulated seconds)"
    )
    # fcfs: the interactive request waits in the engine's queue behind ~3 waves of 100-token jobs.
    assert qlm.first_token_s * 3 < fcfs.first_token_s


def test_eviction_lets_an_urgent_request_in_and_the_evicted_one_completes_exactly(triton):
    def evictions() -> float:
        # The router resumes by recompute (the engine's KV is gone with the abort): kind "evict".
        return metric_value(metrics(triton), "qlm_lso_total", router="qlm-test", kind="evict") or 0

    before = evictions()

    async def scenario():
        client = grpcaio.InferenceServerClient(triton.grpc_url)
        batch = [TimedStream() for _ in range(4)]
        tasks = [
            asyncio.create_task(
                timed_stream(
                    client,
                    "qlm-test",
                    router_fields("mistral-7b", 400, "batch-1", text_input=f"b{i}"),
                    b,
                )
            )
            for i, b in enumerate(batch)
        ]
        await asyncio.sleep(0.4)  # all four slots of q-a10-0 are busy
        urgent = await timed_stream(
            client,
            "qlm-test",
            router_fields("mistral-7b", 4, "interactive", ttft_slo_s=1.5),
            TimedStream(),
        )
        await asyncio.gather(*tasks)
        await client.close()
        return urgent, batch

    urgent, batch = asyncio.run(scenario())
    assert urgent.error is None
    for b in batch:
        assert b.error is None, b.error
        # Exactly max_tokens tokens, no duplicate and no gap, across the eviction and resume.
        assert b.tokens == 400 and len("".join(b.texts).split()) == 400
    assert evictions() >= before + 1
    print(f"\nurgent TTFT with eviction: {urgent.first_token_s / TIME_SCALE:.2f} s (SLO 1.5 s)")


def test_request_for_an_absent_model_swaps_it_in_cold_and_back_warm(triton):
    client = grpcclient.InferenceServerClient(triton.grpc_url)

    def ready(name: str) -> bool:
        return any(
            m["name"] == name and m.get("state") == "READY"
            for m in client.get_model_repository_index(
                headers=admin_headers(ADMIN_KEY), as_json=True
            )["models"]
        )

    assert ready("llama-2-13b__q-a100-0") and not ready("llama-3-8b__q-a100-0")
    t0 = time.monotonic()
    res = grpc_stream(triton.grpc_url, "qlm-test", router_fields("llama-3-8b", 3, "batch-1"))
    cold_s = time.monotonic() - t0
    assert res.error is None and res.responses[-1]["qlm_instance"] == "q-a100-0"
    assert ready("llama-3-8b__q-a100-0") and not ready("llama-2-13b__q-a100-0")
    t0 = time.monotonic()
    res = grpc_stream(triton.grpc_url, "qlm-test", router_fields("llama-2-13b", 3, "batch-1"))
    warm_s = time.monotonic() - t0
    assert res.error is None and ready("llama-2-13b__q-a100-0")
    print(
        f"\nswap to llama-3-8b (cold): {cold_s / TIME_SCALE:.1f} s; back to llama-2-13b (warm): {warm_s / TIME_SCALE:.1f} s"
    )
    assert warm_s * 3 < cold_s
    text = metrics(triton)
    assert (
        metric_value(text, "qlm_lso_total", router="qlm-test", kind="swap_model_cold") or 0
    ) >= 1
    assert (
        metric_value(text, "qlm_lso_total", router="qlm-test", kind="swap_model_warm") or 0
    ) >= 1
    client.close()


def test_cancel_while_queued_and_while_streaming(triton):
    def aborted() -> float:
        return (
            metric_value(
                metrics(triton),
                "vllm:request_success_total",
                model="mistral-7b__q-a10-0",
                finished_reason="abort",
            )
            or 0
        )

    def cancelled() -> float:
        return (
            metric_value(
                metrics(triton),
                "qlm_requests_total",
                router="qlm-test",
                slo_class="batch-2",
                outcome="cancelled",
            )
            or 0
        )

    a0, c0 = aborted(), cancelled()

    async def scenario():
        client = grpcaio.InferenceServerClient(triton.grpc_url)
        streams = [TimedStream() for _ in range(8)]  # 4 run on q-a10-0, 4 wait in the router
        tasks = [
            asyncio.create_task(
                timed_stream(
                    client,
                    "qlm-test",
                    router_fields("mistral-7b", 300, "batch-2", text_input=f"c{i}"),
                    s,
                )
            )
            for i, s in enumerate(streams)
        ]
        await asyncio.sleep(0.5)
        for s in streams:
            s.cancel()
        await asyncio.gather(*tasks)
        await client.close()

    asyncio.run(scenario())
    deadline = time.monotonic() + 5
    while cancelled() < c0 + 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled() == c0 + 8
    # The running ones were aborted in the engine (not left to produce 300 tokens each); the engine
    # polls cancellation every 50 ms, so allow it a moment after the router has counted them.
    deadline = time.monotonic() + 5
    while aborted() < a0 + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert aborted() >= a0 + 1
    assert (
        metric_value(metrics(triton), "vllm:num_requests_running", model="mistral-7b__q-a10-0") == 0
    )


def test_engine_unloaded_mid_stream_requeues_and_the_request_completes(triton):
    async def scenario():
        client = grpcaio.InferenceServerClient(triton.grpc_url)
        s = TimedStream()
        task = asyncio.create_task(
            timed_stream(client, "qlm-test", router_fields("mistral-7b", 60, "batch-1"), s)
        )
        await asyncio.sleep(0.5)
        await client.unload_model("mistral-7b__q-a10-0", headers=admin_headers(ADMIN_KEY))
        await task
        await client.close()
        return s

    s = asyncio.run(scenario())
    # Either it completed elsewhere/after recovery with exactly its tokens, or it got an explicit error.
    if s.error is None:
        assert s.tokens == 60 and len("".join(s.texts).split()) == 60
    else:
        assert "UNAVAILABLE" in s.error or "unavailable" in s.error.lower()
    # The router reloads the failed instance (with backoff) and keeps serving.
    res = grpc_stream(triton.grpc_url, "qlm-test", router_fields("mistral-7b", 3), timeout_s=60)
    assert res.error is None and sum(r["num_output_tokens"][0] for r in res.responses) == 3


BAD_INPUTS = [
    ({"max_tokens": 4}, "text_input"),
    ({"text_input": "", "model": "mistral-7b"}, "text_input"),
    ({"text_input": "hi", "model": " "}, "model"),
    ({"text_input": "hi", "model": "gpt-9"}, "model"),
    ({"text_input": "hi", "model": "mistral-7b", "slo_class": "gold"}, "slo_class"),
    ({"text_input": "hi", "model": "mistral-7b", "ttft_slo_s": -1.0}, "ttft_slo_s"),
    ({"text_input": "hi", "model": "mistral-7b", "ttft_slo_s": 0.0}, "ttft_slo_s"),
    ({"text_input": "hi", "model": "mistral-7b", "max_tokens": 0}, "max_tokens"),
    ({"text_input": "hi", "model": "mistral-7b", "max_tokens": -5}, "max_tokens"),
    ({"text_input": "hi", "model": "mistral-7b", "max_tokens": 100000}, "max_tokens"),
    ({"text_input": "hi", "model": "mistral-7b", "max_tokens": 2.5}, "max_tokens"),
    ({"text_input": "hi", "model": "mistral-7b", "max_tokens": "many"}, "max_tokens"),
    ({"text_input": "hi", "model": "mistral-7b", "temperature": -0.1}, "temperature"),
    ({"text_input": "hi", "model": "mistral-7b", "top_p": 1.5}, "top_p"),
    ({"text_input": "hi", "model": "mistral-7b", "top_k": 0}, "top_k"),
    ({"text_input": "hi", "model": "mistral-7b", "n": 2}, "n"),
    ({"text_input": "hi", "model": "mistral-7b", "min_tokens": 50, "max_tokens": 5}, "min_tokens"),
    ({"text_input": "hi", "model": "mistral-7b", "bogus_key": 1}, "bogus_key"),
    (
        {"text_input": "hi", "model": "mistral-7b", "sampling_parameters": "{not json"},
        "sampling_parameters",
    ),
    (
        {"text_input": "hi", "model": "mistral-7b", "sampling_parameters": "[1, 2]"},
        "sampling_parameters",
    ),
    (
        {
            "text_input": "hi",
            "model": "mistral-7b",
            "stream": True,
            "exclude_input_in_output": False,
        },
        "exclude_input_in_output",
    ),
    ({"text_input": "x" * 40000, "model": "mistral-7b", "max_tokens": 8}, "text_input"),
    ({"text_input": "hi", "model": "mistral-7b", "seed": "abc"}, "seed"),
    ({"text_input": "hi", "model": "mistral-7b", "stop": 5}, "stop"),
]


def test_bad_inputs_get_an_error_naming_the_field_while_others_are_served(triton):
    async def good():
        client = grpcaio.InferenceServerClient(triton.grpc_url)
        res = await asyncio.gather(
            *[
                timed_stream(
                    client,
                    "qlm",
                    router_fields("mistral-7b", 20, text_input=f"g{i}"),
                    TimedStream(),
                )
                for i in range(4)
            ]
        )
        await client.close()
        return res

    async def both():
        loop = asyncio.get_running_loop()
        good_task = asyncio.create_task(good())
        answers = []
        for body, _ in BAD_INPUTS:
            answers.append(
                await loop.run_in_executor(
                    None, http_post, triton.http_url, "/v2/models/qlm/generate_stream", body
                )
            )
        return answers, await good_task

    answers, good_streams = asyncio.run(both())
    for (body, field), (status, text) in zip(BAD_INPUTS, answers, strict=True):
        assert status == 400, (body, status, text)
        assert field in text, (body, text)
    for s in good_streams:
        assert s.error is None and s.tokens == 20
    # ... and after.
    res = grpc_stream(triton.grpc_url, "qlm", router_fields("mistral-7b", 3))
    assert res.error is None


def test_metrics_endpoint_shows_the_router_metrics(triton):
    grpc_stream(triton.grpc_url, "qlm", router_fields("mistral-7b", 3))
    time.sleep(0.6)  # gauges are pushed every 0.5 s
    text = metrics(triton)
    assert (
        metric_value(
            text, "qlm_requests_total", router="qlm", slo_class="interactive", outcome="attained"
        )
        or 0
    ) >= 1
    assert (metric_value(text, "qlm_lso_total", router="qlm", kind="pull") or 0) >= 1
    assert (metric_value(text, "qlm_planner_seconds_count", router="qlm") or 0) >= 1
    assert (
        metric_value(
            text, "qlm_queue_length", router="qlm", model="mistral-7b", slo_class="interactive"
        )
        is not None
    )
    # Per model and class: time to first token and queue time, with the class's SLO as a bucket
    # bound, so attainment is le="20" / count from Prometheus alone.
    labels = {"router": "qlm", "model": "mistral-7b", "slo_class": "interactive"}
    for name in ("qlm_ttft_seconds", "qlm_queue_seconds"):
        count = metric_value(text, f"{name}_count", **labels) or 0
        assert count >= 1, name
        slo_bucket = [
            ln
            for ln in text.splitlines()
            if ln.startswith(f"{name}_bucket{{")
            and all(f'{k}="{v}"' in ln for k, v in labels.items())
            and 'le="20"' in ln
        ]
        assert len(slo_bucket) == 1, name
        assert 0 <= float(slo_bucket[0].rpartition(" ")[2]) <= count


def test_model_repository_api_refuses_clients_without_the_key(triton):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    with pytest.raises(Exception, match="(?i)restricted|permission|unavailable|denied|not allowed"):
        client.unload_model("mistral-7b__a10-0")
    status, body = http_post(triton.http_url, "/v2/repository/models/mistral-7b__a10-0/unload", {})
    assert status in (401, 403), (status, body)
    # ... while the router, which holds the key, still swaps models (test_request_for_an_absent_model...)
    # and serving is unaffected.
    res = grpc_stream(
        triton.grpc_url,
        "mistral-7b__a10-0",
        {"text_input": "still here", "sampling_parameters": '{"max_tokens": 2}'},
    )
    assert res.error is None
    client.close()
