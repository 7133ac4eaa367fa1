"""QLM's pulls bounded by the work a request brings, class priority forwarded to the engine, and
evictions that must pay for the re-prefill they cause."""

from __future__ import annotations

from conftest import make_fleet, make_request

from qlm_backend.core.api import ManagerConfig, OutputPrior, Pull, QueueManager


def _pulled(actions: list) -> list[str]:
    return [r for a in actions if isinstance(a, Pull) for r in a.request_ids]


def test_qlm_pulls_carry_the_class_priority_for_the_engine_scheduler() -> None:
    qm = QueueManager(make_fleet(n=1, max_in_flight=8), "qlm")
    qm.add_request(make_request("i", slo_class="interactive"), 0)
    qm.add_request(make_request("b", slo_class="batch-2"), 0)
    prio = {r: a.priority for a in qm.plan(0.0) if isinstance(a, Pull) for r in a.request_ids}
    assert prio == {"i": 0, "b": 2}
    assert qm.policy.traits.engine_scheduling == "priority"


def test_a_long_prefill_backlog_holds_lower_classes_in_the_router_but_not_a_higher_one() -> None:
    # Cap: 0.1 x 20 s = 2 s of unprefilled prompt per priority level and above. Five batch-1
    # requests of 30k tokens (~1 s of prefill each on an A100) fill it after two; an interactive
    # request still goes in: only its own class is ahead of it in a priority-scheduling engine.
    cfg = ManagerConfig(pull_prefill_backlog_share=0.1, pull_kv_overcommit=100.0)
    qm = QueueManager(make_fleet(n=1, max_in_flight=32), "qlm", cfg)
    for k in range(5):
        qm.add_request(make_request(f"b{k}", slo_class="batch-1", prompt_tokens=30_000), 0)
    first = _pulled(qm.plan(0.0))
    assert 1 <= len(first) < 5  # held back by prefill work, not by the count bound of 32
    qm.add_request(
        make_request("i", slo_class="interactive", arrival_s=0.1, prompt_tokens=30_000), 0.1
    )
    second = _pulled(qm.plan(0.1))
    assert second == ["i"]


def test_the_kv_cap_counts_every_class_and_admits_one_request_into_an_empty_engine() -> None:
    # mistral-7b on an A100-80G has ~470k KV tokens: three 200k-token requests cannot all fit.
    cfg = ManagerConfig(
        pull_prefill_backlog_share=100.0,
        pull_kv_overcommit=1.0,
        default_prior=OutputPrior(10.0, 1.0),
    )
    qm = QueueManager(make_fleet(n=1, max_in_flight=32), "qlm", cfg)
    big = 200_000
    for k in range(3):
        qm.add_request(
            make_request(f"b{k}", slo_class="batch-2", prompt_tokens=big, max_tokens=16), 0
        )
    assert _pulled(qm.plan(0.0)) == ["b0", "b1"]


def test_the_eviction_charge_is_the_victims_re_prefill_less_the_reported_hits() -> None:
    from qlm_backend.core.policies.qlm import QlmPolicy
    from qlm_backend.core.request import RequestState
    from qlm_backend.engine.perf import PerfModel

    perf = PerfModel.from_names("mistral-7b", "A100-80G", 1)
    short = RequestState(make_request("s", slo_class="batch-2", prompt_tokens=500))
    long_ = RequestState(make_request("l", slo_class="batch-2", prompt_tokens=30_000))
    long_.tokens_done = 100
    # No hit reported yet: the whole context.
    assert QlmPolicy._resume_cost_s(short, perf, 0.0) == perf.prefill_s(500)
    assert QlmPolicy._resume_cost_s(long_, perf, 0.0) == perf.prefill_s(30_100)
    # Its engine kept 60% of resumed contexts: only the rest is prefilled again.
    assert QlmPolicy._resume_cost_s(long_, perf, 0.6) == perf.prefill_s(12_040)
    assert QlmPolicy._resume_cost_s(long_, perf, 1.0) == perf.prefill_s(1)


def test_victims_of_one_class_go_cheapest_to_resume_first() -> None:
    cfg = ManagerConfig(pull_prefill_backlog_share=100.0, pull_kv_overcommit=100.0)
    qm = QueueManager(make_fleet(n=1, max_in_flight=3), "qlm", cfg)
    for rid, prompt in (("big", 20_000), ("small", 300), ("mid", 3_000)):
        qm.add_request(make_request(rid, slo_class="batch-2", prompt_tokens=prompt), 0)
    qm.plan(0.0)
    for rid in ("big", "small", "mid"):
        qm.on_first_token(rid, 0.5)
    ctx = qm._context("test")
    order = [v.req.request_id for v in qm.policy._victims(ctx.instances["i-0"], ctx, 1.0, 0)]
    assert order == ["small", "mid", "big"]
