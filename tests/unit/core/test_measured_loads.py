"""Measured model loads feed the plan: after the first load of a (model, GPU, warm/cold), a swap is
costed at the measured duration (SwapModel's time to on_model_loaded), not the datasheet figure.

The CPU fleet of model_repository/fleet-vllm.json: one instance that swaps between the two tiny
real models; a fake clock gives every time."""

from __future__ import annotations

import pytest
from conftest import FakeClock, make_request

from qlm_backend.core.api import ManagerConfig, Pull, QueueManager, SwapModel, parse_fleet
from qlm_backend.engine.perf import PerfModel

TINY, DEEP = "tiny-llama", "tiny-llama-deep"


def cpu_fleet_manager(config: ManagerConfig | None = None, warm_start: bool = True) -> QueueManager:
    fleet = parse_fleet(
        {
            "instances": [
                {
                    "instance_id": "cpu-0",
                    "gpu": "cpu-2core",
                    "models_allowed": [TINY, DEEP],
                    "initial_model": TINY,
                    "max_in_flight": 2,
                    "warm_start": warm_start,
                }
            ]
        }
    )
    return QueueManager(fleet, "qlm", config or ManagerConfig(min_resident_s=0.0))


def datasheet(model: str, warm: bool = False) -> float:
    return PerfModel.from_names(model, "cpu-2core").load_s(warm)


def swaps(actions: list) -> list[SwapModel]:
    return [a for a in actions if isinstance(a, SwapModel)]


def swap_to(qm: QueueManager, clock: FakeClock, model: str, rid: str) -> SwapModel:
    """Queue one request of `model` on an idle instance running the other model: the plan swaps."""
    qm.add_request(make_request(rid, model, "batch-1", clock.now), clock.now)
    (swap,) = swaps(qm.plan(clock.now))
    assert swap.to_model == model
    return swap


def serve_all(qm: QueueManager, clock: FakeClock) -> None:
    for a in qm.plan(clock.now):
        if isinstance(a, Pull):
            for rid in a.request_ids:
                qm.on_first_token(rid, clock.now)
                qm.on_finished(rid, 8, clock.now)


def test_plans_use_the_measured_cold_load_after_the_first_one() -> None:
    clock = FakeClock(100.0)
    qm = cpu_fleet_manager()
    spec = qm.instances["cpu-0"].spec
    est = qm.estimator
    assert est.load_s(DEEP, spec, warm=False) == pytest.approx(datasheet(DEEP))

    swap = swap_to(qm, clock, DEEP, "d0")
    assert (swap.from_model, swap.warm) == (TINY, False)
    # Before any load was seen the plan expects the datasheet's ~20 s.
    assert qm.instances["cpu-0"].ready_s == pytest.approx(clock.now + datasheet(DEEP))
    clock.advance(35.0)  # the real engine took 35 s (unload of the old one included)
    qm.on_model_loaded("cpu-0", DEEP, clock.now)
    assert est.load_s(DEEP, spec, warm=False) == pytest.approx(35.0)
    assert est.measured_loads() == {(DEEP, "cpu-2core", 1, False): (1, pytest.approx(35.0))}
    # Not measured yet: the way back, and the warm start of the same model.
    assert est.load_s(TINY, spec, warm=False) == pytest.approx(datasheet(TINY))
    assert est.load_s(DEEP, spec, warm=True) == pytest.approx(datasheet(DEEP, warm=True))
    serve_all(qm, clock)

    # Back to tiny-llama: warm (the swap out kept it in host memory), measured as a warm load;
    # the cold figure of tiny-llama stays the datasheet's.
    clock.advance(1.0)
    assert swap_to(qm, clock, TINY, "t0").warm
    clock.advance(4.0)
    qm.on_model_loaded("cpu-0", TINY, clock.now)
    assert est.load_s(TINY, spec, warm=True) == pytest.approx(4.0)
    assert est.load_s(TINY, spec, warm=False) == pytest.approx(datasheet(TINY))
    serve_all(qm, clock)
    # Deep again, warm now: a warm start of deep was never seen, so the datasheet's.
    clock.advance(1.0)
    assert swap_to(qm, clock, DEEP, "d1").warm
    assert qm.instances["cpu-0"].ready_s == pytest.approx(clock.now + datasheet(DEEP, True))


@pytest.mark.parametrize("how", ["no warm slots", "instance without warm start"])
def test_the_next_cold_swap_is_planned_at_the_measured_duration(how: str) -> None:
    # Every swap is cold (the CPU fleet's real engines: warm_start false), so the second swap to
    # deep is costed at the measurement.
    clock = FakeClock(0.0)
    if how == "no warm slots":
        qm = cpu_fleet_manager(ManagerConfig(min_resident_s=0.0, warm_slots_per_host=0))
    else:
        qm = cpu_fleet_manager(warm_start=False)
    swap_to(qm, clock, DEEP, "d0")
    clock.advance(35.0)
    qm.on_model_loaded("cpu-0", DEEP, clock.now)
    serve_all(qm, clock)
    clock.advance(1.0)
    swap_to(qm, clock, TINY, "t0")
    clock.advance(30.0)
    qm.on_model_loaded("cpu-0", TINY, clock.now)
    serve_all(qm, clock)
    clock.advance(1.0)
    t_swap = clock.now
    qm.add_request(make_request("d1", DEEP, "batch-1", t_swap), t_swap)
    (swap,) = swaps(qm.plan(t_swap))
    assert not swap.warm
    assert qm.instances["cpu-0"].ready_s == pytest.approx(t_swap + 35.0)
    # The queued request's predicted wait is the measured load (its first token follows it).
    (stat,) = qm.queue_stats(t_swap)
    assert stat.model == DEEP
    assert 35.0 <= stat.predicted_wait_s < 36.0
    # A second measurement: the mean of the two.
    clock.advance(45.0)
    qm.on_model_loaded("cpu-0", DEEP, clock.now)
    assert qm.estimator.load_s(DEEP, qm.instances["cpu-0"].spec, False) == pytest.approx(40.0)
    assert qm.counters["loads_measured"] == 3


