"""Which plan the planner keeps (LP, heuristic, or the heuristic's over the LP's), how the LP's late
shares are placed, which running requests QLM may evict, and the LP surviving a HiGHS thread
scheduler that something else in the process started."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import make_fleet, make_request

from qlm_backend.core.actions import Evict, Pull
from qlm_backend.core.api import ManagerConfig, QueueManager
from qlm_backend.core.fleet import parse_fleet
from qlm_backend.core.policies.qlm.lp import bucket_ends, build_matrix, round_solution
from qlm_backend.core.policies.qlm.problem import Problem


def _three_queued(cfg: ManagerConfig) -> QueueManager:
    qm = QueueManager(make_fleet(n=2), "qlm", cfg)
    for k in range(3):
        qm.add_request(make_request(f"r{k}", slo_class="batch-2"), 0.0)
    qm.plan(0.0)
    return qm


def test_single_model_without_swap_choice_is_planned_by_the_heuristic() -> None:
    # Both instances already run mistral-7b: nothing to swap, so the assignment is pure load
    # balancing and the heuristic decides without trying the LP.
    d = _three_queued(ManagerConfig(plan_budget_s=60.0)).decisions[-1]
    assert d.path == "fallback"
    assert d.reason.startswith("no model-swap choice"), d.reason
    assert d.solve_s == 0.0


def test_lp_decides_when_allowed_and_heuristic_replaces_it_only_by_the_margin() -> None:
    base = ManagerConfig(plan_budget_s=60.0, lp_only_with_swaps=False)
    # Three far-deadline requests: both plans meet everything (0 expected violations), and the
    # heuristic's must be better by lp_replace_margin (1.0) to replace the LP's.
    d = _three_queued(base).decisions[-1]
    assert d.path == "lp", d.reason
    assert "heuristic plan" in d.reason
    # A negative margin makes the heuristic's plan win every tie: it is the one kept.
    d = _three_queued(base.with_(lp_replace_margin=-1e9)).decisions[-1]
    assert d.path == "fallback"
    assert d.reason.startswith("heuristic plan kept"), d.reason


def _late_problem(groups: int) -> Problem:
    """`groups` identical groups, all already past their deadline, on two idle instances."""
    G, k = groups, 2
    return Problem(
        now=0.0,
        group_ids=[f"g{g}" for g in range(G)],
        group_models=["m"] * G,
        n=np.full(G, 4.0),
        weight=np.ones(G),
        slack_s=-np.arange(1.0, G + 1.0),
        prefill_s=np.full((G, k), 0.1),
        instance_ids=["a", "b"],
        base_s=np.zeros(2),
        current=["m", "m"],
        cand=np.tile(np.array([0, 1]), (G, 1)),
        work_s=np.full((G, k), 10.0),
        swap_s=np.zeros((G, k)),
    )


def test_wholly_late_groups_are_spread_not_piled_on_one_instance() -> None:
    # Every group's share is all in the overflow (late) bucket. Each group's candidate 0 is "a",
    # so following "the largest on-time share" put all four there (40 s vs 0 s); placed in
    # deadline order (g3 is the most overdue, then g2, ...) on the queue that finishes it first
    # they alternate: g3 a, g2 b, g1 a, g0 b.
    p = _late_problem(4)
    ends = bucket_ends(p, 2)
    m = build_matrix(p, ends, 1.0, 0.15)
    nb = len(ends) + 1
    x = np.zeros(m.cols)
    for g in range(4):
        x[(g * 2 + 0) * nb + (nb - 1)] = 1.0  # overflow share on candidate 0
    out = round_solution(p, m, x, len(ends))
    assert out == [(0, 1, 4), (1, 0, 4), (2, 1, 4), (3, 0, 4)]


def test_a_queued_group_stays_where_it_was_unless_another_instance_is_clearly_sooner() -> None:
    from qlm_backend.core.policies.qlm.heuristic import swap_aware_edf

    # One late group; "a" is free 1 s sooner than "b", where the last plan put the group.
    p = _late_problem(1)
    p.base_s = np.array([4.0, 5.0])
    p.prev_i = np.array([1])
    assert swap_aware_edf(p) == [(0, 0, 4)]  # no hysteresis: the sooner finish (14 s vs 15 s)
    # 15 s x (1 - 0.1) = 13.5 s < 14 s: it stays on "b".
    assert swap_aware_edf(p, hysteresis=0.1) == [(0, 1, 4)]
    # "a" 5 s sooner (10 s vs 15 x 0.9 = 13.5 s): it moves.
    p.base_s = np.array([0.0, 5.0])
    assert swap_aware_edf(p, hysteresis=0.1) == [(0, 0, 4)]


def test_rebalance_hysteresis_outside_0_to_1_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="rebalance_hysteresis"):
        ManagerConfig(rebalance_hysteresis=1.0)


def _busy_interactive(evict_victims: str, **cfg: object) -> QueueManager:
    # One A10 with 4 slots, all held by interactive requests that have their first token; an
    # interactive request with a 1.5 s TTFT SLO arrives at t=4 and cannot get a slot in time.
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
    qm = QueueManager(fleet, "qlm", ManagerConfig(evict_victims=evict_victims).with_(**cfg))
    for i in range(4):
        qm.add_request(qm.make_request(f"b{i}", "mistral-7b", "interactive", 0.0, 4, 400), 0.0)
    pulls = [a for a in qm.plan(0.0) if isinstance(a, Pull)]
    assert pulls[0].request_ids == ("b0", "b1", "b2", "b3")
    for i in range(4):
        qm.on_first_token(f"b{i}", 0.1)
    u = qm.make_request("u", "mistral-7b", "interactive", 4.0, 4, 4, ttft_slo_s=1.5)
    assert qm.add_request(u, 4.0) is None
    return qm


def test_any_class_victims_free_a_slot_that_lower_class_victims_cannot() -> None:
    # "any": the running interactive requests' TTFT SLO is already met, so one of them yields its
    # slot (it resumes later); "lower": only lower classes may be evicted and there are none.
    ev = [a for a in _busy_interactive("any").plan(4.0) if isinstance(a, Evict)]
    assert len(ev) == 1 and ev[0].request_id in {"b0", "b1", "b2", "b3"}
    assert not [a for a in _busy_interactive("lower").plan(4.0) if isinstance(a, Evict)]


def test_lp_solves_after_another_thread_count_started_the_highs_scheduler() -> None:
    # A fresh process (HiGHS' scheduler is process-wide): something runs HiGHS with 2 threads
    # first; the core's LPs (PuLP and highspy formulations) must still solve, not come back
    # "Not Solved" and silently fall back.
    script = """
