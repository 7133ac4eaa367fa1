"""`qlm-bench chaos`'s pure half (bench/faults.py): the seeded fault schedule, each request's seeded
choices, how errors are named, and the accounting (lost, orphaned, refused, recovery, TTFT phases)."""

from __future__ import annotations

from collections import Counter

import pytest

from qlm_backend.bench.faults import (
    DEFAULT_KINDS,
    KINDS,
    OPENAI_BAD,
    TRITON_BAD,
    Fault,
    FaultRun,
    Observed,
    Recovery,
    ScheduleConfig,
    account,
    bad_input_ok,
    busiest,
    choose,
    error_kind,
    next_start_s,
    orphaned,
    phase_of,
    plan_faults,
    recovery,
)

SLO = {"interactive": 20.0, "batch-1": 60.0, "batch-2": 3600.0}
CLASSES = tuple(SLO)
TARGETS = {"engine-kill": ["m__e1-0", "m__e1-1", "m__e2-0"], "server-restart": ["e1", "e2"]}
DUR = {"burst": 3.0, "cancel-wave": 3.0, "bad-input": 3.0, "server-restart": 3.0}


def cfg(**kw) -> ScheduleConfig:
    args = {"kinds": DEFAULT_KINDS, "start_s": 10.0, "end_s": 48.0, "every_s": 45.0}
    return ScheduleConfig(**{**args, "durations_s": DUR, **kw})


# --- the schedule ---------------------------------------------------------------------------------
def test_the_schedule_is_seeded_and_has_every_kind_once_in_a_short_run():
    a, b = plan_faults(7, cfg(), TARGETS), plan_faults(7, cfg(), TARGETS)
    assert a == b
    assert plan_faults(8, cfg(), TARGETS) != a
    assert sorted(f.kind for f in a) == sorted(DEFAULT_KINDS)
    assert [f.index for f in a] == list(range(1, len(a) + 1))


def test_faults_come_one_at_a_time_inside_the_window_with_their_targets():
    for seed in range(20):
        plan = plan_faults(seed, cfg(), TARGETS)
        for f, g in zip(plan, plan[1:], strict=False):
            assert f.at_s + f.duration_s + 1.0 <= g.at_s + 1e-9  # the gap, planned
        assert all(f.at_s >= 10.0 and f.at_s + f.duration_s <= 48.0 for f in plan)
        for f in plan:
            assert (f.target in TARGETS[f.kind]) if f.kind in TARGETS else f.target == ""
            assert f.duration_s == DUR.get(f.kind, 0.0)


def test_a_long_run_repeats_the_kinds_evenly():
    plan = plan_faults(3, cfg(start_s=60.0, end_s=480.0, every_s=40.0), TARGETS)
    counts = Counter(f.kind for f in plan)
    assert len(plan) == 10 and set(counts) == set(DEFAULT_KINDS)
    assert max(counts.values()) - min(counts.values()) <= 1  # whole shuffled passes


def test_a_window_too_short_or_a_bad_kind_is_refused():
    with pytest.raises(ValueError, match="too short"):
        plan_faults(0, cfg(end_s=20.0), TARGETS)
    with pytest.raises(ValueError, match="fault kinds"):
        cfg(kinds=("meteor",))
    with pytest.raises(ValueError, match="no target"):
        plan_faults(0, cfg(kinds=("engine-kill",)), {"engine-kill": []})
    assert "router-crash" in KINDS and "router-crash" not in DEFAULT_KINDS


def test_a_late_fault_waits_for_the_previous_one():
    assert next_start_s(20.0, None, 1.0) == 20.0
    assert next_start_s(20.0, 15.0, 1.0) == 20.0
    assert next_start_s(20.0, 19.5, 1.0) == 20.5


