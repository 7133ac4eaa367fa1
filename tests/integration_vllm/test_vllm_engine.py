"""The real vLLM engine model behind a real tritonserver: contract, cancellation, priority, cleanup.

The weights are random, so the text means nothing; what is checked is what the engine does with
requests (token counts, batching, abort, priority scheduling) and what reaches the client.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from typing import Any

import pytest
from conftest import MAX_NUM_SEQS, VllmServer
from tries import Tries, cancel_cause
from vllm_client import ALL_OUTPUTS, Stream, generate, make_inputs

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

PROMPT = "The lighthouse keeper rose before the gulls"


def test_stream_token_count_equals_max_tokens(vllm_server: VllmServer) -> None:
    r = generate(
        vllm_server.grpc_url,
        PROMPT,
        True,
        {"max_tokens": 48, "ignore_eos": True},
        outputs=("text_output", "num_output_tokens", "finish_reason"),
        exclude_input_in_output=True,
        return_num_output_tokens=True,
        return_finish_reason=True,
    )
    assert r.error is None
    counts = [int(x.outputs["num_output_tokens"][0]) for x in r.replies]
    assert sum(counts) == 48
    assert r.replies[-1].final
    assert r.replies[-1].outputs["finish_reason"][0] == b"length"
    assert all(x.outputs["finish_reason"][0] == b"None" for x in r.replies[:-1])


def test_non_streaming_prepends_prompt(vllm_server: VllmServer) -> None:
    sp = {"max_tokens": 12, "ignore_eos": True, "seed": 7, "temperature": 0.0}
    full = generate(vllm_server.grpc_url, PROMPT, False, sp)
    assert full.error is None and len(full.replies) == 1
    text = full.text()
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    only_new = generate(vllm_server.grpc_url, PROMPT, False, sp, exclude_input_in_output=True)
    assert only_new.error is None
    # Greedy decoding: the same continuation, without the prompt.
    assert PROMPT + only_new.text() == text


def test_sampling_from_request_parameters(vllm_server: VllmServer) -> None:
    r = generate(
        vllm_server.grpc_url,
        PROMPT,
        False,
        None,
        outputs=("text_output", "num_output_tokens"),
        parameters={"max_tokens": 5, "ignore_eos": True},
        return_num_output_tokens=True,
    )
    assert r.error is None
    assert int(r.replies[-1].outputs["num_output_tokens"][0]) == 5


def test_return_outputs_present_and_consistent(vllm_server: VllmServer) -> None:
    flags = {
        "return_finish_reason": True,
        "return_cumulative_logprob": True,
        "return_logprobs": True,
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
    }
    sp = {"max_tokens": 16, "ignore_eos": True, "logprobs": 0}
    r = generate(
        vllm_server.grpc_url,
        PROMPT,
        True,
        sp,
        outputs=ALL_OUTPUTS,
        exclude_input_in_output=True,
        **flags,
    )
    assert r.error is None
    # 0-d, as vllm_backend sends it: read with item(), not [0].
    n_in = {int(x.outputs["num_input_tokens"].item()) for x in r.replies}
    assert len(n_in) == 1 and n_in.pop() > 0
    total_lp = 0.0
    n_out = 0
    for x in r.replies:
        assert set(ALL_OUTPUTS) <= set(x.outputs)
        entries = json.loads(x.outputs["logprobs"][0])
        new = int(x.outputs["num_output_tokens"][0])
        assert len(entries) == new  # one log-probability entry per new token
        n_out += new
        for e in entries:
            (lp,) = e.values()  # logprobs=0: the sampled token only
            assert lp["logprob"] <= 0.0
            total_lp += lp["logprob"]
        # The cumulative log-probability is the running sum of the per-token ones.
        assert math.isclose(float(x.outputs["cumulative_logprob"][0]), total_lp, abs_tol=1e-3)
    assert n_out == 16
    # Non-streaming: one response with the whole request's values.
    ns = generate(vllm_server.grpc_url, PROMPT, False, sp, outputs=ALL_OUTPUTS, **flags)
    assert ns.error is None and len(ns.replies) == 1
    out = ns.replies[0].outputs
    assert int(out["num_output_tokens"][0]) == 16
    assert len(json.loads(out["logprobs"][0])) == 16
    assert out["finish_reason"][0] == b"length"
    assert out["num_input_tokens"].item() == r.replies[0].outputs["num_input_tokens"].item()
    # Without `logprobs` in the sampling parameters vLLM computes none: as vllm_backend, the
    # flags still return the outputs, as "null" and NaN.
    no_lp = generate(
        vllm_server.grpc_url,
        PROMPT,
        False,
        {"max_tokens": 4, "ignore_eos": True},
        outputs=ALL_OUTPUTS,
        **flags,
    )
    assert no_lp.error is None
    out = no_lp.replies[0].outputs
    assert out["logprobs"][0] == b"null" and math.isnan(float(out["cumulative_logprob"][0]))


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"max_tokens": 4, "bogus_key": 1}, "bogus_key"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4, "temperature": "hot"}, "temperature"),
    ],
)
def test_bad_request_error_names_field(vllm_server: VllmServer, sampling: dict, field: str) -> None:
    r = generate(vllm_server.grpc_url, PROMPT, False, sampling)
    assert r.error is not None and field in r.error
    assert not r.replies


def test_stream_without_exclude_input_is_an_error(vllm_server: VllmServer) -> None:
    r = generate(
        vllm_server.grpc_url, PROMPT, True, {"max_tokens": 4}, exclude_input_in_output=False
    )
    assert r.error is not None and "exclude_input_in_output" in r.error


def _cancel_once(vs: VllmServer) -> tuple[float, float, dict[str, float], float, float]:
    """One 2,000-token stream cancelled after its first reply; returns (aborted, generated,
    after, sent, cancelled): the last two are this client's clock (monotonic)."""
    before = vs.metrics()
    sent = time.monotonic()
    s = Stream(
        vs.grpc_url,
        make_inputs(
            PROMPT,
            True,
            {"max_tokens": 2000, "ignore_eos": True},
            exclude_input_in_output=True,
            return_num_output_tokens=True,
        ),
        outputs=("text_output", "num_output_tokens"),
    )
    reply = s.next()
    assert not isinstance(reply, str), reply
    cancelled = time.monotonic()
    s.cancel()
    s.client.close()
    # The engine stops generating for it: the abort is counted and nothing stays running. Generous
    # deadline: with other test runs on this 2-core machine (load average 12 seen) every IPC lags.
    deadline = time.monotonic() + 30
    aborted = generated = 0.0
    after = vs.metrics()
    while time.monotonic() < deadline:
        after = vs.metrics()
        aborted = after.get("vllm:request_success_total:abort", 0) - before.get(
            "vllm:request_success_total:abort", 0
        )
        generated = after["vllm:generation_tokens_total"] - before.get(
            "vllm:generation_tokens_total", 0
        )
        if after.get("vllm:num_requests_running", 1) == 0 and (aborted >= 1 or generated >= 2000):
            break
        time.sleep(0.2)
    return aborted, generated, after, sent, cancelled