import sys
sys.path.insert(0, "tests/unit/core")
import highspy
h = highspy.Highs()
h.setOptionValue("output_flag", False)
h.setOptionValue("threads", 2)
h.addVar(0, 1)
h.run()
from conftest import make_fleet, make_request
from qlm_backend.core.api import QueueManager, ManagerConfig
base = ManagerConfig(plan_budget_s=60.0, lp_only_with_swaps=False)
for cfg in (base, base.with_(pulp_max_cols=0)):
    qm = QueueManager(make_fleet(n=2), "qlm", cfg)
    for k in range(3):
        qm.add_request(make_request(f"r{k}", slo_class="batch-2"), 0.0)
    qm.plan(0.0)
    print(qm.decisions[-1].path, end=" ")
"""
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    # (The script's own first Highs() prints HiGHS' banner before the core is imported.)
    assert res.stdout.split()[-2:] == ["lp", "lp"], (res.stdout, res.stderr[-2000:])


def test_hopeless_work_waits_behind_meetable_work_but_ahead_of_far_deadlines() -> None:
    # At t=100: "late" (interactive, arrived at 0, deadline 20) can no longer meet its SLO; "b1"
    # (batch-1, deadline 150) still can; "b2" (batch-2, deadline 3690) has an hour of slack.
    # Default: b1 first (it can still be met), then late (bounded lateness: it does not wait for
    # work that can wait), then b2. With hopeless_before_slack_s = inf (pure attainment) the late
    # request goes last, behind even the hour-away batch work.
    from qlm_backend.core.plan import QueueEntry
    from qlm_backend.core.policies.qlm.ordering import order_queue

    for cfg, want in (
        (ManagerConfig(), ["b1", "late", "b2"]),
        (ManagerConfig(hopeless_before_slack_s=float("inf")), ["b1", "b2", "late"]),
    ):
        qm = QueueManager(make_fleet(n=1), "qlm", cfg)
        for rid, cls, t in (("late", "interactive", 0.0), ("b1", "batch-1", 90.0)):
            qm.add_request(make_request(rid, slo_class=cls, arrival_s=t), t)
        qm.add_request(make_request("b2", slo_class="batch-2", arrival_s=90.0), 90.0)
        ctx = qm._context("test")
        entries = [QueueEntry(qm.requests[r].group_id or "", (r,)) for r in ("b2", "late", "b1")]
        inst = qm.instances["i-0"]
        ordered, _ = order_queue(inst, entries, ctx, 100.0)
        assert [e.request_ids[0] for e in ordered] == want


def test_a_request_whose_own_prefill_outlasts_its_deadline_goes_behind_meetable_work() -> None:
    # At t=100: "edge" (interactive, deadline 100.5) is due first, "ok" (interactive, 256-token
    # prompt, deadline 101) next. With a 16k-token prompt edge needs ~1.4 s of prefill on an
    # A100 even at the head of the line, so it is certain to miss: ok first, then edge. With a
    # 256-token prompt (~0.02 s) edge can still make it and EDF keeps it first.
    from qlm_backend.core.plan import QueueEntry
    from qlm_backend.core.policies.qlm.ordering import order_queue

    for edge_prompt, want in ((16_000, ["ok", "edge"]), (256, ["edge", "ok"])):
        qm = QueueManager(make_fleet(n=1), "qlm", ManagerConfig())
        qm.add_request(make_request("edge", arrival_s=80.5, prompt_tokens=edge_prompt), 80.5)
        qm.add_request(make_request("ok", arrival_s=81.0), 81.0)
        ctx = qm._context("test")
        entries = [QueueEntry(qm.requests[r].group_id or "", (r,)) for r in ("ok", "edge")]
        ordered, _ = order_queue(qm.instances["i-0"], entries, ctx, 100.0)
        assert [e.request_ids[0] for e in ordered] == want


def test_qlm_cooldown_is_its_own_and_the_baselines_keep_theirs() -> None:
    # qlm_evict_cooldown_s is read by QLM only: a baseline's eviction rate (evict_cooldown_s)
    # stays what it was; None hands QLM the shared value again.
    cfg = ManagerConfig()
    assert cfg.evict_cooldown_s == 2.0 and cfg.qlm_evict_cooldown_s == 5.0
    # The instance last evicted at t=1, 3 s before the request at risk: inside QLM's 5 s
    # cooldown (no eviction), outside the shared 2 s one (the eviction of the test above).
    for extra, evicts in (({}, False), ({"qlm_evict_cooldown_s": None}, True)):
        qm = _busy_interactive("any", **extra)
        qm.instances["q-a10-0"].last_evict_s = 1.0
        assert bool([a for a in qm.plan(4.0) if isinstance(a, Evict)]) is evicts