def test_a_recovery_reload_is_not_a_measured_swap() -> None:
    clock = FakeClock(0.0)
    qm = cpu_fleet_manager()
    spec = qm.instances["cpu-0"].spec
    qm.on_engine_failed("cpu-0", clock.now)
    clock.advance(50.0)
    qm.on_model_loaded("cpu-0", TINY, clock.now)  # the driver's recovery, no SwapModel
    assert qm.estimator.measured_loads() == {}
    assert qm.estimator.load_s(TINY, spec, warm=False) == pytest.approx(datasheet(TINY))
    # A swap whose load failed (engine failure while loading) is not measured either.
    swap_to(qm, clock, DEEP, "d0")
    qm.on_engine_failed("cpu-0", clock.now)
    clock.advance(60.0)
    qm.on_model_loaded("cpu-0", TINY, clock.now)
    assert qm.estimator.measured_loads() == {}


def test_measured_load_costs_off_keeps_the_datasheet() -> None:
    clock = FakeClock(0.0)
    qm = cpu_fleet_manager(ManagerConfig(min_resident_s=0.0, measured_load_costs=False))
    swap_to(qm, clock, DEEP, "d0")
    clock.advance(35.0)
    qm.on_model_loaded("cpu-0", DEEP, clock.now)
    spec = qm.instances["cpu-0"].spec
    assert qm.estimator.load_s(DEEP, spec, warm=False) == pytest.approx(datasheet(DEEP))


def test_observe_load_ignores_nonsense() -> None:
    qm = cpu_fleet_manager()
    spec = qm.instances["cpu-0"].spec
    for bad in (-1.0, float("nan"), float("inf")):
        qm.estimator.observe_load(DEEP, spec, False, bad)
    assert qm.estimator.measured_loads() == {}


def test_an_instance_without_warm_start_keeps_nothing_warm() -> None:
    qm = cpu_fleet_manager(warm_start=False)
    qm.add_request(make_request("d0", DEEP, "batch-1", 0.0), 0.0)
    acts = qm.plan(0.0)
    assert [type(a).__name__ for a in acts] == ["SwapModel"]  # no KeepWarm of tiny-llama
    assert acts[0] == SwapModel("cpu-0", TINY, DEEP, warm=False)
    assert qm.instance_views()[0].warm_models == ()
    with pytest.raises(ValueError, match=r"warm_start: expected true or false"):
        parse_fleet(
            {
                "instances": [
                    {
                        "instance_id": "c",
                        "gpu": "cpu-2core",
                        "models_allowed": [TINY],
                        "warm_start": "no",
                    }
                ]
            }
        )


def test_a_load_counts_as_it_really_started_not_as_planned() -> None:
    # The plan said warm; the executor reports the engine did not wake and loaded cold.
    qm, clock = cpu_fleet_manager(), FakeClock()
    qm.instances["cpu-0"].loading, qm.instances["cpu-0"].model = DEEP, None
    qm.instances["cpu-0"].loading_warm, qm.instances["cpu-0"].loaded_s = True, 0.0
    clock.advance(40.0)
    qm.on_model_loaded("cpu-0", DEEP, clock.now, warm=False)
    spec = qm.instances["cpu-0"].spec
    assert qm.estimator.measured_loads() == {(DEEP, spec.gpu, spec.tp, False): (1, 40.0)}


def test_the_resume_hit_share_follows_what_the_engine_reports() -> None:
    qm = cpu_fleet_manager()
    est = qm.estimator
    assert est.resume_hit_share("cpu-0") == 0.0  # nothing reported: a whole re-prefill
    qm.on_resume_cached("cpu-0", 900, 1000, 1.0)
    assert est.resume_hit_share("cpu-0") == pytest.approx(0.9)
    assert est.resume_hit_share("other") == 0.0  # per instance
    # Token-weighted: a long resume that missed outweighs a short one that hit.
    qm.on_resume_cached("cpu-0", 0, 9000, 2.0)
    assert est.resume_hit_share("cpu-0") == pytest.approx(0.95 * 900 / (0.95 * 1000 + 9000))
    # Older reports fade: after many misses the share is near 0.
    for _ in range(200):
        qm.on_resume_cached("cpu-0", 0, 1000, 3.0)
    assert est.resume_hit_share("cpu-0") < 0.001
    assert qm.counters["resumes_reported"] == 202
