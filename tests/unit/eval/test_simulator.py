"""The simulator: every request ends exactly once under every policy, and a seed fixes the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlm_backend.core.policies import POLICY_NAMES
from qlm_backend.eval.cli import main
from qlm_backend.eval.load import estimate_capacity, scale_to_load
from qlm_backend.eval.scenario import build_workload, load_scenario
from qlm_backend.eval.simulator import SimSettings, simulate
from qlm_backend.eval.traces import DEFAULT_TRACE, load_trace, window


def workload(name: str, n: int, load: float, seed: int = 0):
    sc = load_scenario(name)
    tr = window(load_trace(DEFAULT_TRACE), max_requests=n, duration_s=None)
    wl = build_workload(sc, tr, seed)
    cap = estimate_capacity(sc.fleet, wl)
    scaled, _ = scale_to_load(wl, cap.requests_per_s, load)
    return sc, scaled


@pytest.mark.parametrize("scenario", ["wa", "wb", "wc"])
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_request_ends_exactly_once(scenario: str, policy: str) -> None:
    sc, wl = workload(scenario, 120, 3.0)
    res = simulate(sc.fleet, wl, SimSettings(policy))
    ids = [r.req.request_id for r in res.records]
    assert sorted(ids) == sorted(w.request_id for w in wl)  # each once, none lost
    assert all(r.outcome is not None for r in res.records)
    assert not {
        k for k in res.counters if k in ("stalled", "pull_to_wrong_model", "swap_on_busy_engine")
    }
    for r in res.records:
        if r.outcome == "finished":
            assert r.tokens == r.req.output_tokens  # evictions and resumes lose or add no token
            assert r.first_token_s is not None and r.req.arrival_s <= r.first_token_s <= r.finish_s
        else:
            assert r.outcome == "rejected" and r.req.slo_class in {
                c.name for c in sc.fleet.slo_classes if c.sheddable
            }


@pytest.mark.parametrize("policy", ["qlm", "fcfs", "shepherd"])
def test_same_seed_same_run(policy: str) -> None:
    def fingerprint(seed: int):
        sc, wl = workload("wb", 100, 2.0, seed)
        res = simulate(sc.fleet, wl, SimSettings(policy))
        return sorted(
            (r.req.request_id, r.req.model, r.first_token_s, r.finish_s, r.outcome)
            for r in res.records
        )

    a, b = fingerprint(3), fingerprint(3)
    assert a == b
    assert fingerprint(4) != a


def test_cli_writes_results_in_the_documented_shape(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(
        [
            "--scenario",
            "wa",
            "--load",
            "1,2",
            "--max-requests",
            "60",
            "--policies",
            "qlm,fcfs,edf,qlm-true-lengths",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["load"] for r in doc["runs"]] == [1.0, 2.0]
    run = doc["runs"][1]
    q = run["policies"]["qlm"]
    for key in (
        "slo_attainment",
        "throughput_rps",
        "output_tokens_per_s",
        "per_class",
        "lso",
        "planner_ms_p50",
        "planner_ms_p99",
    ):
        assert key in q
    assert set(q["per_class"]["interactive"]) >= {"slo_attainment", "ttft_p50_s", "ttft_p99_s"}
    for png in ("attainment_vs_load.png", "ttft_cdf_load2.png", "timeline_load2.png"):
        assert (out / png).stat().st_size > 0
    text = capsys.readouterr().out
    assert text.rstrip().splitlines()[-2].startswith("ratios  qlm/fcfs")


def test_cli_reports_a_malformed_trace(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,input_tokens,output_tokens\n0,12,3\n1,12,three\n")
    assert main(["--trace", str(bad), "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "'output_tokens'" in err


def test_a_simulation_decides_the_same_however_slow_the_machine() -> None:
    # The planner's budget counts predicted work in the simulator, not wall seconds: a timer that
    # says every call took a second (each planner step "spends" far over its 50 ms budget, which
    # on the wall clock sends every decision to the fallback) changes no decision and no outcome.
    sc, wl = workload("wb", 150, 2.0)
    ticks = iter(range(10**9))

    def slow_timer() -> float:
        return next(ticks) * 1.0

    fast = simulate(sc.fleet, wl, SimSettings("qlm"))
    slow = simulate(sc.fleet, wl, SimSettings("qlm", timer=slow_timer))
    key = [(r.req.request_id, r.outcome, r.first_token_s, r.finish_s) for r in fast.records]
    assert key == [(r.req.request_id, r.outcome, r.first_token_s, r.finish_s) for r in slow.records]
    assert fast.counters == slow.counters


def test_the_simulator_carries_out_actions_through_the_routers_executor() -> None:
    # wb swaps models and the qlm policy evicts: the executor's counts are the run's LSO counts.
    from qlm_backend.eval.simulator import Simulation
    from qlm_backend.router.executor import Executor

    sc, wl = workload("wb", 150, 2.0)
    sim = Simulation(sc.fleet, wl, SimSettings("qlm"))
    res = sim.run()
    assert type(sim.ex) is Executor
    c = sim.ex.counters
    finished = sum(r.outcome == "finished" for r in res.records)
    assert c["attained"] + c["missed"] == finished > 0
    assert c["rejected"] == sum(r.outcome == "rejected" for r in res.records)
    met = sum(
        r.outcome == "finished" and r.first_token_s is not None and r.first_token_s <= r.deadline_s
        for r in res.records
    )
    assert c["attained"] == met
    assert c["pull"] >= len(wl) - c["rejected"]
    assert c["swap_model_warm"] + c["swap_model_cold"] == res.core_counters["swaps"] > 0
    assert res.counters["pull"] == c["pull"]  # the simulation reports the executor's counts
