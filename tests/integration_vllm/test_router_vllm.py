"""The `qlm` router over the real vLLM engine (issue 6: burst, eviction, cancellation on a fleet with a
real engine, the class priority forwarded into vLLM's priority scheduling).

One engine (max_num_seqs 2) behind two routers of the session server: `qlm-vllm` and the baseline
`fcfs-vllm` (conftest). Times are wall seconds (time_scale 1: the router's core uses the measured
CPU profile `cpu-2core`). Long requests that only need to be there are non-streaming: thousands of
streamed replies flood this Python client and delay what it sees of the one stream being timed.
Runs before test_vllm_engine.py (file order), whose last test stops the server.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc.aio as grpcaio
from conftest import MAX_NUM_SEQS, VllmServer
from tries import Tries
from vllm_client import ENGINE

from qlm_backend.core.config import ManagerConfig
from qlm_backend.vllm_engine.trace import parse_trace_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from streams import TimedStream, metric_value, timed_stream  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(180)]

MODEL = "tiny-llama"
# A resume's prompt is the original's plus the text produced before the eviction: more than this
# many tokens longer (an eviction only takes a request past its first token, and the 1 s before
# the urgent request goes produces hundreds).
RESUME_MIN_TOKENS = 8


def fields(
    max_tokens: int, slo_class: str, text: str, stream: bool = True, **extra: Any
) -> dict[str, Any]:
    return {
        "text_input": text,
        "model": MODEL,
        "slo_class": slo_class,
        "stream": stream,
        "sampling_parameters": json.dumps({"max_tokens": max_tokens, "ignore_eos": True}),
        "return_num_output_tokens": True,
        "return_finish_reason": True,
        **extra,
    }


def _metric(vs: VllmServer, name: str, **labels: str) -> float:
    return metric_value(vs.metrics_text(), name, **labels) or 0.0


def _engine_aborts(vs: VllmServer) -> float:
    return _metric(vs, "vllm:request_success_total", model=ENGINE, finished_reason="abort")


async def _wait_engine_idle(vs: VllmServer, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        m = vs.metrics()
        if m.get("vllm:num_requests_running") == 0 and m.get("vllm:num_requests_waiting") == 0:
            return
        assert time.monotonic() < deadline, f"the engine never emptied: {m}"
        await asyncio.sleep(0.05)


def _settled_generation_tokens(vs: VllmServer, timeout_s: float = 30) -> float:
    """vLLM's generated-token counter once it stops moving: it is published after the engine's
    steps, so a read just after a request ended was seen to miss its last tokens."""
    deadline = time.monotonic() + timeout_s
    last = vs.metrics().get("vllm:generation_tokens_total", 0.0)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = vs.metrics().get("vllm:generation_tokens_total", 0.0)
        if now == last:
            return now
        last = now
    return last


def _burst_is_in(vs: VllmServer, router: str, n_batch: int) -> bool:
    """Whether the engine runs MAX_NUM_SEQS requests and holds or queues the rest of the burst
    (waiting in the engine, or in the router's queue for `qlm`)."""
    text = vs.metrics_text()
    running = metric_value(text, "vllm:num_requests_running", model=ENGINE) or 0.0
    waiting = metric_value(text, "vllm:num_requests_waiting", model=ENGINE) or 0.0
    queued = metric_value(text, "qlm_queue_length", router=router, model=MODEL, slo_class="batch-2")
    return running >= MAX_NUM_SEQS and running + waiting + (queued or 0.0) >= n_batch


async def _burst_then_interactive(
    vs: VllmServer, router: str, n_batch: int, batch_tokens: int
) -> tuple[TimedStream, float]:
    """Returns the interactive request's stream and when it left this client (monotonic)."""
    client = grpcaio.InferenceServerClient(vs.grpc_url)
    batch = [TimedStream() for _ in range(n_batch)]
    tasks = [
        asyncio.create_task(
            timed_stream(
                client, router, fields(batch_tokens, "batch-2", f"job {i}", stream=False), b
            )
        )
        for i, b in enumerate(batch)
    ]
    # The interactive request goes as soon as the server shows the whole burst in (the engine's
    # seats full, the rest waiting in the engine or queued in the router), by its own gauges. A
    # fixed wait failed both ways: 1 s let the client stall for 6-20 s under load while the burst
    # drained (a burst admitted into the engine whole stalls this machine); 0.05 s let the
    # interactive request overtake the burst in a clean-clone run (fcfs seated it at once). A
    # scrape was seen taking up to 4.9 s during a burst's admission: with ~2-4 s waves of 2, at
    # least one wave still stands; the engine's trace judges each try. At most 1 s of polling: a
    # run where the priority router's burst never showed in the gauges within 10 s (scrapes
    # stalled) found the burst drained in all 4 tries.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and not await asyncio.to_thread(
        _burst_is_in, vs, router, n_batch
    ):
        await asyncio.sleep(0.05)
    sent = time.monotonic()
    inter = await timed_stream(
        client, router, fields(8, "interactive", "are you there"), TimedStream()
    )
    for b in batch:  # the rest of the burst is not needed: abort it (saves seconds)
        b.cancel()
    await asyncio.gather(*tasks)
    await client.close()
    await _wait_engine_idle(vs)
    return inter, sent