# --- each request's choices -----------------------------------------------------------------------
def test_request_choices_are_seeded_by_id_and_follow_the_shares():
    shares = {"grpc": 0.5, "http": 0.2, "openai": 0.3}
    assert choose(1, "r5", shares, 0.1, 0.1) == choose(1, "r5", shares, 0.1, 0.1)
    picks = [choose(1, f"r{k}", shares, 0.05, 0.03) for k in range(4000)]
    fronts = Counter(c.front for c in picks)
    assert abs(fronts["grpc"] / 4000 - 0.5) < 0.04 and abs(fronts["openai"] / 4000 - 0.3) < 0.04
    assert 0.02 < sum(c.bad is not None for c in picks) / 4000 < 0.045
    assert 0.03 < sum(c.cancel_at is not None for c in picks) / 4000 < 0.07
    for c in picks:
        if c.bad is not None:
            assert c.cancel_at is None  # a bad input is refused at once: nothing to cancel
            assert c.bad in (OPENAI_BAD if c.front == "openai" else TRITON_BAD)
        if c.cancel_at is not None:
            assert 0.05 <= c.cancel_at <= 0.9
    only = choose(1, "r1", {"openai": 1.0}, 0.0, 1.0)
    assert only.front == "openai" and only.bad in OPENAI_BAD


# --- what the clients saw -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "front,status,message,kind",
    [
        ("grpc", "UNAVAILABLE", "qlm: request shed: deadline 20 s, first token at 41 s", "shed"),
        ("openai", "HTTP 503", "None: the router is overloaded: queue is full", "queue-full"),
        ("grpc", "SERVER_ERROR", "Request for unknown model: 'qlm' has no available versions", "router-unavailable"),
        ("openai", "HTTP 503", "None: the router is unavailable: ...", "router-unavailable"),
        ("grpc", "SERVER_ERROR", "Stub process 'qlm_0_0' is not healthy.", "router-unavailable"),
        ("openai", "HTTP 503", "None: the router 'qlm' went down (its model is not ready); ...", "router-down"),
        ("http", "HTTP 504", "qlm: request timed out: not finished 7200 s after receipt", "timeout"),
        ("grpc", "CANCELLED", "the caller stopped reading the stream", "cancelled"),
        ("http", "HTTP 400", "qlm: slo_class: unknown class 'gold'", "invalid"),
        ("grpc", "SERVER_ERROR", "qlm: something odd", "other"),
    ],
)  # fmt: skip
def test_error_kinds(front, status, message, kind):
    assert error_kind(status, message) == kind  # `front`: where such an error comes from


def obs(rid="r", front="grpc", cls="interactive", sent=0.0, outcome="completed", **kw) -> Observed:
    kw.setdefault("end_s", sent + 1.0 if outcome != "lost" else None)
    kw.setdefault("ttft_s", 0.5 if outcome == "completed" else None)
    return Observed(rid, front, cls, sent, outcome, **kw)


def test_a_bad_input_must_be_refused_naming_its_field():
    bad = {"bad_field": "slo_class", "outcome": "error"}
    assert bad_input_ok(obs(front="grpc", status="SERVER_ERROR", error="qlm: slo_class: no", **bad))
    assert bad_input_ok(obs(front="http", status="HTTP 400", error="qlm: slo_class: no", **bad))
    assert not bad_input_ok(obs(front="http", status="HTTP 500", error="slo_class", **bad))
    assert not bad_input_ok(obs(front="grpc", error="something else", **bad))
    assert not bad_input_ok(obs(front="grpc", outcome="completed", bad_field="slo_class"))
    assert bad_input_ok(
        obs(front="openai", status="HTTP 404", error="model: unknown", bad_field="model", outcome="error")
    )  # fmt: skip


def test_only_triton_streams_open_at_a_router_kill_are_orphans():
    kills = [10.0]
    assert orphaned(obs(sent=9.0, outcome="lost", status="CUT"), kills)
    assert orphaned(obs(sent=9.0, outcome="cancelled", end_s=30.0), kills)
    assert not orphaned(obs(sent=9.0, outcome="lost", end_s=9.5), kills)  # ended before it
    assert not orphaned(obs(sent=11.0, outcome="lost"), kills)  # sent after it
    assert not orphaned(obs(sent=9.0, outcome="completed", end_s=12.0), kills)
    assert not orphaned(obs(front="openai", sent=9.0, outcome="lost"), kills)  # 503 expected
    assert not orphaned(obs(sent=9.0, outcome="lost"), [])


