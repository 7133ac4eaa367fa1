"""Unit tests of the pieces, with expected orders written out."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from conftest import Cluster, FakeClock, make_fleet, make_request

from qlm_backend.core.api import (
    POLICY_NAMES,
    Evict,
    ManagerConfig,
    OutputPrior,
    Pull,
    QueueManager,
    Reject,
    SwapModel,
    check_invariants,
    load_fleet,
    make_policy,
    parse_fleet,
)
from qlm_backend.core.groups import GroupIndex


def test_fleet_errors_name_the_bad_key_and_value(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown gpu 'B200'.*known: A10"):
        parse_fleet(
            {"instances": [{"instance_id": "x", "gpu": "B200", "models_allowed": ["mistral-7b"]}]}
        )
    with pytest.raises(ValueError, match=r"unknown model 'gpt-5'.*known:"):
        parse_fleet(
            {"instances": [{"instance_id": "x", "gpu": "A10", "models_allowed": ["gpt-5"]}]}
        )
    with pytest.raises(ValueError, match=r"instances\[0\]: unknown key\(s\) \['gpus'\]"):
        parse_fleet(
            {"instances": [{"instance_id": "x", "gpus": "A10", "models_allowed": ["mistral-7b"]}]}
        )
    with pytest.raises(ValueError, match="max_in_flight"):
        parse_fleet(
            {
                "instances": [
                    {
                        "instance_id": "x",
                        "gpu": "A10",
                        "max_in_flight": 0,
                        "models_allowed": ["mistral-7b"],
                    }
                ]
            }
        )
    f = tmp_path / "fleet.json"
    f.write_text(
        json.dumps(
            {
                "instances": [
                    {"instance_id": "a", "count": 3, "gpu": "A10", "models_allowed": ["mistral-7b"]}
                ]
            }
        )
    )
    fleet = load_fleet(f)
    assert [i.instance_id for i in fleet.instances] == ["a-0", "a-1", "a-2"]


def test_repository_fleet_loads() -> None:
    fleet = load_fleet("model_repository/fleet.json")
    assert len(fleet.instances) >= 1


def test_groups_window_and_split() -> None:
    gi = GroupIndex(window_s=5.0, max_size=2)
    a = gi.add(make_request("a", deadline_s=21.0))
    b = gi.add(make_request("b", deadline_s=20.0))
    c = gi.add(make_request("c", deadline_s=22.0))  # same window, group full -> part 1
    d = gi.add(make_request("d", deadline_s=26.0))  # next window
    assert a.group_id == b.group_id == "mistral-7b/interactive/4/0"
    assert c.group_id == "mistral-7b/interactive/4/1"
    assert d.group_id == "mistral-7b/interactive/5/0"
    # EDF inside a group: b (20 s) before a (21 s).
    assert a.request_ids == ["b", "a"]


def test_groups_split_finer_while_the_queue_is_short() -> None:
    gi = GroupIndex(window_s=5.0, max_size=3, small_size=1, small_below=2)
    a = gi.add(make_request("a", deadline_s=20.0))
    b = gi.add(make_request("b", deadline_s=20.5))  # 1 queued < 2: parts of 1 -> part 1
    c = gi.add(make_request("c", deadline_s=21.0))  # 2 queued: parts of 3 again -> joins part 1
    d = gi.add(make_request("d", deadline_s=21.5))
    assert [g.group_id[-1] for g in (a, b, c, d)] == ["0", "1", "1", "1"]
    assert gi.queued == 4
    gi.remove(a.group_id, make_request("a", deadline_s=20.0))
    gi.remove(b.group_id, make_request("b", deadline_s=20.5))
    gi.remove(c.group_id, make_request("c", deadline_s=21.0))
    assert gi.queued == 1  # short again: the next request opens a part of its own
    e = gi.add(make_request("e", deadline_s=22.0))
    assert e.group_id == "mistral-7b/interactive/4/2"


def test_registry_unknown_name_lists_known() -> None:
    with pytest.raises(
        ValueError,
        match="known: edf, fcfs, flow-control, priority, qlm, qlm-true-lengths, shepherd",
    ):
        make_policy("sjf")
    assert set(POLICY_NAMES) == {
        "qlm",
        "fcfs",
        "edf",
        "priority",
        "shepherd",
        "flow-control",
        "qlm-true-lengths",
    }


def test_pull_respects_bound_and_edf_order(clock: FakeClock) -> None:
    qm = QueueManager(make_fleet(n=1, max_in_flight=2), "qlm")
    # Deadlines: r1 40 s, r0 20 s (interactive), r2 60 s (batch-1). EDF pulls r0 then r1.
    qm.add_request(make_request("r1", slo_class="interactive", arrival_s=0, deadline_s=40), 0)
    qm.add_request(make_request("r0", slo_class="interactive", arrival_s=0), 0)
    qm.add_request(make_request("r2", slo_class="batch-1", arrival_s=0), 0)
    pulls = [a for a in qm.plan(clock.now) if isinstance(a, Pull)]
    assert [r for p in pulls for r in p.request_ids] == ["r0", "r1"]
    assert len(qm.in_flight("i-0")) == 2 and qm.num_queued == 1
    check_invariants(qm)


def test_swap_only_after_drain_and_warm_start(clock: FakeClock) -> None:
    qm = QueueManager(
        make_fleet(n=1, models=("mistral-7b", "llama-2-13b"), max_in_flight=4),
        "qlm",
        ManagerConfig(min_resident_s=0.0),
    )
    qm.add_request(make_request("m", model="mistral-7b", slo_class="batch-2"), 0)
    assert any(isinstance(a, Pull) for a in qm.plan(0.0))
    qm.add_request(make_request("l", model="llama-2-13b", slo_class="interactive"), 0)
    acts = qm.plan(0.1)
    # "m" already has its first token? No: so it cannot be evicted; the swap waits for the drain.
    assert not any(isinstance(a, SwapModel) for a in acts)
    qm.on_finished("m", 10, 1.0)
    acts = qm.plan(1.0)
    swaps = [a for a in acts if isinstance(a, SwapModel)]
    assert swaps == [SwapModel("i-0", "mistral-7b", "llama-2-13b", warm=False)]
    assert qm.instance_views()[0].warm_models == ("mistral-7b",)  # KeepWarm of the old model
    qm.on_model_loaded("i-0", "llama-2-13b", 30.0)
    assert [a.request_ids for a in qm.plan(30.0) if isinstance(a, Pull)] == [("l",)]


def test_no_swap_for_one_rare_request_while_incumbent_has_work() -> None:
    # 40 batch-1 mistral requests queued and one batch-2 llama request: keep mistral (hysteresis).
    qm = QueueManager(make_fleet(n=1, models=("mistral-7b", "llama-2-13b"), max_in_flight=8), "qlm")
    for k in range(40):
        qm.add_request(make_request(f"m{k}", slo_class="batch-1"), 0)
    qm.add_request(make_request("rare", model="llama-2-13b", slo_class="batch-2"), 0)
    acts = qm.plan(0.0)
    assert not any(isinstance(a, SwapModel) for a in acts)
    assert qm.virtual_queue("i-0")[-1].request_ids == ("rare",)


def _incumbent_with_fresh_arrivals(share: float, fresh_class: str) -> list[tuple[str, ...]]:
    # mistral-7b runs 8 batch-1 requests (first tokens out at t=1); a llama-2-13b batch-1 request
    # has waited since t=0.5; five mistral requests of `fresh_class` arrived at t=5..9. At t=10
    # every order is forecast to meet every deadline now, and keeping mistral first is what
    # starves llama when mistral's arrivals never stop (the llama request waits >= 10% of its SLO
    # at t=10: due under share 0.1).
    qm = QueueManager(
        make_fleet(n=1, models=("mistral-7b", "llama-2-13b"), max_in_flight=8),
        "qlm",
        ManagerConfig(swap_due_share=share),
    )
    for k in range(8):
        qm.add_request(make_request(f"run{k}", slo_class="batch-1", max_tokens=512), 0.0)
    qm.plan(0.0)
    for k in range(8):
        qm.on_first_token(f"run{k}", 1.0)
    qm.add_request(
        make_request("llama", model="llama-2-13b", slo_class="batch-1", arrival_s=0.5), 0.5
    )
    for k in range(5):
        t = 5.0 + k
        qm.add_request(make_request(f"new{k}", slo_class=fresh_class, arrival_s=t), t)
    qm.plan(10.0)
    return [e.request_ids for e in qm.virtual_queue("i-0")]


def test_due_model_goes_ahead_of_incumbent_work_with_slack() -> None:
    # Expected order: llama (due; its deadline, 60.5, is before the fresh batch-2 work's) then
    # the fresh mistral work, which still meets its 3600 s SLO after the swap and back.
    assert _incumbent_with_fresh_arrivals(0.1, "batch-2")[0] == ("llama",)
    # Without the due rule the incumbent keeps the instance: the forecast of this moment sees no
    # miss either way, so the hysteresis keeps mistral first.
    assert _incumbent_with_fresh_arrivals(math.inf, "batch-2")[-1] == ("llama",)


def test_due_model_waits_when_the_slice_costs_more_than_it_saves() -> None:
    # The fresh mistral work is batch-1 (deadlines 65-69): a swap to llama and back makes all
    # five miss (weight 2 each) to save one llama request (weight 2): mistral stays first.
    assert _incumbent_with_fresh_arrivals(0.1, "batch-1")[-1] == ("llama",)


def test_eviction_of_lower_class_for_urgent_interactive() -> None:
    # Outputs are known to be long (~3000 tokens): the running batch-2 requests hold their slots
    # for ~15 s more, far past the interactive request's 1 s of slack.
    cfg = ManagerConfig(default_prior=OutputPrior(3000.0, 300.0))
    qm = QueueManager(make_fleet(n=1, max_in_flight=2), "qlm", cfg)
    for k in range(2):
        qm.add_request(make_request(f"b{k}", slo_class="batch-2", max_tokens=4000), 0)
    qm.plan(0.0)
    for k in range(2):
        qm.on_first_token(f"b{k}", 0.5)
    # An interactive request arrives with little slack left: the batch-2 ones (SLO met) yield.
    qm.add_request(make_request("i", slo_class="interactive", arrival_s=9.0, deadline_s=10.0), 9)
    acts = qm.plan(9.0)
    ev = [a for a in acts if isinstance(a, Evict)]
    assert len(ev) == 1 and ev[0].request_id.startswith("b")
    qm.on_evicted(ev[0].request_id, 50, 9.0)
    assert any(isinstance(a, Pull) and a.request_ids == ("i",) for a in acts)
    check_invariants(qm)
    assert qm.request_view(ev[0].request_id).tokens_done == 50


def _four_busy_slots(**policy_kwargs: object) -> QueueManager:
    # The router's eviction scenario: mistral-7b on one A10 with 4 slots, 4 batch-1 requests of
    # max_tokens 400 running since t=0.1 (prior: 256 +- 256 output tokens), an interactive request
    # with a 1.5 s TTFT SLO arriving at t=4.
    fleet = parse_fleet(
        {
            "instances": [
                {
                    "instance_id": "q-a10-0",
                    "gpu": "A10",
                    "models_allowed": ["mistral-7b"],
                    "initial_model": "mistral-7b",
                    "max_in_flight": 4,
                }
            ]
        }
    )
    qm = QueueManager(fleet, "qlm", **policy_kwargs)
    for i in range(4):
        qm.add_request(qm.make_request(f"b{i}", "mistral-7b", "batch-1", 0.0, 4, 400), 0.0)
    assert [a for a in qm.plan(0.0) if isinstance(a, Pull)][0].request_ids == (
        "b0",
        "b1",
        "b2",
        "b3",
    )
    for i in range(4):
        qm.on_first_token(f"b{i}", 0.1)
    u = qm.make_request("u", "mistral-7b", "interactive", 4.0, 4, 4, ttft_slo_s=1.5)
    assert qm.add_request(u, 4.0) is None
    return qm


def test_predicted_wait_behind_busy_slots_comes_from_the_requests_ahead() -> None:
    # Each batch request has ~120 tokens done at t=4 and, by the prior, ~136 left at 32.5 ms per
    # step (batch 4): no slot frees for ~4.4 s. The old forecast used the queued request's own
    # renewal residual (0.5 x 256 tokens x 2 per slot, more than all the work ahead) and said "a slot
    # now" (0.05 s); the wait must be the time until the first in-flight request ends.
    qm = _four_busy_slots(evict=False)
    assert qm.plan(4.0) == []
    (stat,) = qm.queue_stats(4.0)
    assert stat.slo_class == "interactive"
    assert 3.5 < stat.predicted_wait_s < 5.5, stat


def test_eviction_when_every_slot_is_busy() -> None:
    # Same scenario with eviction on. Expected at t=4.0, in one plan step: the forecast first token
    # (~8.5 s) misses the 5.5 s deadline (P(meet) ~0.24 < evict_p_threshold 0.5) and a free slot would
    # give ~4.05 s (P ~1, gain > evict_gain_min), so one batch request is evicted (b0: ties on
    # remaining work break by id) and the urgent one pulled into its slot.
    qm = _four_busy_slots()
    acts = qm.plan(4.0)
    assert [type(a).__name__ for a in acts] == ["Evict", "Pull"], acts
    ev, pull = acts
    assert isinstance(ev, Evict) and isinstance(pull, Pull)
    assert (ev.request_id, ev.instance_id) == ("b0", "q-a10-0")
    assert (pull.instance_id, pull.request_ids) == ("q-a10-0", ("u",))
    # The evicted request resumes later; nothing more is evicted: u is in, the rest is batch-1 (no
    # lower class to take from), and the per-instance cooldown would hold anyway.
    qm.on_evicted("b0", 130, 4.05)
    for t in (4.05, 4.2, 4.4, 5.0, 6.5):
        acts = qm.plan(t)
        assert not [a for a in acts if isinstance(a, Evict)], (t, acts)
    assert qm.request_view("b0").status == "queued"
    check_invariants(qm)


def test_eviction_cannot_thrash_cooldown_and_per_request_cap() -> None:
    # Interactive requests keep arriving behind the 4 busy batch slots, one every 0.5 s, each done
    # 0.5 s after its pull; evicted batch requests queue again and are pulled back into freed slots.
    # Evictions happen in at most one plan step per evict_cooldown_s (2 s) on the instance, and no
    # request is evicted more than max_evictions_per_request (2) times.
    qm = _four_busy_slots()
    evict_times: list[float] = []
    evicted: dict[str, int] = {}
    running_u: list[str] = []
    t = 4.0
    for k in range(40):
        for rid in running_u:
            qm.on_finished(rid, 4, t)
        running_u = []
        if k:
            r = qm.make_request(f"u{k}", "mistral-7b", "interactive", t, 4, 4, ttft_slo_s=1.5)
            qm.add_request(r, t)
        for a in qm.plan(t):
            if isinstance(a, Evict):
                evict_times.append(t)
                evicted[a.request_id] = evicted.get(a.request_id, 0) + 1
                qm.on_evicted(a.request_id, 150, t)
            elif isinstance(a, Pull):
                for rid in a.request_ids:
                    qm.on_first_token(rid, t + 0.05)
                    if rid.startswith("u"):
                        running_u.append(rid)
        t += 0.5
        check_invariants(qm)
    steps = sorted(set(evict_times))
    assert steps, "no eviction at all"
    assert all(b - a >= 2.0 for a, b in zip(steps, steps[1:], strict=False)), steps
    assert max(evicted.values()) <= 2, evicted


def test_shedding_rejects_impossible_sheddable_only() -> None:
    # The only instance runs mistral; a llama request due in 5 s needs a ~30 s cold load.
    qm = QueueManager(make_fleet(n=1, models=("mistral-7b", "llama-2-13b")), "qlm")
    r = make_request("late", model="llama-2-13b", slo_class="batch-2", deadline_s=5.0)
    rej = qm.add_request(r, 0.0)
    assert isinstance(rej, Reject) and "cannot be met" in rej.reason
    # Interactive is not sheddable: admitted even if hopeless.
    assert qm.add_request(make_request("i", deadline_s=0.001), 0.0) is None


def test_engine_failure_requeues_in_flight() -> None:
    qm = QueueManager(make_fleet(n=2, max_in_flight=2), "qlm")
    for k in range(4):
        qm.add_request(make_request(f"r{k}"), 0)
    qm.plan(0.0)
    assert qm.num_in_flight == 4
    qm.on_engine_failed("i-0", 1.0)
    assert qm.num_in_flight == 2 and qm.num_queued == 2
    check_invariants(qm)


def test_fcfs_pushes_everything_and_priority_tags() -> None:
    for name, prio in (("fcfs", 0), ("priority", 2)):
        qm = QueueManager(make_fleet(n=2, max_in_flight=2), name)
        for k in range(10):
            qm.add_request(make_request(f"r{k}", slo_class="batch-2"), 0)
        pulls = [a for a in qm.plan(0.0) if isinstance(a, Pull)]
        assert sum(len(p.request_ids) for p in pulls) == 10  # no router queue
        assert {p.priority for p in pulls} == {prio}
        # least-loaded across the two instances
        assert sorted(len(qm.in_flight(i)) for i in ("i-0", "i-1")) == [5, 5]


def test_qlm_beats_fcfs_on_head_of_line_blocking() -> None:
    # A burst of 150 batch-2 requests, then interactive ones behind it, on 2 instances.
    reqs = [
        make_request(
            f"b{k}",
            slo_class="batch-2",
            arrival_s=0.0,
            prompt_tokens=512,
            max_tokens=1024,
            true_output_tokens=400,
        )
        for k in range(150)
    ]
    reqs += [
        make_request(
            f"i{k}",
            arrival_s=1.0 + 0.2 * k,
            prompt_tokens=256,
            max_tokens=256,
            true_output_tokens=100,
        )
        for k in range(30)
    ]
    res = {}
    for pol in ("fcfs", "qlm"):
        cl = Cluster(QueueManager(make_fleet(n=2, gpu="A10", max_in_flight=16), pol))
        cl.run(reqs)
        res[pol] = cl.attainment("interactive")
    assert res["qlm"] >= res["fcfs"]
    assert res["qlm"] >= 0.9, res


def test_no_highs_banner_on_stdout() -> None:
    # HiGHS prints its banner once per process, at the first solver object: a fresh interpreter
    # solves one LP through each formulation (PuLP for a small one, highspy's matrix API when forced)
    # and its stdout must hold only what the script printed, in order, the unflushed line included.
    import subprocess
    import sys

    script = """