def _one_burst_run(vs: VllmServer, router: str, n_batch: int, batch_tokens: int) -> dict[str, Any]:
    t_start = time.monotonic()
    inter, inter_sent = asyncio.run(_burst_then_interactive(vs, router, n_batch, batch_tokens))
    assert inter.error is None and inter.first_token_s is not None, inter.error
    time.sleep(0.3)  # trace lines are logged after each final response
    traces = [t for t in vs.traces().values() if t["arrival"] >= t_start]
    mine = [t for t in traces if t["output_tokens"] == 8]
    assert len(mine) == 1
    h = mine[0]
    batch = [t for t in traces if t["output_tokens"] != 8]
    queue_s = float(inter.final["qlm_queue_s"][0])
    t_router = h["arrival"] - queue_s  # when the router had it (the engine's clock: monotonic)
    in_engine = sum(1 for t in batch if t["arrival"] <= t_router < t["finished"])
    # Only the qlm router holds requests back: the burst requests the engine had not seen yet
    # were in its queue (the interactive request left once the router's gauge showed them
    # there). fcfs and priority pass requests through their queue in milliseconds: a burst that
    # had not reached the engine was not ahead (a clean-clone run counted it so).
    arrived = sum(1 for t in batch if t["arrival"] <= t_router)
    in_router = n_batch - arrived if router == "qlm-vllm" and queue_s > 0 else 0
    return {
        # In the router's queue, then from the engine's arrival to its first token: free of
        # this client's own stalls (its asyncio loop was seen 4 s late here).
        "ttft_engine_s": round(queue_s + h["engine_first_token"] - h["arrival"], 3),
        "ttft_client_s": round(inter.first_token_s, 3),
        "router_queue_s": round(queue_s, 3),
        "burst_ahead": in_engine + in_router,
        # Evidence for a try whose burst had drained: when the interactive request left this
        # client and reached the router, and how many batch requests the engine had by then
        # received and finished (seconds from the burst's start).
        "inter_sent_s": round(inter_sent - t_start, 3),
        "inter_at_router_s": round(t_router - t_start, 3),
        "batch_traces": len(batch),
        "batch_arrived": arrived,
        "batch_finished": sum(1 for t in batch if t["finished"] <= t_router),
        "batch_first_arrival_s": round(
            min((t["arrival"] for t in batch), default=t_start) - t_start, 3
        ),
        "priorities": sorted({(int(t["output_tokens"] == 8), int(t["priority"])) for t in traces}),
    }


