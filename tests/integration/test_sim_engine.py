"""The simulated engine through a real tritonserver: gRPC streaming, HTTP generate_stream, cancel, errors."""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request

import pytest
import tritonclient.grpc.aio as grpcaio
from streams import grpc_stream, http_post, make_inputs, metric_value, sse_events

ENGINE = "mistral-7b__a10-0"
pytestmark = pytest.mark.timeout(120)


def test_grpc_stream_sends_one_token_per_response_and_counts_them(triton):
    res = grpc_stream(
        triton.grpc_url,
        ENGINE,
        {
            "text_input": "hello there",
            "stream": True,
            "sampling_parameters": '{"max_tokens": 12, "ignore_eos": true, "logprobs": 0}',
            "return_num_output_tokens": True,
            "return_num_input_tokens": True,
            "return_finish_reason": True,
            "return_cumulative_logprob": True,
            "return_logprobs": True,
        },
    )
    assert res.error is None
    # One response per token while the engine keeps up; tokens of iterations that ended between
    # two of its wake-ups share a response (as vLLM's output processor does): count tokens.
    assert sum(r["num_output_tokens"][0] for r in res.responses) == 12
    assert all(r["num_output_tokens"][0] >= 1 for r in res.responses)
    assert {tuple(r["num_input_tokens"]) for r in res.responses} == {
        (3,)
    }  # 11 bytes / 4, rounded up
    assert [r["finish_reason"] for r in res.responses][-1] == "length"
    assert all(r["finish_reason"] == "None" for r in res.responses[:-1])
    cumulative = [r["cumulative_logprob"][0] for r in res.responses]
    assert all(
        b <= a for a, b in zip(cumulative, cumulative[1:], strict=False)
    )  # log-probs are <= 0
    assert len(res.text.split()) == 12


def test_logprob_outputs_without_logprobs_asked_are_null_and_nan_as_vllm_backend(triton):
    # vLLM computes log-probabilities only when the sampling parameters ask (`logprobs`):
    # vllm_backend then returns logprobs "null" and cumulative_logprob NaN, whatever the flags say.
    res = grpc_stream(
        triton.grpc_url,
        ENGINE,
        {
            "text_input": "hi",
            "stream": True,
            "sampling_parameters": '{"max_tokens": 3, "ignore_eos": true}',
            "return_cumulative_logprob": True,
            "return_logprobs": True,
        },
    )
    assert res.error is None and res.responses
    assert all(r["logprobs"] == "null" for r in res.responses)
    assert all(math.isnan(r["cumulative_logprob"][0]) for r in res.responses)


def test_non_streaming_response_prepends_the_prompt(triton):
    res = grpc_stream(
        triton.grpc_url,
        ENGINE,
        {
            "text_input": "Once upon",
            "stream": False,
            "sampling_parameters": '{"max_tokens": 5, "ignore_eos": true}',
            "return_num_output_tokens": True,
        },
    )
    assert res.error is None and len(res.responses) == 1
    assert res.text.startswith("Once upon") and len(res.text[len("Once upon") :].split()) == 5
    assert res.responses[0]["num_output_tokens"] == [5]


def test_http_generate_stream_streams_tokens_as_events(triton):
    status, body = http_post(
        triton.http_url,
        f"/v2/models/{ENGINE}/generate_stream",
        {"text_input": "hi", "stream": True, "max_tokens": 8, "ignore_eos": True},
    )
    assert status == 200
    events = sse_events(body)
    # A token per event while the engine keeps up (a step's tokens share one when it falls behind).
    assert len(events) > 1 and all("error" not in e for e in events)
    assert len("".join(e["text_output"] for e in events).split()) == 8


def test_without_stream_the_engine_answers_once_with_the_prompt_as_vllm_backend(triton):
    status, body = http_post(
        triton.http_url, f"/v2/models/{ENGINE}/generate", {"text_input": "hi", "max_tokens": 4}
    )
    assert status == 200, body
    out = json.loads(body)
    assert out["text_output"].startswith("hi") and len(out["text_output"][2:].split()) == 4


