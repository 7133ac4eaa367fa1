"""flow-control (llm-d / Gateway API inference extension flow control): strict priority bands, EDF
within a band, a saturation detector per engine that holds requests in the router, shedding of
sheddable classes, bounded in-flight; expected orders written out."""

from __future__ import annotations

from conftest import make_fleet, make_request

from qlm_backend.core.api import (
    POLICY_NAMES,
    KeepWarm,
    Pull,
    QueueManager,
    Reject,
    SwapModel,
    check_invariants,
    make_policy,
)
from qlm_backend.core.policies.flow_control import FlowControlPolicy, SaturationThresholds
from qlm_backend.engine.perf import PerfModel


def pulls(actions: list) -> list[Pull]:
    return [a for a in actions if isinstance(a, Pull)]


def pulled_ids(actions: list) -> list[str]:
    return [r for p in pulls(actions) for r in p.request_ids]


def serve_one_at_a_time(qm: QueueManager, t: float) -> list[str]:
    """Finish whatever runs, plan, repeat until nothing is queued: the dispatch order."""
    order: list[str] = []
    while qm.num_queued or qm.num_in_flight:
        t += 1.0
        for iid in sorted(qm.instances):
            for rid in sorted(qm.in_flight(iid)):
                qm.on_finished(rid, 10, t)
        order += pulled_ids(qm.plan(t))
        check_invariants(qm)
    return order


def test_traits_say_what_it_stands_for() -> None:
    tr = FlowControlPolicy().traits
    assert tr.bounded_pull and tr.sheds and tr.warm_start
    assert tr.engine_scheduling == "priority"
    assert SaturationThresholds() == SaturationThresholds(queue_depth=5, kv_cache_util=0.8)


def test_an_interactive_request_queued_after_batch_ones_is_dispatched_first() -> None:
    qm = QueueManager(make_fleet(n=1, max_in_flight=1), "flow-control")
    for k in range(3):
        qm.add_request(make_request(f"b{k}", slo_class="batch-1", arrival_s=0.0), 0.0)
    assert pulled_ids(qm.plan(0.0)) == ["b0"]
    qm.add_request(make_request("i", slo_class="interactive", arrival_s=0.5), 0.5)
    assert pulled_ids(qm.plan(0.5)) == []  # the engine is at its bound: i waits in the router
    qm.on_finished("b0", 10, 1.0)
    acts = qm.plan(1.0)
    assert pulls(acts) == [Pull("i-0", pulls(acts)[0].group_id, ("i",), 0)]  # class priority 0
    order = serve_one_at_a_time(qm, 1.0)
    assert order == ["b1", "b2"]
    # The engine schedules by priority: batch-1 goes in with its class priority.
    qm2 = QueueManager(make_fleet(n=1, max_in_flight=1), "flow-control")
    qm2.add_request(make_request("b", slo_class="batch-1"), 0.0)
    assert [p.priority for p in pulls(qm2.plan(0.0))] == [1]


def test_edf_within_a_band_and_the_band_before_the_deadline() -> None:
    qm = QueueManager(make_fleet(n=1, max_in_flight=1), "flow-control")
    # Interactive with their own deadlines, and a batch-1 request whose deadline is the earliest
    # of all: bands first (x last), EDF inside the band (b 30 s, c 40 s, a 50 s).
    qm.add_request(make_request("a", arrival_s=0.0, deadline_s=50.0), 0.0)
    qm.add_request(make_request("b", arrival_s=0.0, deadline_s=30.0), 0.0)
    qm.add_request(make_request("c", arrival_s=0.0, deadline_s=40.0), 0.0)
    qm.add_request(make_request("x", slo_class="batch-1", arrival_s=0.0, deadline_s=10.0), 0.0)
    order = pulled_ids(qm.plan(0.0)) + serve_one_at_a_time(qm, 0.0)
    assert order == ["b", "c", "a", "x"]