@pytest.mark.timeout(300)  # up to 4 tries a router; an fcfs try waits out its whole burst (~15 s)
def test_interactive_behind_a_batch_burst_is_served_sooner_under_qlm(
    vllm_server: VllmServer,
) -> None:
    """qlm (router queue, pulls as seats free) and priority (class priority into vLLM's priority
    scheduling) against fcfs, the same burst each. TTFT is taken to the engine's first token
    (its trace): the client-side figure adds the response path, which on this 2-core machine
    added ~1 s, varying; both are recorded."""
    # 4 waves of 2 on the engine, ~2-4 s a wave here: long enough that the burst still stands when
    # the interactive request gets to the router (600-token waves drained first in some runs; a
    # CI run that sent it a second after the burst found three waves done, then all four, in all
    # 4 tries: the client had stalled; it now follows the burst at once).
    n_batch, batch_tokens = 8, 1500
    runs: dict[str, dict[str, Any]] = {}
    for router in ("qlm-vllm", "priority-vllm", "fcfs-vllm"):
        # A run is judged only if the burst really stood ahead of the interactive request when it
        # arrived: the engine's seats full and at least one batch request waiting (in the engine,
        # or in the qlm router's queue). On this shared 2-core machine the client was seen to stall
        # for seconds, so that the burst had drained before the interactive request got there
        # (fcfs then gave it a free seat at once); such a run is recorded and repeated, never
        # judged (tries.py bounds how often).
        tries = Tries(f"router_burst_{router}", max_tries=4)
        while tries.more():
            run = _one_burst_run(vllm_server, router, n_batch, batch_tokens)
            run["attempts"] = len(tries.records) + 1
            ahead = run["burst_ahead"]
            evidence = {k: v for k, v in run.items() if k not in ("priorities", "attempts")}
            tries.add("judged" if ahead >= MAX_NUM_SEQS + 1 else "precondition", **evidence)
        tries.done(vllm_server.figures)
        runs[router] = run
    vllm_server.figures["router_burst"] = runs
    print(f"\nrouter over vLLM, interactive behind {n_batch} x {batch_tokens}: {runs}")
    # The priority and qlm routers forward the class priority (interactive 0, batch-2 2) into
    # vLLM's priority scheduling; fcfs is vLLM alone and sends none.
    assert runs["priority-vllm"]["priorities"] == runs["qlm-vllm"]["priorities"] == [(0, 2), (1, 0)]
    assert runs["fcfs-vllm"]["priorities"] == [(0, 0), (1, 0)]
    assert all(r["burst_ahead"] >= MAX_NUM_SEQS + 1 for r in runs.values()), (
        f"no queue ever formed ahead of the interactive request in 4 tries: {runs}"
    )
    # fcfs: the interactive request waits for the whole burst ahead of it (3 more waves); qlm and
    # priority give it the first free seat.
    fcfs = runs["fcfs-vllm"]["ttft_engine_s"]
    # Expected ~1 wave against ~4; under load from other runs the ratio was seen at 0.25-0.53.
    assert runs["qlm-vllm"]["ttft_engine_s"] < 0.75 * fcfs
    assert runs["priority-vllm"]["ttft_engine_s"] < 0.75 * fcfs