def test_sampling_keys_as_request_parameters_are_honoured(triton):
    status, body = http_post(
        triton.http_url,
        f"/v2/models/{ENGINE}/generate_stream",
        {
            "text_input": "hi",
            "max_tokens": 3,
            "ignore_eos": True,
            "temperature": 0.5,
            "return_num_output_tokens": True,
        },
    )
    assert status == 200 and sum(e["num_output_tokens"] for e in sse_events(body)) == 3


def test_bad_sampling_parameters_json_is_a_400_naming_the_field(triton):
    status, body = http_post(
        triton.http_url,
        f"/v2/models/{ENGINE}/generate_stream",
        {"text_input": "hi", "sampling_parameters": "{max_tokens: 8"},
    )
    assert status == 400
    assert "sampling_parameters" in body and "not valid JSON" in body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text_input": "hi", "max_tokens": 0}, "max_tokens"),
        ({"text_input": "hi", "max_tokens": 10_000_000}, "max_tokens"),
        ({"text_input": "hi", "temperature": -1}, "temperature"),
        ({"text_input": "hi", "top_p": 0}, "top_p"),
        ({"text_input": "hi", "max_tokenz": 3}, "max_tokenz"),
        ({"text_input": "", "max_tokens": 3}, "text_input"),
        (
            {"text_input": "hi", "stream": True, "exclude_input_in_output": False},
            "exclude_input_in_output",
        ),
        ({"text_input": "x" * 40_000, "max_tokens": 8}, "text_input"),
    ],
)
def test_bad_input_gets_a_400_that_names_the_field(triton, body, field):
    status, text = http_post(triton.http_url, f"/v2/models/{ENGINE}/generate_stream", body)
    assert status == 400, text
    assert field in text


def test_cancel_mid_stream_stops_the_engine_and_it_keeps_serving(triton):
    def aborted() -> float:
        with urllib.request.urlopen(triton.metrics_url) as r:
            text = r.read().decode()
        return (
            metric_value(
                text,
                "vllm:request_success_total",
                model="mistral-7b__a10-1",
                finished_reason="abort",
            )
            or 0.0
        )

    before = aborted()

    async def cancel_after(n_tokens: int) -> int:
        client = grpcaio.InferenceServerClient(triton.grpc_url)
        fields = {
            "text_input": "long one",
            "stream": True,
            "sampling_parameters": '{"max_tokens": 500, "ignore_eos": true}',
        }

        async def requests():
            yield {
                "model_name": "mistral-7b__a10-1",
                "inputs": make_inputs(fields),
                "request_id": "c1",
            }

        got = 0
        it = client.stream_infer(inputs_iterator=requests())
        async for _result, error in it:
            assert error is None
            got += 1
            if got == n_tokens:
                it.cancel()
                break
        await client.close()
        return got

    assert asyncio.run(cancel_after(3)) == 3
    # The engine notices within a step (~33 ms on an A10); 500 tokens would take ~17 s.
    deadline = time.monotonic() + 5
    while aborted() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert aborted() == before + 1
    with urllib.request.urlopen(triton.metrics_url) as r:
        assert (
            metric_value(r.read().decode(), "vllm:num_requests_running", model="mistral-7b__a10-1")
            == 0
        )
    res = grpc_stream(
        triton.grpc_url,
        "mistral-7b__a10-1",
        {"text_input": "again", "sampling_parameters": '{"max_tokens": 4, "ignore_eos": true}'},
    )
    assert res.error is None and len(res.text.split()) == 4


def test_vllm_metrics_are_exported_per_engine(triton):
    grpc_stream(
        triton.grpc_url,
        ENGINE,
        {"text_input": "metrics", "sampling_parameters": '{"max_tokens": 4, "ignore_eos": true}'},
    )
    with urllib.request.urlopen(triton.metrics_url) as r:
        text = r.read().decode()
    assert (metric_value(text, "vllm:generation_tokens_total", model=ENGINE) or 0) >= 4
    assert (metric_value(text, "vllm:time_to_first_token_seconds_count", model=ENGINE) or 0) >= 1
    # vLLM's names with their meaning: the per-request mean TPOT under the per-request histogram,
    # nothing under the per-token ones.
    tpot = "vllm:request_time_per_output_token_seconds_count"
    assert (metric_value(text, tpot, model=ENGINE) or 0) >= 1
    assert "vllm:time_per_output_token_seconds" not in text
    assert "vllm:inter_token_latency_seconds" not in text