def test_a_full_engine_queue_holds_requests_in_the_router() -> None:
    # The engine runs at most 256 sequences (vLLM max_num_seqs); the router's bound (400) is
    # above it, so requests past 256 wait inside the engine. Dispatch goes on while at most 5
    # wait there: the 262nd request is dispatched with 5 waiting, then the engine is saturated
    # and the other 38 stay in the router. (KV: 262 x 256 prompt tokens, 16% of 430k.)
    qm = QueueManager(make_fleet(n=1, max_in_flight=400), "flow-control")
    for k in range(300):
        qm.add_request(make_request(f"r{k:03d}", prompt_tokens=256), 0.0)
    got = pulled_ids(qm.plan(0.0))
    assert len(got) == 256 + 6 and got == [f"r{k:03d}" for k in range(262)]
    assert qm.num_queued == 38
    d = qm.decisions[-1]
    assert "held in the router: mistral-7b" in d.reason
    assert pulled_ids(qm.plan(0.5)) == []  # nothing changed: still saturated
    qm.on_finished("r000", 10, 1.0)
    assert pulled_ids(qm.plan(1.0)) == ["r262"]  # one left, one in: 5 waiting again
    check_invariants(qm)


def test_a_full_kv_cache_holds_requests_in_the_router() -> None:
    # mistral-7b on an A100-80G holds 430,650 KV tokens; 40,000-token prompts: 8 in flight use
    # 74% (under 80%: the 9th is dispatched), 9 use 84% (saturated), though a 10th would fit.
    cap = PerfModel.from_names("mistral-7b", "A100-80G").kv_capacity_tokens
    assert cap == 430_650
    qm = QueueManager(make_fleet(n=1, max_in_flight=64), "flow-control")
    for k in range(20):
        qm.add_request(make_request(f"r{k:02d}", prompt_tokens=40_000), 0.0)
    assert len(pulled_ids(qm.plan(0.0))) == 9
    assert qm.num_queued == 11
    assert 9 * 40_000 / cap > 0.8 > 8 * 40_000 / cap


def test_the_in_flight_bound_caps_each_engine() -> None:
    qm = QueueManager(make_fleet(n=2, max_in_flight=3), "flow-control")
    for k in range(10):
        qm.add_request(make_request(f"r{k}", arrival_s=0.01 * k), 0.01 * k)
    acts = qm.plan(0.1)
    # Dealt to the engine with the most capacity left, alternating: r0 i-0, r1 i-1, ...
    assert [(p.instance_id, p.request_ids) for p in pulls(acts)] == [
        ("i-0", ("r0", "r2", "r4")),
        ("i-1", ("r1", "r3", "r5")),
    ]
    assert len(qm.in_flight("i-0")) == len(qm.in_flight("i-1")) == 3
    qm.on_finished("r2", 10, 1.0)
    assert [(p.instance_id, p.request_ids) for p in pulls(qm.plan(1.0))] == [("i-0", ("r6",))]


def test_a_sheddable_request_is_shed_only_when_saturated_and_hopeless() -> None:
    qm = QueueManager(make_fleet(n=1, max_in_flight=2), "flow-control")
    for k in range(50):
        qm.add_request(make_request(f"m{k:02d}", slo_class="batch-1"), 0.0)
    assert len(pulled_ids(qm.plan(0.0))) == 2  # the engine is at its bound: saturated
    # batch-2 (sheddable) with 5 s left, behind 48 batch-1 requests (~256 tokens each at a
    # 2-request batch): hopeless, refused at once.
    rej = qm.add_request(
        make_request("late", slo_class="batch-2", arrival_s=1.0, deadline_s=6.0), 1
    )
    assert isinstance(rej, Reject)
    assert "saturated" in rej.reason and "cannot be met" in rej.reason
    assert qm.counters["shed"] == 1
    # With its class's hour of slack it waits in its band.
    assert qm.add_request(make_request("slack", slo_class="batch-2", arrival_s=1.0), 1.0) is None
    # A class that is not sheddable is never shed, however hopeless.
    urgent = make_request("urgent", slo_class="interactive", arrival_s=1.0, deadline_s=1.5)
    assert qm.add_request(urgent, 1.0) is None
    # Not saturated (an empty engine): the same hopeless-looking request is admitted.
    qm2 = QueueManager(make_fleet(n=1, max_in_flight=2), "flow-control")
    late2 = make_request("late", slo_class="batch-2", arrival_s=1.0, deadline_s=6.0)
    assert qm2.add_request(late2, 1.0) is None