@pytest.mark.timeout(400)  # up to 6 tries of ~20-30 s each (two 6000-token requests, a resume)
def test_eviction_for_an_urgent_request_and_the_evicted_one_completes_exactly(
    vllm_server: VllmServer,
) -> None:
    """Two 6000-token batch-1 requests fill both seats (~6 s of work each); an interactive request
    with a 0.1 s TTFT SLO arrives. The qlm router evicts one (an engine abort), serves the urgent
    one, resumes the evicted one with its prompt plus the text already produced, and both batch
    requests end with exactly 6000 tokens and no repeated text.

    Seconds of slack on purpose: with 2000-token requests (~2 s) a loaded clean-clone run saw this
    client's half-second wait take 1.8 s, so that both had ended before the urgent request was
    sent. A try where the urgent request still reached the router after a batch request ended is
    repeated, never judged (read from the engine's trace).

    The batch requests are non-streaming here: streamed, their replies kept this Python client's
    loop so busy that the urgent request left it late (seen in a clean-clone run). The streamed
    no-duplicate case runs on the simulated engines (tests/integration/test_router.py); the
    router's resume path is the same for both engines."""

    def evictions() -> float:
        # An engine abort plus a resume with prompt + produced text (recompute): kind "evict".
        return _metric(vllm_server, "qlm_lso_total", router="qlm-vllm", kind="evict")

    n_tokens = 6000  # prompt + max_tokens, and the resumed prompt + the rest, < max_model_len 8192

    async def scenario() -> tuple[TimedStream, list[TimedStream], float, float]:
        t_begin = time.monotonic()
        client = grpcaio.InferenceServerClient(vllm_server.grpc_url)
        batch = [TimedStream() for _ in range(MAX_NUM_SEQS)]
        tasks = [
            asyncio.create_task(
                timed_stream(
                    client, "qlm-vllm", fields(n_tokens, "batch-1", f"b{i}", stream=False), b
                )
            )
            for i, b in enumerate(batch)
        ]
        # Only a request whose first token is out may be evicted (its TTFT SLO is met): a second
        # in, both run, with ~5 s of work left each.
        await asyncio.sleep(1.0)
        t_sent = time.monotonic()
        urgent = await timed_stream(
            client, "qlm-vllm", fields(8, "interactive", "urgent", ttft_slo_s=0.1), TimedStream()
        )
        await asyncio.gather(*tasks)
        await client.close()
        return urgent, batch, t_begin, t_sent

    tries: list[dict[str, Any]] = []
    # 6 tries: on 2026-12-03 two tries in a row here were not judged (the client, stalled 14-15 s
    # by the engine's generation, sent the urgent request after both batch requests had ended);
    # every try is recorded with its cause and tries.py bounds the session's unjudged share.
    record = Tries("router_eviction", max_tries=6)
    # The router evicts on an instance at most once per cooldown: a try right after one that
    # evicted (not judged) would see none.
    cooldown_s = ManagerConfig().qlm_evict_cooldown_s or ManagerConfig().evict_cooldown_s
    last_eviction = -math.inf
    while record.more():
        attempt = len(record.records) + 1
        asyncio.run(_wait_engine_idle(vllm_server))
        time.sleep(max(0.0, last_eviction + cooldown_s + 0.5 - time.monotonic()))
        ev0, ab0 = evictions(), _engine_aborts(vllm_server)
        urgent, batch, t_begin, t_sent = asyncio.run(scenario())
        assert urgent.error is None, urgent.error
        time.sleep(0.3)  # trace lines are logged after each final response
        traces = [t for t in vllm_server.traces().values() if t["arrival"] >= t_begin]
        mine = [t for t in traces if t["output_tokens"] == 8 and t["arrival"] >= t_sent]
        queue_s = float(urgent.final["qlm_queue_s"][0])
        t_router = mine[0]["arrival"] - queue_s if mine else math.inf
        # Originals and the resume told apart by their prompts, not by when they arrived: a
        # resume's prompt carries the text produced before the eviction, and the router may hold
        # the second batch request back until after the urgent one was sent (a clean clone of
        # d86df4d saw it reach the engine 2 s after the first, and count as a resume).
        batch_traces = [t for t in traces if t["priority"] == 1]
        p0 = min((t["prompt_tokens"] for t in batch_traces), default=0.0)
        originals = [t for t in batch_traces if t["prompt_tokens"] <= p0 + RESUME_MIN_TOKENS]
        first_end = min((t["finished"] for t in originals), default=0.0)
        # The engine's own record of the eviction: an original batch request cut short.
        cut_short = [t for t in originals if t["output_tokens"] < n_tokens]
        tries.append(
            {
                "urgent_at_router_s": round(t_router - t_sent, 3),
                "batch_first_token_end_tokens_prompt": [
                    (
                        round(t["engine_first_token"] - t_sent, 3),
                        round(t["finished"] - t_sent, 3),
                        int(t["output_tokens"]),
                        int(t["prompt_tokens"]),
                    )
                    for t in batch_traces
                ],
                "evictions": evictions() - ev0,
            }
        )
        evicted = evictions() >= ev0 + 1
        if evicted:
            last_eviction = t_sent
        # Judged: an eviction the engine saw (a batch request aborted early), or none although
        # both batch requests still ran when the urgent one reached the router. Not judged: the
        # batch requests had ended first (this client stalled), or the router, behind on its
        # engine streams, evicted one the engine had already finished (it then resumes it for
        # the tokens it had not yet read; nothing to stop in the engine, so no abort to see).
        # Only a request whose first token is out may be evicted: "no eviction" is judged only
        # when both batch requests had theirs before the urgent one reached the router (a loaded
        # clean-clone run once saw the second still in its 6000-token prefill then).
        both_running = len(originals) == MAX_NUM_SEQS and all(
            t["engine_first_token"] < t_router for t in originals
        )
        if (evicted and cut_short) or (not evicted and both_running and t_router < first_end - 0.3):
            record.add("judged", **tries[-1])
        elif evicted:
            # The router evicted a request the engine had already finished: it was behind on
            # that stream's responses (this machine stalled it), nothing was left to stop.
            record.add("client_stall", **tries[-1])
        elif not both_running:
            record.add("precondition", why="a batch request had no first token yet", **tries[-1])
        else:
            record.add("client_stall", why="the batch ended before the urgent one", **tries[-1])
    record.done(vllm_server.figures)
    assert evictions() >= ev0 + 1, (tries, [(b.tokens, b.error) for b in batch])
    # The eviction stopped the engine's work: one batch request cut short there, and vLLM counts
    # the abort (once its step publishes).
    assert cut_short, tries
    deadline = time.monotonic() + 10
    while _engine_aborts(vllm_server) < ab0 + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _engine_aborts(vllm_server) >= ab0 + 1, tries
    resumed = [t for t in batch_traces if t["prompt_tokens"] > p0 + RESUME_MIN_TOKENS]
    assert len(resumed) == 1, resumed
    # Tokens the evicted request had produced before the eviction (the resume asks for the rest).
    before_tokens = n_tokens - int(resumed[0]["output_tokens"])
    for b in batch:
        assert b.error is None, b.error
        # max_tokens in total across eviction and resume (the resume's prompt is re-tokenized;
        # the router asks for the tokens still owed).
        assert b.tokens == n_tokens
        text = "".join(b.texts)
        # What was produced before the eviction is not sent again (a resume that echoed its
        # prompt, or a relay that re-sent the stream, would repeat the text so far whole: vLLM's
        # detokenizer did so for one exact resume in ten, docs/engines.md). The probe is long
        # and no longer than the text so far (at least half a character per token).
        probe = text[: min(2000, before_tokens // 2)]
        second = text.find(probe, 1)
        assert second == -1, (
            f"the first {len(probe)} characters again at {_occurrences(text, probe)} of "
            f"{len(text)} (responses of {[len(t) for t in b.texts]} characters; the resume "
            f"asked for {int(resumed[0]['output_tokens'])} tokens after {before_tokens}): "
            f"{text[max(0, second - 60) : second + 100]!r}",
            tries[-1],
        )
    # The resume found the evicted request's blocks in vLLM's prefix cache (same tokens: prompt +
    # text so far), and the router learnt it (its plan charges a resume what was not cached).
    cached = _metric(
        vllm_server, "qlm_resume_tokens_total", router="qlm-vllm", instance="cpu-0", kind="cached"
    )
    context = _metric(
        vllm_server, "qlm_resume_tokens_total", router="qlm-vllm", instance="cpu-0", kind="context"
    )
    assert resumed[0]["cached_tokens"] > 0 and cached > 0, (resumed, cached, context)
    vllm_server.figures["router_eviction"] = {
        "resume_cached_tokens": int(resumed[0]["cached_tokens"]),
        "resume_prompt_tokens": int(resumed[0]["prompt_tokens"]),
        "router_resume_tokens": {"context": context, "cached": cached},
        "urgent_ttft_s": round(urgent.first_token_s or -1, 3),
        # In the router's queue, then the engine's arrival to its first token (its trace).
        "urgent_ttft_engine_s": round(
            queue_s + mine[0]["engine_first_token"] - mine[0]["arrival"], 3
        )
        if mine
        else None,
        "urgent_router_queue_s": round(queue_s, 4),
        "evictions": evictions() - ev0,
        "batch_done_s": [round(b.done_s or -1, 3) for b in batch],
        "attempts": attempt,
        "tries": tries,
    }
    print(f"\nrouter over vLLM, eviction: {vllm_server.figures['router_eviction']}")


def _occurrences(text: str, probe: str, most: int = 8) -> list[int]:
    """Where `probe` appears in `text` after its start: a model repeating itself shows a period,
    a resume that sent the text so far again shows one place, at the resume."""
    found, at = [], text.find(probe, 1)
    while at != -1 and len(found) < most:
        found.append(at)
        at = text.find(probe, at + 1)
    return found


def _lost_cancel_causes(vs: VllmServer, log_from: int, ran_out: list[str]) -> list[tuple[str, str]]:
    """For each engine request that ran all its tokens although its client cancelled: (cause,
    evidence), from the server's log since `log_from`."""
    log = vs.log_path.read_text(errors="replace")[log_from:]
    ids = parse_trace_text(log)
    stopped = set(re.findall(r"qlm-vllm: stream (\S+): stopped \(cancel\)", log))
    seen = set(re.findall(r"qlm-vllm: (q\d+): cancelled by its client", log))
    out = []
    for rid in ran_out:
        sid = ids.get(rid, {}).get("triton_id", "")
        told = f"request {rid} cancelled by the client" in log
        if sid in stopped:
            cause = "engine_fault" if told else "frontend_lost_cancel"
            out.append((cause, f"{sid}: the router stopped it; engine told: {told}"))
        elif sid.split(".")[0] in seen:
            out.append(("router_fault", f"{sid}: the router saw the cancel, kept the stream"))
        else:
            out.append(("frontend_lost_cancel", f"{sid}: the router was never told"))
    return out


def _all_in(vs: VllmServer, queued: int, timeout_s: float = 30) -> bool:
    """True once the engine runs MAX_NUM_SEQS requests and the qlm router queues `queued` batch-2
    ones (its gauge is pushed every metrics interval)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = vs.metrics_text()
        running = metric_value(text, "vllm:num_requests_running", model=ENGINE) or 0
        waiting = (
            metric_value(text, "qlm_queue_length", router="qlm-vllm", slo_class="batch-2") or 0
        )
        if running >= MAX_NUM_SEQS and waiting >= queued:
            return True
        time.sleep(0.1)
    return False


# Up to 5 tries, each waiting up to 30 s for its requests to arrive and 120 s for their ends on a
# stalling machine: more than the file's 180 s.
@pytest.mark.timeout(600)
def test_cancel_while_queued_and_while_streaming(vllm_server: VllmServer) -> None:
    """Four 6000-token batch requests: two stream from the engine, two wait in the router; the
    client cancels all four a second in. The queued ones leave the router's queue (never reaching
    the engine), the streaming ones are aborted in the engine, and the engine stops early.

    Triton 2.51's gRPC frontend sometimes loses a stream cancel: when the stream's pending read
    fails before the cancel notification is processed, the context is finished without cancelling
    its in-flight request, so is_cancelled() never turns true and the request runs to its end
    with its responses dropped (seen with --log-verbose=1: "Cancellation notification received
    ... step COMPLETE" and no "Issuing cancellation"; in 3 of 13 tries here, mostly for requests
    that had no response yet). Upstream fixed this race after 2.51 (triton-inference-server/server
    #8078, 2025). Both hops cross that frontend: this client to the router, and the router to the
    engine. Each engine request that ran all its tokens is put down to a cause from the logs (the
    router logs each client cancel it sees and each engine stream it stops; the engine logs each
    cancel it is told of and the router's stream id): never seen by the router, or stopped by the
    router but never told to the engine, is the frontend's (the try is recorded and repeated,
    not judged); seen by the router but its stream not stopped, or told to the engine that kept
    generating, is ours and fails the test (tries.py)."""

    def outcomes() -> dict[str, float]:
        return {
            kind: _metric(
                vllm_server,
                "qlm_requests_total",
                router="qlm-vllm",
                slo_class="batch-2",
                outcome=kind,
            )
            for kind in ("cancelled", "attained", "missed", "failed", "rejected")
        }

    n, n_tokens = MAX_NUM_SEQS + 2, 6000  # 2 stream from the engine, 2 wait in the router
    lost: list[dict[str, int]] = []  # tries not judged, and why
    judged = False
    tries = Tries("router_cancel", max_tries=5, cancels=True)
    while tries.more():
        log_from = len(vllm_server.log_path.read_text(errors="replace"))
        asyncio.run(_wait_engine_idle(vllm_server, timeout_s=120))
        gen0 = _settled_generation_tokens(vllm_server)  # what earlier tests made, all counted
        o0, ab0 = outcomes(), _engine_aborts(vllm_server)
        t_start = time.monotonic()
        streams = [TimedStream() for _ in range(n)]

        async def scenario(streams: list[TimedStream] = streams) -> bool:
            client = grpcaio.InferenceServerClient(vllm_server.grpc_url)
            tasks = [
                asyncio.create_task(
                    timed_stream(client, "qlm-vllm", fields(n_tokens, "batch-2", f"c{i}"), s)
                )
                for i, s in enumerate(streams)
            ]
            # Cancelled once all four are in the server: two running in the engine, two in the
            # router's queue (both sides' gauges). A fixed wait was not enough here: with this
            # client stalled, requests it had not yet written were never sent at all, and the
            # outcomes awaited below never came.
            arrived = await asyncio.to_thread(_all_in, vllm_server, n - MAX_NUM_SEQS)
            for s in streams:
                s.cancel()
            await asyncio.gather(*tasks)
            await client.close()
            return arrived

        if not asyncio.run(scenario()):
            lost.append({"not_all_arrived_in_30_s": 1})
            tries.add("client_stall", why="the requests never all reached the server in 30 s")
            asyncio.run(_wait_engine_idle(vllm_server, timeout_s=120))
            continue
        # Every request ends in the router, whatever way: cancelled, or (a lost cancel) finished.
        deadline = time.monotonic() + 120  # generous: the machine is shared (load 12 seen)
        while True:
            delta = {k: v - o0[k] for k, v in outcomes().items()}
            if sum(delta.values()) >= n:
                break
            assert time.monotonic() < deadline, (
                "requests neither cancelled nor finished",
                delta,
                [
                    ln
                    for ln in vllm_server.metrics_text().splitlines()
                    if ln.startswith(("qlm_requests_total", "qlm_queue_length", "vllm:num_req"))
                ],
                [(x.tokens, x.error) for x in streams],
            )
            time.sleep(0.1)
        asyncio.run(_wait_engine_idle(vllm_server, timeout_s=60))
        time.sleep(0.3)  # trace lines are logged after each request ends
        traces = {r: t for r, t in vllm_server.traces().items() if t["arrival"] >= t_start}
        reached = list(traces.values())
        ran_out = [r for r, t in traces.items() if t["output_tokens"] >= n_tokens]
        lost_here = {
            "client_to_router": int(n - delta["cancelled"]),
            "router_to_engine": len(ran_out),
        }
        causes = _lost_cancel_causes(vllm_server, log_from, ran_out)
        if not any(lost_here.values()):
            judged = True
            tries.add("judged")
            break
        lost.append(lost_here)
        faults = [c for c in causes if c[0] != "frontend_lost_cancel"]
        tries.add(faults[0][0] if faults else "frontend_lost_cancel", lost=lost_here, causes=causes)
    tries.done(vllm_server.figures)
    vllm_server.figures["router_cancel_tries_not_judged"] = lost
    assert judged, f"no try had every cancel reach the router and the engine: {lost}"
    assert delta == {"cancelled": n, "attained": 0, "missed": 0, "failed": 0, "rejected": 0}
    assert all(s.error is not None and s.done_s is None for s in streams)
    # The engine saw only what the router dispatched before the cancels (the two streaming ones;
    # a queued one pulled into a seat just freed before its own cancel was seen makes three), and
    # every one of them was aborted there, early.
    assert MAX_NUM_SEQS <= len(reached) <= n
    assert all(t["output_tokens"] < n_tokens for t in reached), lost
    deadline = time.monotonic() + 30
    while _engine_aborts(vllm_server) < ab0 + len(reached) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _engine_aborts(vllm_server) == ab0 + len(reached)
    generated = _settled_generation_tokens(vllm_server) - gen0
    assert generated < len(reached) * n_tokens  # stopped early
