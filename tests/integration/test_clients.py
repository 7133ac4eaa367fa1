"""The package client (qlm_backend.client) and the qlm-client CLI against a real tritonserver."""

from __future__ import annotations

import asyncio

import pytest

from qlm_backend.client import (
    AsyncGrpcClient,
    AsyncHttpClient,
    GrpcClient,
    HttpClient,
    Request,
    main,
)
from qlm_backend.triton.server import free_port

pytestmark = pytest.mark.timeout(120)

MISTRAL_INSTANCES = ("a10-0", "a10-1")  # mistral-7b's instances in the default fleet


def test_grpc_stream_delivers_tokens_as_they_arrive_and_reports_timings(triton):
    chunks: list[str] = []
    with GrpcClient(triton.grpc_url) as c:
        r = c.generate(
            Request(
                "tell me",
                model="mistral-7b",
                slo_class="interactive",
                max_tokens=6,
                ignore_eos=True,
            ),
            on_text=chunks.append,
        )
    assert r.ok, r.summary()
    assert r.tokens == 6 and len(chunks) == 6 and "".join(chunks) == r.text
    # Tokens came one by one over time, not all at the end.
    assert r.token_times_s[-1] - r.token_times_s[0] > 0.05
    assert r.ttft_s is not None and 0 < r.ttft_s < r.total_s
    assert r.queue_s is not None and r.queue_s >= 0
    assert r.instance in MISTRAL_INSTANCES and r.finish_reason == "length"


def test_grpc_non_streaming_gets_one_response_with_the_prompt(triton):
    with GrpcClient(triton.grpc_url) as c:
        r = c.generate(Request("Once", model="mistral-7b", max_tokens=4, stream=False))
    assert r.ok and r.responses == 1 and r.tokens == 4
    assert r.text.startswith("Once") and r.ttft_s == pytest.approx(r.total_s, abs=0.01)


def test_http_generate_stream_with_a_ttft_deadline(triton):
    gen = HttpClient(triton.http_url).stream(
        Request("hi", model="llama-2-13b", ttft_slo_s=30.0, max_tokens=5, ignore_eos=True)
    )
    chunks = list(gen)
    r = gen.result
    assert r is not None and r.ok, r
    assert len(chunks) == 5 and r.tokens == 5 and r.instance == "a100-0"
    assert r.queue_s is not None


def test_asyncio_clients_run_requests_concurrently(triton):
    async def run() -> list:
        async with AsyncGrpcClient(triton.grpc_url) as g, AsyncHttpClient(triton.http_url) as h:
            reqs = [
                Request(
                    f"job {i}",
                    model="mistral-7b",
                    max_tokens=5,
                    ignore_eos=True,
                    slo_class="batch-1",
                )
                for i in range(3)
            ]
            return await asyncio.gather(
                *(g.generate(r) for r in reqs),
                *(h.generate(r) for r in reqs),
                g.generate(Request("x", model="no-such-model")),
            )

    *good, bad = asyncio.run(run())
    assert all(r.ok and r.tokens == 5 for r in good), [r.summary() for r in good]
    assert bad.outcome == "error" and "model" in (bad.error or "")


def test_cli_prints_tokens_then_the_timings(triton, capsys):
    rc = main(
        [
            "--url",
            triton.grpc_url,
            "--model",
            "mistral-7b",
            "--slo-class",
            "interactive",
            "--max-tokens",
            "4",
            "--ignore-eos",
            "hello",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert len(out[0].split()) == 4  # the streamed text
    assert out[-1].startswith("TTFT ") and "4 tokens" in out[-1] and "queue " in out[-1]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_shows_a_server_error_as_one_line_and_fails(triton, capsys, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    rc = main(
        [
            "--url",
            url,
            "--protocol",
            protocol,
            "--model",
            "mistral-7b",
            "--slo-class",
            "vip",
            "hello",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and "slo_class" in err and "vip" in err


def test_cli_reports_an_unreachable_server(capsys):
    rc = main(["--url", f"127.0.0.1:{free_port()}", "--protocol", "http", "--model", "m", "hi"])
    assert rc != 0 and "Connection refused" in capsys.readouterr().err