def test_cancel_mid_stream_aborts_engine_request(vllm_server: VllmServer) -> None:
    # Under load the first reply reached this client 1-3 s after the engine sent it, by which time
    # the engine (~1,000 tokens/s for one stream) had produced all 2,000 tokens and the cancel had
    # nothing left to stop (the trace said "length"): such a try is recorded and repeated, never
    # judged (tries.py bounds how often).
    tries = Tries("engine_cancel", max_tries=3, cancels=True)
    while tries.more():
        aborted, generated, after, sent, cancelled = _cancel_once(vllm_server)
        if generated < 2000:
            tries.add("judged", generated=generated)
            continue
        # It ran to its end. The engine's trace says when: a cancel sent after that had nothing
        # to stop (this client read its first reply late); one sent before was lost on the way.
        time.sleep(0.3)
        traces = {r: t for r, t in vllm_server.traces().items() if t["arrival"] >= sent}
        finished = max((t["finished"] for t in traces.values()), default=math.inf)
        log = vllm_server.log_path.read_text(errors="replace")
        cause = cancel_cause(cancelled, finished, log, traces)
        tries.add(cause, generated=generated, cancel_after_end_s=round(cancelled - finished, 3))
    tries.done(vllm_server.figures)
    assert aborted == 1
    assert after["vllm:num_requests_running"] == 0
    assert generated < 2000  # stopped early
    # And the server keeps serving.
    r = generate(
        vllm_server.grpc_url, PROMPT, True, {"max_tokens": 4}, exclude_input_in_output=True
    )
    assert r.error is None and r.replies[-1].final


