"""Scoring the estimator's forecasts (eval/calibration.py) on hand-made data, and the recorder on a
small simulation: it sees every request and changes nothing."""

from __future__ import annotations

import pytest

from qlm_backend.engine.perf import PerfModel
from qlm_backend.eval import calibration as cal
from qlm_backend.eval.load import estimate_capacity, scale_to_load
from qlm_backend.eval.perturb import StepScaledPerf, engine_perf
from qlm_backend.eval.scenario import build_workload, load_scenario
from qlm_backend.eval.simulator import SimSettings, Simulation
from qlm_backend.eval.traces import DEFAULT_TRACE, load_trace, window


def point(rid: str, t: float, pos: int, ft: float, p: float, kind: str = "planned"):
    return cal.ForecastPoint(rid, kind, t, "i-0", pos, ft, 1.0, p)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- Brier
def test_brier_and_base_rate() -> None:
    probs = [0.9, 0.2, 0.5, 1.0]
    ys = [True, False, True, True]
    # (0.1^2 + 0.2^2 + 0.5^2 + 0^2) / 4
    assert cal.brier(probs, ys) == pytest.approx(0.075)
    # base rate 3/4: 0.75 x 0.25
    assert cal.base_rate_brier(ys) == pytest.approx(0.1875)
    assert cal.brier([], []) is None
    assert cal.base_rate_brier([]) is None
    with pytest.raises(ValueError):
        cal.brier([0.5], [True, False])


def test_perfect_and_constant_forecasters() -> None:
    ys = [True, True, False, True]
    assert cal.brier([1.0, 1.0, 0.0, 1.0], ys) == 0.0
    # A constant forecast at the base rate scores exactly the base rate's Brier.
    assert cal.brier([0.75] * 4, ys) == pytest.approx(cal.base_rate_brier(ys))


# ---------------------------------------------------------------------------------- reliability
def test_reliability_bins() -> None:
    probs = [0.05, 0.15, 0.12, 0.95, 1.0, 0.99, 0.1]
    ys = [False, True, False, True, True, False, True]
    bins = cal.reliability(probs, ys)
    assert len(bins) == 10
    assert [b.count for b in bins] == [1, 3, 0, 0, 0, 0, 0, 0, 0, 3]
    b0, b1, b9 = bins[0], bins[1], bins[9]
    assert (b0.lo, b0.hi) == (0.0, pytest.approx(0.1))
    assert b0.mean_predicted == pytest.approx(0.05) and b0.observed == 0.0
    # 0.1 opens the second bin; 1.0 closes the last one.
    assert b1.mean_predicted == pytest.approx((0.15 + 0.12 + 0.1) / 3)
    assert b1.observed == pytest.approx(2 / 3)
    assert b9.mean_predicted == pytest.approx((0.95 + 1.0 + 0.99) / 3)
    assert b9.observed == pytest.approx(2 / 3)
    assert bins[4].mean_predicted is None and bins[4].observed is None


# ---------------------------------------------------------------------------------- positions
def test_position_buckets() -> None:
    positions = [0, 0, 2, 5, 70]
    errors = [1.0, -3.0, 2.0, -4.0, 10.0]
    waits = [2.0, 6.0, 4.0, 8.0, 20.0]
    rows = {r.label: r for r in cal.position_errors(positions, errors, waits)}
    assert list(rows) == ["0", "1-3", "4-15", "16-63", "64+"]
    head = rows["0"]
    assert head.count == 2
    # numpy's linear percentiles over |e| = [1, 3] and e = [-3, 1]
    assert head.abs_p50_s == pytest.approx(2.0)
    assert head.abs_p90_s == pytest.approx(2.8)
    assert head.signed_p50_s == pytest.approx(-1.0)
    assert head.signed_p90_s == pytest.approx(0.6)
    assert head.rel_abs_p50 == pytest.approx(0.5)
    assert (rows["1-3"].count, rows["1-3"].signed_p50_s) == (1, 2.0)
    assert (rows["4-15"].count, rows["4-15"].abs_p90_s, rows["4-15"].signed_p90_s) == (1, 4.0, -4.0)
    assert rows["16-63"].count == 0 and rows["16-63"].abs_p50_s is None
    assert (rows["64+"].count, rows["64+"].abs_p50_s) == (1, 10.0)
    custom = cal.position_errors([0, 1, 9], [1.0, 2.0, 3.0], buckets=((0, 1), (2, None)))
    assert [(r.label, r.count) for r in custom] == [("0-1", 2), ("2+", 1)]
    assert custom[0].rel_abs_p50 is None  # no waits given