import sys
sys.path.insert(0, "tests/unit/core")
from conftest import make_fleet, make_request
from qlm_backend.core.api import QueueManager, ManagerConfig
print("before", end=" ")
# A generous budget: the first solve imports the solver, which must not push it to the fallback.
# lp_only_with_swaps off: one model, no swap choice, and the LP would not be tried at all.
base = ManagerConfig(plan_budget_s=60.0, lp_only_with_swaps=False)
for cfg in (base, base.with_(pulp_max_cols=0)):
    qm = QueueManager(make_fleet(n=2), "qlm", cfg)
    for k in range(3):
        qm.add_request(make_request(f"r{k}", slo_class="batch-2"), 0.0)
    qm.plan(0.0)
    print(qm.decisions[-1].path, end=" ")
print("after")
"""
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert res.stdout == "before lp lp after\n", res.stdout


def test_resume_mode_kv_swap_unless_the_executor_cannot() -> None:
    # A 4 + ~120 token context: copying its KV out and back over PCIe (~1.4 ms) beats recomputing
    # the prefill (~32 ms), so "swap"; an executor that evicts by abort turns KV swap off.
    for on, mode in ((True, "swap"), (False, "recompute")):
        qm = _four_busy_slots(config=ManagerConfig(kv_swap_resume=on))
        ev = [a for a in qm.plan(4.0) if isinstance(a, Evict)]
        assert [e.resume for e in ev] == [mode]


def test_slot_clock_cases_written_out() -> None:
    from qlm_backend.core.estimator import SlotClock

    # 4 slots, nothing in flight: the first 4 start now; the 5th once the work ahead (4 x 2.0
    # instance-seconds) minus what the 3 other slots still hold (a renewal residual of 1.5 each).
    c = SlotClock(4)
    c.push(6, 1.5)
    assert [c.start(q, 2.0 * q) for q in range(4)] == [0.0] * 4
    assert c.start(4, 8.0) == pytest.approx(8.0 - 3 * 1.5)
    # 4 slots busy with in-flight work of 1, 2, 3, 4 instance-seconds (a slot drains at 1/4 per
    # second, so they end at 4, 8, 12, 16 s): the first queued request takes the first slot that
    # frees, at 4 s, however small its own residual; the old form gave 10 - 3 x residual.
    c = SlotClock(4, [3.0, 1.0, 4.0, 2.0])
    c.push(2, 0.5)
    assert c.start(0, 10.0) == pytest.approx(4.0)
    # The second queued request: the first one (work 0.5) took the slot freed at 4 s and ends at
    # 4 + 4 x 0.5 = 6 s, before the next in-flight end (8 s), so it starts at 6 s.
    assert c.start(1, 10.5) == pytest.approx(6.0)
    # 2 of 4 slots in flight: 2 free slots now.
    c = SlotClock(4, [5.0, 5.0])
    c.push(3, 1.0)
    assert c.start(0, 10.0) == 0.0 and c.start(1, 11.0) == 0.0
    # The third waits for a slot, freed by one of the 2 queued ones (work 1.0 each, i.e. 4 s of a
    # slot; the in-flight ones run until 20 s). Their residual 1.0 = their mean work is the
    # exponential case (cv^2 = 1): the first of two ends after 2 s on average. Work conservation
    # gives the same: t = 12 - [(10 - 2 x t/4) + 1.0] at t = 2.
    assert c.start(2, 12.0) == pytest.approx(2.0)


def test_fixed_output_length_is_planned_with_and_lets_a_sub_second_slo_evict() -> None:
    # The case of the real-vLLM router test, in the core: one CPU instance (2 seats) running two
    # batch requests that ignore EOS (exactly 1500 tokens each) for 1 s; an interactive request
    # with a 0.1 s TTFT SLO arrives. With the lengths fixed, the estimator knows each seat holds
    # ~900 more tokens (~0.7 s at the cpu-2core step), so the request misses without a slot and
    # one batch request is evicted for it. With the lengths unknown (the 256-token prior, and
    # ~600 tokens out already), it believed both ended within ~0.05 s and waited.
    def run(fixed: bool) -> list[str]:
        fleet = parse_fleet(
            {
                "instances": [
                    {
                        "instance_id": "cpu-0",
                        "gpu": "cpu-2core",
                        "models_allowed": ["tiny-llama"],
                        "initial_model": "tiny-llama",
                        "max_in_flight": 2,
                    }
                ]
            }
        )
        qm = QueueManager(fleet, policy="qlm")
        for i in range(2):
            b = make_request(
                f"b{i}", "tiny-llama", "batch-1", 0.0, prompt_tokens=4, max_tokens=1500
            )
            assert qm.add_request(replace(b, output_fixed=fixed), 0.0) is None
        qm.plan(0.01)
        for i in range(2):
            qm.on_first_token(f"b{i}", 0.1)
        u = make_request("u", "tiny-llama", "interactive", 1.0, deadline_s=1.1, max_tokens=8)
        assert qm.add_request(replace(u, output_fixed=fixed), 1.0) is None
        return [type(a).__name__ for a in qm.plan(1.0)]

    assert run(fixed=True) == ["Evict", "Pull"]
    assert run(fixed=False) == []


def test_fixed_output_lengths_are_not_learnt_as_the_class_length() -> None:
    qm = QueueManager(make_fleet(n=1), policy="qlm")
    r = replace(make_request("f", max_tokens=4000), output_fixed=True)
    assert qm.add_request(r, 0.0) is None
    qm.plan(0.0)
    qm.on_first_token("f", 0.5)
    qm.on_finished("f", 4000, 60.0)
    # Still the prior: a caller-fixed length says nothing of the class's free lengths.
    assert qm.estimator.output_stats("mistral-7b", "interactive") == (256.0, 256.0**2)


def test_a_fleets_default_model_must_be_one_it_serves() -> None:
    doc = {"instances": [{"instance_id": "a", "gpu": "A10", "models_allowed": ["mistral-7b"]}]}
    assert (
        parse_fleet({**doc, "default_model": "mistral-7b"}).extra["default_model"] == "mistral-7b"
    )
    with pytest.raises(ValueError, match="fleet.default_model"):
        parse_fleet({**doc, "default_model": "llama-2-13b"})