def test_shedding_can_be_switched_off() -> None:
    qm = QueueManager(make_fleet(n=1, max_in_flight=1), FlowControlPolicy(shed=False))
    for k in range(50):
        qm.add_request(make_request(f"m{k:02d}", slo_class="batch-1"), 0.0)
    qm.plan(0.0)
    late = make_request("late", slo_class="batch-2", arrival_s=1.0, deadline_s=6.0)
    assert qm.add_request(late, 1.0) is None


def test_a_sheddable_request_past_its_deadline_goes_last() -> None:
    # Upstream it would have expired in the queue (TTL = its SLO) and been dropped; the core can
    # only refuse at admission, so it is served when nothing else waits.
    qm = QueueManager(make_fleet(n=1, max_in_flight=1), "flow-control")
    qm.add_request(make_request("run", slo_class="batch-1"), 0.0)
    assert pulled_ids(qm.plan(0.0)) == ["run"]
    qm.add_request(make_request("x", slo_class="batch-2", arrival_s=0.0, deadline_s=2.0), 0.0)
    qm.add_request(make_request("y", slo_class="batch-2", arrival_s=0.1), 0.1)
    assert serve_one_at_a_time(qm, 4.0) == ["y", "x"]


def test_model_swap_after_drain_with_warm_start() -> None:
    qm = QueueManager(
        make_fleet(n=1, models=("mistral-7b", "llama-2-13b"), max_in_flight=4),
        "flow-control",
    )
    qm.add_request(make_request("m", slo_class="batch-1"), 0.0)
    assert pulled_ids(qm.plan(0.0)) == ["m"]
    qm.add_request(make_request("l", model="llama-2-13b", slo_class="interactive"), 0.1)
    assert not any(isinstance(a, SwapModel) for a in qm.plan(0.1))  # drains first
    qm.on_finished("m", 10, 1.0)
    acts = qm.plan(1.0)
    assert [a for a in acts if isinstance(a, SwapModel)] == [
        SwapModel("i-0", "mistral-7b", "llama-2-13b", warm=False)
    ]
    assert KeepWarm("mistral-7b", "i-0") in acts
    assert qm.instance_views()[0].warm_models == ("mistral-7b",)
    qm.on_model_loaded("i-0", "llama-2-13b", 30.0)
    assert pulled_ids(qm.plan(30.0)) == ["l"]


def test_every_policy_that_swaps_keeps_weights_warm() -> None:
    for name in POLICY_NAMES:
        assert make_policy(name).traits.warm_start, name


def test_a_model_of_another_pool_is_not_held_by_a_saturated_one() -> None:
    # Two instances, one per model: mistral's engine is at its bound, llama's is free.
    fleet = make_fleet(
        n=1,
        max_in_flight=1,
        extra=[
            {
                "instance_id": "l-0",
                "gpu": "A100-80G",
                "models_allowed": ["llama-2-13b"],
                "initial_model": "llama-2-13b",
                "max_in_flight": 1,
            }
        ],
    )
    qm = QueueManager(fleet, "flow-control")
    qm.add_request(make_request("m0", arrival_s=0.0), 0.0)
    qm.add_request(make_request("m1", arrival_s=0.0), 0.0)
    qm.add_request(make_request("l0", model="llama-2-13b", slo_class="batch-1"), 0.0)
    got = sorted((p.instance_id, p.request_ids) for p in pulls(qm.plan(0.0)))
    assert got == [("i-0", ("m0",)), ("l-0", ("l0",))]
    assert qm.num_queued == 1
