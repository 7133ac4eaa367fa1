"""The simulated engine in virtual time: batching, KV exhaustion, preemption, abort, priority."""

from dataclasses import replace

import pytest

from qlm_backend.engine import hardware as hw
from qlm_backend.engine.perf import PerfModel
from qlm_backend.engine.sim import EngineRequest, SimEngine, TokenEvent


def make_perf(kv_tokens: int | None = None) -> PerfModel:
    """Mistral-7B on an A100; with kv_tokens, a GPU whose memory leaves exactly that much KV room."""
    model = hw.MODELS["mistral-7b"]
    gpu = hw.GPUS["A100-80G"]
    if kv_tokens is not None:
        need = (
            model.weight_bytes + kv_tokens * model.kv_bytes_per_token + hw.ACTIVATION_RESERVE_BYTES
        )
        gpu = replace(gpu, memory_bytes=int(need / hw.GPU_MEMORY_UTILIZATION) + 1)
        return PerfModel(model, gpu, 1, gpu_memory_utilization=hw.GPU_MEMORY_UTILIZATION)
    return PerfModel(model, gpu)


def make_request(rid: str, prompt: int = 100, out: int = 10, prio: int = 0) -> EngineRequest:
    return EngineRequest(rid, prompt, max_tokens=out, output_tokens=out, priority=prio)


def run(engine: SimEngine, until: float = 1e9) -> list[TokenEvent]:
    events = []
    while (t := engine.next_event_s()) is not None and t <= until:
        events += engine.advance(t)
    return events


def first_token_times(events: list[TokenEvent]) -> dict[str, float]:
    return {e.request_id: e.time_s for e in events if e.token_index == 0}


def test_each_request_streams_exactly_its_tokens_then_finishes():
    eng = SimEngine(make_perf())
    eng.add(make_request("a", out=5), 0.0)
    eng.add(make_request("b", out=3), 0.0)
    ev = run(eng)
    assert [e.token_index for e in ev if e.request_id == "a"] == [0, 1, 2, 3, 4]
    assert [e.finished for e in ev if e.request_id == "b"] == [False, False, True]
    assert {e.finish_reason for e in ev if e.finished} == {"length"}
    assert eng.num_running == eng.num_waiting == 0 and eng.next_event_s() is None


def test_requests_arriving_together_are_prefilled_in_one_batch():
    eng = SimEngine(make_perf())
    for r in "abcd":
        eng.add(make_request(r), 0.0)
    ft = first_token_times(run(eng))
    assert len(set(ft.values())) == 1  # one prefill iteration served all four


def test_a_late_arrival_joins_the_running_batch_at_the_next_iteration():
    eng = SimEngine(make_perf())
    eng.add(make_request("a", out=50), 0.0)
    events = run(eng, until=0.1)
    eng.add(make_request("b", out=5), 0.1)
    events += run(eng)
    ft = first_token_times(events)
    last_a = max(e.time_s for e in events if e.request_id == "a")
    assert ft["b"] < last_a  # continuous batching: b does not wait for a to finish


def test_max_num_seqs_bounds_the_batch():
    eng = SimEngine(make_perf(), max_num_seqs=2)
    for r in "abc":
        eng.add(make_request(r, out=4), 0.0)
    ft = first_token_times(run(eng))
    # a and b run together; c waits for a slot.
    assert ft["a"] == ft["b"] < ft["c"]


def test_kv_exhaustion_preempts_the_latest_request_and_recomputes_it():
    # Room for 40 blocks x 16 tokens = 640 tokens; three 200-token prompts growing to 300 cannot all fit.
    eng = SimEngine(make_perf(kv_tokens=640))
    for r in "abc":
        eng.add(make_request(r, prompt=200, out=100), 0.0)
    ev = run(eng)
    assert eng.stats.preemptions >= 1
    # Nothing lost or duplicated: every request produced exactly its 100 tokens, in order.
    for r in "abc":
        idx = [e.token_index for e in ev if e.request_id == r]
        assert idx == list(range(100))
    # FCFS victim selection: the most recently admitted (c) finishes last.
    done = {e.request_id: e.time_s for e in ev if e.finished}
    assert done["c"] == max(done.values())


def test_swap_preemption_pays_pcie_time_instead_of_recompute():
    reqs = [make_request(r, prompt=200, out=100) for r in "abc"]
    recompute = SimEngine(make_perf(kv_tokens=640), preemption="recompute")
    swap = SimEngine(make_perf(kv_tokens=640), preemption="swap")
    for eng in (recompute, swap):
        for r in reqs:
            eng.add(replace(r), 0.0)
        run(eng)
    assert swap.stats.swaps_out >= 1 and recompute.stats.swaps_out == 0
    assert swap.stats.prefill_tokens < recompute.stats.prefill_tokens