def test_running_and_waiting_gauges(vllm_server: VllmServer) -> None:
    """vllm:num_requests_running / _waiting come from the glue's own counts (waiting: sent to the
    engine, no token yet; running: first token until finished), so they are right at any moment:
    max_num_seqs running and the rest waiting while the engine is full, both 0 once all are done,
    aborted ones included."""
    n = MAX_NUM_SEQS + 2
    full = (MAX_NUM_SEQS, n - MAX_NUM_SEQS)
    seen: list[tuple[float, float]] = []
    # A metrics scrape took up to 4.9 s on this shared machine, longer than the window in which
    # the engine is full (2,000 tokens a request), and a loaded client sent its streams seconds
    # apart (a clean clone saw at most one request in the engine at once): a scenario whose
    # scrapes never saw the engine full is recorded with how many requests they saw in it at
    # most, and repeated; the judged try is the one that saw it (tries.py bounds how often).
    tries = Tries("engine_gauges", max_tries=3)
    while tries.more():
        seen = _fill_and_watch(vllm_server, n, full)
        most = max((r + w for r, w in seen), default=0)
        cause = "judged" if full in seen else "precondition"
        tries.add(cause, most_in_engine=most, scrapes=len(seen))
    tries.done(vllm_server.figures)
    assert full in seen, seen
    deadline = time.monotonic() + 30
    m = vllm_server.metrics()
    while (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]) != (0, 0):
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
        m = vllm_server.metrics()