# ---------------------------------------------------------------------------------- scoring
def test_score_truth_and_summary() -> None:
    truths = {
        "a": cal.Truth("a", deadline_s=10.0, first_token_s=8.0),  # met, predicted 2 s late
        "b": cal.Truth("b", deadline_s=10.0, first_token_s=10.0),  # met at the deadline
        "c": cal.Truth("c", deadline_s=10.0, first_token_s=12.0),  # missed, predicted 1 s early
        "d": cal.Truth("d", deadline_s=10.0, first_token_s=None),  # never served: a miss
    }
    pts = [
        point("a", 0.0, 0, 10.0, 0.9),
        point("b", 1.0, 2, 10.0, 0.5),
        point("c", 2.0, 5, 11.0, 0.4),
        point("d", 3.0, 9, 20.0, 0.0),
        point("zz", 3.0, 0, 1.0, 1.0),  # unknown request: dropped
    ]
    scored = cal.score(pts, truths)
    assert [s.point.request_id for s in scored] == ["a", "b", "c", "d"]
    assert [s.met for s in scored] == [True, True, False, False]
    assert [s.error_s for s in scored] == [2.0, 0.0, -1.0, None]
    assert [s.true_wait_s for s in scored] == [8.0, 9.0, 10.0, None]
    s = cal.summarize(scored)
    assert s["forecasts"] == 4 and s["met_share"] == 0.5
    # (0.1^2 + 0.5^2 + 0.4^2 + 0^2) / 4
    assert s["brier"] == pytest.approx((0.01 + 0.25 + 0.16) / 4)
    assert s["brier_base_rate"] == pytest.approx(0.25)
    assert s["abs_err_p50_s"] == pytest.approx(1.0)  # of |e| = 2, 0, 1
    assert s["signed_err_mean_s"] == pytest.approx(1 / 3)
    assert s["rel_abs_err_p50"] == pytest.approx(0.1)  # of 2/8, 0/9, 1/10
    assert sum(b["count"] for b in s["reliability"]) == 4
    assert [p["count"] for p in s["positions"]] == [1, 1, 1, 0, 0]


def test_thirds_by_forecast_time() -> None:
    truths = {f"r{k}": cal.Truth(f"r{k}", 100.0, 1.0) for k in range(7)}
    pts = [point(f"r{k}", float(6 - k), 0, 1.0, 1.0) for k in range(7)]  # made in reverse order
    first, mid, last = cal.thirds(cal.score(pts, truths))
    assert [len(first), len(mid), len(last)] == [2, 3, 2]
    assert [x.point.time_s for x in first] == [0.0, 1.0]
    assert [x.point.time_s for x in last] == [5.0, 6.0]


# ---------------------------------------------------------------------------------- perturbation
def test_step_scaled_perf() -> None:
    perf = PerfModel.from_names("vicuna-13b", "A100-80G")
    assert engine_perf(perf, 1.0) is perf  # scale 1: the very same model, bit-identical runs
    slow = engine_perf(perf, 1.3)
    assert isinstance(slow, StepScaledPerf)
    assert slow.decode_step_s(16, 8000) == pytest.approx(1.3 * perf.decode_step_s(16, 8000))
    assert slow.prefill_s(700) == pytest.approx(1.3 * perf.prefill_s(700))
    assert slow.load_s(warm=True) == perf.load_s(warm=True)  # loads are not engine steps
    assert slow.kv_capacity_tokens == perf.kv_capacity_tokens
    with pytest.raises(ValueError):
        StepScaledPerf.of(perf, 0.0)


# ---------------------------------------------------------------------------------- recorder
def _sim(record: bool) -> tuple[Simulation, cal.ForecastRecorder | None]:
    sc = load_scenario("wa")
    # 500 requests: enough for the estimator's profile cache to matter (a recorder that forecast
    # without putting it back changed this run's outcomes).
    tr = window(load_trace(DEFAULT_TRACE), max_requests=500, duration_s=None)
    wl = build_workload(sc, tr, 0)
    scaled, _ = scale_to_load(wl, estimate_capacity(sc.fleet, wl).requests_per_s, 3.0)
    sim = Simulation(sc.fleet, scaled, SimSettings("qlm"))
    rec = cal.ForecastRecorder() if record else None
    sim.qm.plan_observer = rec
    return sim, rec


def test_recorder_sees_every_request_and_changes_nothing() -> None:
    plain, _ = _sim(record=False)
    base = {r.req.request_id: (r.first_token_s, r.finish_s, r.outcome) for r in plain.run().records}
    sim, rec = _sim(record=True)
    res = sim.run()
    assert rec is not None
    assert {r.req.request_id: (r.first_token_s, r.finish_s, r.outcome) for r in res.records} == base
    served = {r.req.request_id for r in res.records if r.first_token_s is not None}
    planned = [p for p in rec.points if p.kind == "planned"]
    pulled = [p for p in rec.points if p.kind == "pulled"]
    assert {p.request_id for p in planned} == {p.request_id for p in pulled} == served
    assert len(planned) == len(pulled) == len(served)  # once each
    by_id = {r.req.request_id: r for r in res.records}
    for p in pulled:
        # A pull's forecast is made when the request enters the engine, before its first token.
        assert p.time_s <= (by_id[p.request_id].first_token_s or 0.0)
        assert p.first_token_s >= p.time_s and 0.0 <= p.p_meet <= 1.0