def run_of(kind: str, start: float, end: float, target: str = "", error=None) -> FaultRun:
    return FaultRun(Fault(1, kind, start, end - start, target), start, end, "", error, target)


def recovery_s(*args):
    got = recovery(*args)
    return None if got is None else got.after_s


def test_recovery_is_the_first_normal_service_by_the_part_hit():
    kill = run_of("engine-kill", 10.0, 10.0, "m__e1-0")
    seen = [
        obs("a", sent=5.0, end_s=12.0, instance="e1-0"),  # sent before the kill: no proof
        obs("b", sent=11.0, end_s=13.0, instance="e2-0"),  # another instance
        obs("c", sent=11.0, end_s=14.0, instance="e1-0", ttft_s=30.0),  # over its SLO
        obs("d", sent=12.0, end_s=16.0, instance="e1-0", bad_field="x"),  # a bad input
        obs("e", sent=12.0, end_s=17.5, instance="e1-0"),
        obs("f", sent=13.0, end_s=19.0, instance="e1-0"),
    ]
    assert recovery_s(kill, seen, ["e1-0"], SLO, 1.0) == 7.5
    assert recovery_s(kill, seen[:4], ["e1-0"], SLO, 1.0) is None
    # TTFT is judged in simulated seconds: 30 s wall at time_scale 2 is 15 s, within 20.
    assert recovery_s(kill, seen[:4], ["e1-0"], SLO, 2.0) == 4.0
    # A server's recovery waits for every one of its instances.
    restart = run_of("server-restart", 10.0, 14.0, "e1")
    assert recovery_s(restart, seen, ["e1-0", "e2-0"], SLO, 1.0) == 7.5
    assert recovery_s(restart, seen, ["e1-0", "e1-1"], SLO, 1.0) is None
    # Any request will do for the router; a load window counts from its end.
    assert recovery_s(run_of("router-reload", 10.0, 11.0), seen, [], SLO, 1.0) == 3.0
    assert recovery_s(run_of("burst", 10.0, 12.5), seen, [], SLO, 1.0) == 9.0
    assert recovery_s(run_of("router-reload", 10, 11, error="boom"), seen, [], SLO, 1.0) is None


def test_a_direct_probe_shows_an_instance_back_but_not_the_router():
    kill = run_of("engine-kill", 10.0, 10.0, "m__e1-0")
    probe = obs("p1", front="probe", sent=12.0, end_s=12.2, instance="e1-0")
    routed = obs("r1", sent=11.0, end_s=15.0, instance="e1-0")
    assert recovery(kill, [routed, probe], ["e1-0"], SLO, 1.0) == Recovery(
        pytest.approx(2.2), ("probe",)
    )
    assert recovery(kill, [routed], ["e1-0"], SLO, 1.0) == Recovery(5.0, ("grpc",))
    restart = run_of("server-restart", 10.0, 14.0, "e1")
    both = recovery(restart, [probe, obs("r2", sent=11, end_s=16, instance="e1-1")],
                    ["e1-0", "e1-1"], SLO, 1.0)  # fmt: skip
    assert both == Recovery(6.0, ("grpc", "probe"))
    # A probe bypasses the router: it shows nothing of the router's recovery.
    assert recovery(run_of("router-reload", 10.0, 11.0), [probe], [], SLO, 1.0) is None


def test_an_engine_kill_hits_the_busiest_engine():
    assert busiest({"a": 1, "b": 3, "c": 0}, 0, 1) == "b"
    tied = {busiest({"a": 2, "b": 2, "c": 1}, 0, i) for i in range(30)}
    assert tied == {"a", "b"}
    assert busiest({"a": 2, "b": 2}, 5, 3) == busiest({"b": 2, "a": 2}, 5, 3)
    with pytest.raises(ValueError):
        busiest({}, 0, 1)