def _fill_and_watch(vs: VllmServer, n: int, full: tuple[int, int]) -> list[tuple[float, float]]:
    streams = [
        Stream(
            vs.grpc_url,
            make_inputs(
                f"{PROMPT} {i}",
                True,
                {"max_tokens": 2000, "ignore_eos": True},
                exclude_input_in_output=True,
            ),
            send=False,
        )
        for i in range(n)
    ]
    for s in streams:
        s.send()
    seen: list[tuple[float, float]] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = vs.metrics()
            load = (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"])
            seen.append(load)
            # Never more running than seats, never more in the engine than were sent.
            assert load[0] <= MAX_NUM_SEQS and sum(load) <= n, seen
            if load == full or load == (0, 0) and len(seen) > 1 and seen[-2] != (0, 0):
                break
            time.sleep(0.01)
    finally:
        for s in streams:  # 2,000 tokens each, all 4 would take seconds: abort them
            s.cancel()
            s.client.close()
    return seen


def _priority_run(vs: VllmServer, use_priority: bool, low_tokens: list[int]) -> dict[str, Any]:
    """Long requests fill the engine (max_num_seqs) and its queue; then one short urgent request
    arrives. The long ones differ in length so that each is known by its token count in the
    engine's trace, and seats free one at a time.

    Ordering is judged on the engine's own times (its per-request trace: vLLM's scheduled and
    first-token timestamps); the long requests are non-streaming, so the client sees their first
    token only at their end. "Queued" is the engine's view too: a long request the scheduler had
    not seated when the urgent one reached vLLM's scheduler. The urgent request streams, and its first token as
    this client saw it is compared as well."""
    url = vs.grpc_url
    low_prio, high_prio = (10, 0) if use_priority else (0, 0)
    t_start = time.monotonic()
    # The long ones are non-streaming: one reply each. Streamed, their thousands of replies
    # flood this Python client (and Triton's gRPC writes to it), and the urgent request's first
    # reply was seen here up to 5 s after the engine sent it.
    lows = [
        Stream(
            url,
            make_inputs(f"{PROMPT} {i}", False, {"max_tokens": n, "ignore_eos": True}, low_prio),
            send=False,
        )
        for i, n in enumerate(low_tokens)
    ]
    high = Stream(
        url,
        make_inputs(
            PROMPT,
            True,
            {"max_tokens": 8, "ignore_eos": True},
            priority=high_prio,
            exclude_input_in_output=True,
        ),
        send=False,
    )
    # Connected first, then sent back to back: connecting takes up to a second each when the
    # machine is busy, long enough for the first long request to finish before the last arrives.
    for s in lows:
        s.send()
    # The urgent request goes once the engine holds a queue, by its own gauges. A fixed wait (1 s)
    # was tried: this VM was seen to stall this client for 4-6 s while vLLM ran, so that the long
    # requests reached the engine just before the urgent one, or had all started already. One
    # scrape was seen taking up to 4.9 s here, so the queue is made ~3 waves (~7 s) deep. Whether
    # it still stood when the urgent request came is judged afterwards on the engine's trace.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = vs.metrics()
        if (
            m.get("vllm:num_requests_running", 0) >= MAX_NUM_SEQS
            and m.get("vllm:num_requests_waiting", 0) >= 3
        ):
            break
        time.sleep(0.1)
    high.send()
    results = [s.collect() for s in [*lows, high]]
    assert all(r.error is None for r in results), [r.error for r in results]
    client_high_ttft = results[-1].first_token_s
    client_high_sent = high.t0
    time.sleep(0.3)  # trace lines are logged after the final response
    by_tokens = {
        int(t["output_tokens"]): t for t in vs.traces().values() if t["arrival"] >= t_start
    }
    assert set(by_tokens) == {*low_tokens, 8}, sorted(by_tokens)
    h = by_tokens[8]
    t_high = h["arrival"]

    def rel(t: dict[str, float], key: str) -> float:
        return round(t[key] - t_high, 3)

    # Waiting ahead of it: in vLLM's waiting queue before the urgent request got there (its queued
    # time; the glue's arrival is a few ms earlier, and a seat that freed in between went to a long
    # request, seen here) and not yet scheduled then. A long request that reached the scheduler
    # after the urgent one is behind it even under fcfs: on a loaded machine two of them were seen
    # reaching the engine only after the urgent request, sent a second later.
    t_sched = h["queued"] or t_high
    queued = {
        n: t for n, t in by_tokens.items() if n != 8 and 0 < t["queued"] < t_sched < t["scheduled"]
    }
    out = {
        "high_ttft_s": rel(h, "engine_first_token"),
        "high_client_ttft_s": round(client_high_ttft, 3),
        # Where the client's extra time goes: request path (client send -> the glue) and
        # response path (the glue's send -> the client).
        "high_request_path_s": round(t_high - client_high_sent, 3),
        "high_response_path_s": round(client_high_sent + client_high_ttft - h["first_sent"], 3),
        "queued": len(queued),
        "queued_first_token_s": sorted(rel(t, "engine_first_token") for t in queued.values()),
        "low_first_token_s": {n: rel(t, "engine_first_token") for n, t in by_tokens.items()},
        # Each request's vLLM queued and scheduled times, relative to the urgent one's queued time.
        "queued_scheduled_s": {
            n: (round(t["queued"] - t_sched, 3), round(t["scheduled"] - t_sched, 3))
            for n, t in by_tokens.items()
        },
    }
    print(f"\npriority={use_priority}: {out}")
    return out


def test_priority_serves_urgent_request_before_queued_ones(vllm_server: VllmServer) -> None:
    # 2 run (max_num_seqs), 5 queue; long enough (the shortest ~2.5 s at this engine's speed)
    # that a queue still stands when the urgent request arrives, even late. Distinct, so that each
    # is known by its token count in the trace.
    low_tokens = [2400, 2600, 2800, 3000, 3200, 3400, 3600]
    min_queued = 2  # what the ratio below needs: fcfs seats the urgent one after them all

    def run(use_priority: bool) -> dict[str, Any]:
        # On this shared machine the back-to-back sends were seen reaching the engine 1.8 s apart
        # under load, and the urgent one arriving seconds late, so that long requests finished
        # before it arrived: a run with fewer than min_queued still waiting has no real queue;
        # it is recorded and repeated (up to 4 times), never judged (tries.py bounds how often).
        tries = Tries(f"engine_priority_{use_priority}", max_tries=4)
        while tries.more():
            r = _priority_run(vllm_server, use_priority, low_tokens)
            r["attempts"] = len(tries.records) + 1
            ok = r["queued"] >= min_queued
            tries.add(
                "judged" if ok else "precondition",
                queued=r["queued"],
                queued_scheduled_s=r["queued_scheduled_s"],
            )
        tries.done(vllm_server.figures)
        return r

    fcfs = run(False)
    prio = run(True)
    vllm_server.figures["priority_test"] = {"without_priority": fcfs, "with_priority": prio}
    assert fcfs["queued"] >= min_queued and prio["queued"] >= min_queued, (fcfs, prio)
    # Without priority the urgent request waits behind every queued long one (seated in the same
    # engine step as the last of them when two seats free at once: the same first-token time,
    # seen once at 18.64 s against 18.64 s) ...
    assert fcfs["high_ttft_s"] >= max(fcfs["queued_first_token_s"])
    # ... with it, it takes the first free seat, before any of them, and much sooner.
    assert prio["high_ttft_s"] < min(prio["queued_first_token_s"])
    assert prio["high_ttft_s"] < 0.75 * fcfs["high_ttft_s"]
    # Not asserted on the client's clock: the response path (the glue's send -> this client,
    # through Triton's gRPC frontend, on the core the engine's scheduler and stub also use) took
    # 1-3.3 s in runs where the engine's own first token came 0.3 s after arrival; recorded.


def test_throughput_figures(vllm_server: VllmServer) -> None:
    """Not pass/fail on speed: records tokens/s through Triton at 1 and MAX_NUM_SEQS streams."""
    for n in (1, MAX_NUM_SEQS):
        results: list = [None] * n

        def one(i: int, results: list = results) -> None:
            results[i] = generate(
                vllm_server.grpc_url,
                f"{PROMPT} {i}",
                True,
                {"max_tokens": 128, "ignore_eos": True},
                exclude_input_in_output=True,
            )

        t0 = time.monotonic()
        ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        el = time.monotonic() - t0
        assert all(r.error is None for r in results)
        vllm_server.figures[f"tok_s_{n}_streams"] = round(n * 128 / el)


def test_zz_no_orphans_after_stop(vllm_server: VllmServer) -> None:
    """Runs last (name): a crashed stub must not leave vLLM's EngineCore behind once the server
    stops, because stop() signals the whole process group."""
    pids = vllm_server.engine_pids
    assert len(pids) >= 2  # the stub and at least EngineCore
    alive = [p for p in pids if _alive(p)]
    assert alive == pids
    # The engine's stub: the server's child that has children of its own (EngineCore); the
    # routers' stubs have none.
    parents = {p: _ppid(p) for p in pids}
    stub = next(p for p in pids if parents[p] == vllm_server.server.pid and p in parents.values())
    os.kill(stub, signal.SIGKILL)  # a crashed stub: its engine processes stay up on their own
    time.sleep(1.0)
    # Triton would wait its exit timeout (30 s) for the dead stub's model to unload: a shorter
    # wait before the group's SIGKILL tests the same thing (what stop() signals, not Triton).
    vllm_server.server.stop(timeout_s=3)
    time.sleep(0.5)
    left = [p for p in pids if _alive(p)]
    assert left == [], f"orphaned engine processes: {left}"
    assert vllm_server.server.descendants() == []


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().split(") ", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (nothing left to reap it but init).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