def test_abort_stops_the_request_and_frees_its_blocks():
    eng = SimEngine(make_perf())
    eng.add(make_request("a", out=100), 0.0)
    ev = run(eng, until=0.2)
    assert eng.abort("a", 0.2) and not eng.abort("a", 0.2)
    ev += run(eng)
    assert all(not e.finished for e in ev)
    assert eng.free_blocks == eng.total_blocks and eng.stats.aborted == 1


def test_priority_scheduling_admits_higher_priority_first():
    # One slot: under priority scheduling the high-priority request (0) overtakes the queued ones (5).
    def order(scheduling: str) -> list[str]:
        eng = SimEngine(make_perf(), max_num_seqs=1, scheduling=scheduling)  # type: ignore[arg-type]
        eng.add(make_request("running", out=3, prio=5), 0.0)
        eng.add(make_request("low", out=3, prio=5), 0.0)
        eng.add(make_request("high", out=3, prio=0), 0.0)
        ft = first_token_times(run(eng))
        return sorted(ft, key=ft.__getitem__)

    assert order("fcfs") == ["running", "low", "high"]
    assert order("priority") == ["high", "running", "low"]


def test_iteration_time_grows_with_batch_and_context():
    short = SimEngine(make_perf())
    short.add(make_request("a", prompt=10, out=2), 0.0)
    t_short = run(short)[-1].time_s
    big = SimEngine(make_perf())
    for i in range(64):
        big.add(make_request(f"r{i}", prompt=2000, out=2), 0.0)
    t_big = run(big)[-1].time_s
    assert t_big > t_short


def test_bad_requests_are_refused():
    eng = SimEngine(make_perf(kv_tokens=640))
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        eng.add(make_request("x", prompt=10_000), 0.0)
    eng.add(make_request("a"), 0.0)
    with pytest.raises(ValueError, match="already in the engine"):
        eng.add(make_request("a"), 0.0)
    with pytest.raises(ValueError, match="scheduling"):
        SimEngine(make_perf(), scheduling="lifo")  # type: ignore[arg-type]


def test_a_prompt_longer_than_the_token_budget_is_prefilled_in_chunks():
    eng = SimEngine(make_perf(), max_num_batched_tokens=512)
    eng.add(make_request("long", prompt=1200, out=2), 0.0)
    ev = run(eng)
    # 512 + 512 + 176 prompt tokens: the first token comes with the third step.
    assert eng.stats.iterations == 4 and eng.stats.prefill_tokens == 1200
    assert [e.token_index for e in ev] == [0, 1]


def test_running_decodes_keep_their_cadence_while_a_long_prompt_is_chunked():
    eng = SimEngine(make_perf(), max_num_batched_tokens=512)
    eng.add(make_request("d", prompt=10, out=200), 0.0)
    run(eng, until=0.05)
    before = eng.stats.generated_tokens
    eng.add(make_request("long", prompt=4000, out=2), 0.05)
    ev = run(eng, until=1.0)
    long_first = first_token_times(ev).get("long")
    d_tokens = [e for e in ev if e.request_id == "d"]
    # The decode got a token in every step the prompt's chunks took (budget: 511 + 1 per step).
    assert long_first is not None
    assert sum(1 for e in d_tokens if e.time_s <= long_first) >= 4000 // 512
    assert eng.stats.generated_tokens > before


def test_decode_steps_slow_down_while_a_chunk_shares_them():
    eng = SimEngine(make_perf(), max_num_batched_tokens=2048)
    eng.add(make_request("d", prompt=10, out=40), 0.0)
    ev = run(eng, until=0.1)
    t = [e.time_s for e in ev if e.request_id == "d"]
    plain = t[-1] - t[-2]
    eng.add(make_request("p", prompt=2000, out=2), ev[-1].time_s)
    ev2 = run(eng, until=ev[-1].time_s + 0.5)
    t2 = [e.time_s for e in ev2 if e.request_id == "d"]
    # The step that carried the 2000-token chunk (the one in progress when it came was not).
    assert max(b - a for a, b in zip(t2, t2[1:], strict=False)) > 3 * plain


def test_the_per_request_overhead_delays_scheduling_and_is_reported():
    perf = make_perf()
    slow = replace(perf, eff=replace(perf.eff, request_overhead_s=0.05))
    eng = SimEngine(slow)
    eng.add(make_request("a", out=2), 1.0)
    ev = run(eng)
    assert ev[0].scheduled_s == pytest.approx(1.05)
    assert ev[0].time_s > 1.05 and ev[1].scheduled_s is None
