"""Measured capacity: the bisection, the bounded-queue verdict, the cache, and the cli's report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qlm_backend.eval.load as load
from qlm_backend.eval.cli import main
from qlm_backend.eval.load import (
    CapacityError,
    OfferedCapacity,
    bisect_capacity,
    cached_measured_capacity,
    estimate_capacity,
    measure_capacity,
)
from qlm_backend.eval.scenario import build_workload, load_scenario, parse_scenario
from qlm_backend.eval.traces import Trace, TraceRecord


@pytest.mark.parametrize("threshold", [0.37, 3.7, 4.0, 100.0])
@pytest.mark.parametrize("start", [1.0, 4.0, 20.0])
def test_bisection_finds_a_known_threshold(threshold: float, start: float) -> None:
    asked: list[float] = []

    def bounded(rate: float) -> bool:
        asked.append(rate)
        return rate <= threshold

    found = bisect_capacity(bounded, start, rel_tol=0.01)
    assert threshold / 1.01 <= found <= threshold
    assert bounded(found)
    assert len(asked) < 30
    assert bisect_capacity(lambda r: r <= threshold, start, rel_tol=0.01) == found  # deterministic


def test_bisection_gives_up_with_a_clear_error() -> None:
    with pytest.raises(CapacityError, match="grows even at"):
        bisect_capacity(lambda r: False, 1.0, max_steps=4)
    with pytest.raises(CapacityError, match="stays bounded up to"):
        bisect_capacity(lambda r: True, 1.0, max_steps=4)


def _steady_workload(n: int = 150):
    """Regular arrivals of identical requests on wa's fleet: a queue with no burst to hide in."""
    sc = load_scenario("wa")
    recs = tuple(TraceRecord(float(k), 800, 200) for k in range(n))
    return sc, build_workload(sc, Trace("mem", "csv", recs), seed=0)


def test_measured_capacity_separates_bounded_from_growing_runs() -> None:
    sc, wl = _steady_workload()
    fluid = estimate_capacity(sc.fleet, wl).requests_per_s
    m = measure_capacity(sc.fleet, wl, fluid)
    assert 0.3 * fluid < m.requests_per_s < 3 * fluid
    ok = [p.rate_rps for p in m.probes if p.bounded]
    grows = [p.rate_rps for p in m.probes if not p.bounded]
    assert ok and grows and max(ok) == m.requests_per_s < min(grows)
    assert min(grows) / m.requests_per_s <= 1 + load.REL_TOL + 1e-9
    # the verdict of a growing run: waits grew by more than the limit
    worst = max(m.probes, key=lambda p: p.rate_rps)
    assert worst.wait_last_s - worst.wait_middle_s > worst.allowed_growth_s
    assert measure_capacity(sc.fleet, wl, fluid).requests_per_s == m.requests_per_s


def test_too_few_requests_for_a_measurement() -> None:
    sc, wl = _steady_workload(10)
    with pytest.raises(CapacityError, match="at least"):
        measure_capacity(sc.fleet, wl, 1.0)


class _Counting:
    def __init__(self, real) -> None:
        self.real = real
        self.calls = 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.real(*a, **kw)