def test_phases():
    assert phase_of(5.0, None, None) == "before"
    assert [phase_of(t, 10.0, 40.0) for t in (9.9, 10.0, 40.0, 40.1)] == [
        "before",
        "during",
        "during",
        "after",
    ]


def test_the_accounting():
    runs = [run_of("router-crash", 20.0, 20.0), run_of("burst", 30.0, 35.0)]
    seen = [
        obs("ok1", sent=1.0, ttft_s=0.4),
        obs("ok2", sent=25.0, ttft_s=2.0, cls="batch-1"),
        obs("ok3", sent=50.0, ttft_s=0.3, front="http"),
        obs("shed", sent=31.0, outcome="error", status="UNAVAILABLE", error="request shed: x"),
        obs("gone", sent=20.5, outcome="error", front="openai", status="HTTP 503",
            error="None: the router is unavailable: went down"),
        obs("late", sent=31.0, outcome="error", status="SERVER_ERROR", error="qlm: odd", tokens=3),
        obs("cxl", sent=32.0, outcome="cancelled"),
        obs("orphan", sent=19.0, outcome="lost", status="CUT"),
        obs("lost", sent=40.0, outcome="lost", status="TIMEOUT", error="no final response"),
        obs("bad1", sent=33.0, outcome="error", status="HTTP 400", error="qlm: top_p: >1",
            front="http", bad_field="top_p"),
        obs("bad2", sent=34.0, outcome="completed", bad_field="top_p"),
    ]  # fmt: skip
    acc = account(seen, runs, CLASSES, 1.0)
    assert (acc.sent, acc.bad_inputs, acc.bad_inputs_refused_ok) == (9, 2, 1)
    assert len(acc.bad_input_misanswers) == 1 and "completed" in acc.bad_input_misanswers[0]
    assert (acc.completed, acc.cancelled, acc.orphaned, acc.lost) == (3, 1, 1, 1)
    assert acc.errors_by_kind == {"other": 1, "router-down": 1, "shed": 1}
    assert (acc.refused, acc.accepted) == (2, 7)  # shed + router gone, before any token
    assert acc.lost_samples and "lost" in acc.lost_samples[0]
    assert acc.per_front["grpc"]["orphaned"] == 1 and acc.per_front["http"]["completed"] == 1
    assert acc.ttft_p99_sim_s["interactive"]["before"] == pytest.approx(0.4)
    assert acc.ttft_p99_sim_s["batch-1"]["during"] == pytest.approx(2.0)
    assert acc.ttft_n["interactive"] == {"before": 1, "during": 0, "after": 1}
    assert acc.ttft_p99_sim_s["batch-2"]["after"] is None
    assert acc.as_json()["errors_by_kind"] == acc.errors_by_kind


def test_unanswered_within_its_slo_is_waiting_not_lost():
    slo = {"interactive": 20.0, "batch-1": 60.0, "batch-2": 3600.0}
    seen = [
        # batch-2, no token when its client gave up after 120 s: the router owes it nothing yet
        obs("b2", cls="batch-2", sent=300.0, outcome="lost", end_s=420.0, error="TimeoutError"),
        # interactive, no token after 120 s: its 20 s SLO ran out long ago -> lost
        obs("i", sent=300.0, outcome="lost", end_s=420.0, error="TimeoutError"),
        # batch-2 that got tokens, then stalled: a stream left hanging is lost whatever its SLO
        obs("b2s", cls="batch-2", sent=300.0, outcome="lost", end_s=420.0, tokens=3, ttft_s=1.0),
    ]
    acc = account(seen, [], tuple(slo), 1.0, slo)
    assert (acc.waiting, acc.lost) == (1, 2)
    assert acc.waiting_samples[0].startswith("b2 grpc batch-2")
    # At a time scale of 0.01 the batch-2 SLO is 36 wall seconds: 120 s without a token is lost.
    assert account(seen[:1], [], tuple(slo), 0.01, slo).lost == 1
    # Without the SLOs nothing is excused.
    assert account(seen, [], tuple(slo), 1.0).lost == 3