def test_cache_is_hit_the_second_time_and_a_changed_scenario_misses(
    tmp_path: Path, monkeypatch
) -> None:
    sc, wl = _steady_workload()
    cache = tmp_path / "cap.json"
    sim = _Counting(load.simulate)
    monkeypatch.setattr(load, "simulate", sim)
    kw = {"seed": 0, "window": (150, None), "start_rps": 5.0, "cache_path": cache}
    first = cached_measured_capacity(sc, wl, **kw)
    assert first is not None and not first.cached and sim.calls == len(first.probes) > 0

    def boom(*a, **k):
        raise AssertionError("the simulator ran on a cache hit")

    monkeypatch.setattr(load, "simulate", boom)
    second = cached_measured_capacity(sc, wl, **kw)
    assert second is not None and second.cached
    assert second.requests_per_s == first.requests_per_s and second.probes == first.probes

    # the same fleet with another max_in_flight is another scenario: a miss
    raw = json.loads(Path(sc.source).read_text())
    raw["fleet"]["instances"][0]["max_in_flight"] = 8
    changed = parse_scenario(raw, "changed.json")
    assert changed.content_sha256 != sc.content_sha256
    assert (
        cached_measured_capacity(
            changed, wl, **{**kw, "cache_path": cache, "start_rps": 5.0, "lookup_only": True}
        )
        is None
    )
    monkeypatch.setattr(load, "simulate", sim)
    before = sim.calls
    third = cached_measured_capacity(changed, wl, **kw)
    assert third is not None and not third.cached and sim.calls > before
    # another seed or window is another key as well
    assert cached_measured_capacity(sc, wl, **{**kw, "seed": 1}, lookup_only=True) is None
    assert (
        cached_measured_capacity(sc, wl, **{**kw, "window": (100, None)}, lookup_only=True) is None
    )
    # both entries are kept
    assert len(json.loads(cache.read_text())["entries"]) == 2


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"version": 1, "entries": []}', '{"version": 99, "entries": {}}']
)
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path, text: str) -> None:
    sc, wl = _steady_workload()
    cache = tmp_path / "cap.json"
    cache.write_text(text)
    m = cached_measured_capacity(
        sc, wl, seed=0, window=(150, None), start_rps=5.0, cache_path=cache
    )
    assert m is not None and not m.cached
    doc = json.loads(cache.read_text())
    assert doc["version"] == 1 and len(doc["entries"]) == 1


def test_a_bad_entry_is_a_miss(tmp_path: Path) -> None:
    sc, wl = _steady_workload()
    cache = tmp_path / "cap.json"
    kw = {"seed": 0, "window": (150, None), "start_rps": 5.0, "cache_path": cache}
    cached_measured_capacity(sc, wl, **kw)
    doc = json.loads(cache.read_text())
    (key,) = doc["entries"]
    doc["entries"][key]["requests_per_s"] = -1
    cache.write_text(json.dumps(doc))
    assert cached_measured_capacity(sc, wl, **kw, lookup_only=True) is None


def test_offered_capacity_reports_both_figures() -> None:
    cap = OfferedCapacity("fluid", 2.0, 2.0)
    j = cap.to_json()
    assert j["basis"] == "fluid" and j["fluid_rps"] == 2.0 and j["measured_rps"] is None
    assert cap.describe().startswith("capacity for --load: fluid 2.000")


def test_cli_loads_against_the_measured_capacity_and_caches_it(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cap.json"
    base = [
        "--scenario",
        "wa",
        "--max-requests",
        "60",
        "--policies",
        "fcfs",
        "--no-plots",
        "--capacity-cache",
        str(cache),
    ]
    assert main([*base, "--out", str(tmp_path / "m")]) == 0
    captured = capsys.readouterr()
    assert "capacity: FCFS at" in captured.err  # the progress lines
    assert "capacity for --load: measured" in captured.out
    doc = json.loads((tmp_path / "m" / "results.json").read_text())
    c = doc["capacity"]
    assert c["basis"] == "measured" and c["measured_rps"] > 0 and c["fluid_rps"] > 0
    assert doc["capacity_rps"] == c["measured_rps"] and not c["measure_cached"]

    assert main([*base, "--out", str(tmp_path / "f"), "--capacity", "fluid"]) == 0
    doc = json.loads((tmp_path / "f" / "results.json").read_text())
    c2 = doc["capacity"]
    assert c2["basis"] == "fluid" and doc["capacity_rps"] == c2["fluid_rps"]
    assert c2["measured_rps"] == c["measured_rps"] and c2["measure_cached"]  # from the cache
    assert "FCFS at" not in capsys.readouterr().err  # nothing measured again
