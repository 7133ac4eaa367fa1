"""Scenario files: the shipped ones validate; a bad key is named in the error."""

from __future__ import annotations

import copy
import json

import pytest

from qlm_backend.eval.load import estimate_capacity, scale_to_load
from qlm_backend.eval.scenario import (
    SCENARIOS_DIR,
    SHIPPED,
    ScenarioError,
    build_workload,
    load_scenario,
    parse_scenario,
)
from qlm_backend.eval.traces import Trace, TraceRecord


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenarios_validate(name: str) -> None:
    sc = load_scenario(name)
    assert sc.name == name and sc.fleet.instances


def _wa() -> dict:
    return json.loads((SCENARIOS_DIR / "wa.json").read_text())


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d.update(modles={"x": 1}), "modles"),
        (lambda d: d.update(models={"gpt-5": 1.0}), "models.gpt-5"),
        (lambda d: d.update(classes={"urgent": 1.0}), "classes.urgent"),
        (lambda d: d["classes"].update(interactive=-1), "classes.interactive"),
        (
            lambda d: d.update(
                mega_prompts={"share": 0.1, "min_tokens": 5, "max_tokens": 9, "size": 1}
            ),
            "mega_prompts.size",
        ),
        (lambda d: d.update(trace_window={"max_request": 5}), "trace_window.max_request"),
        (lambda d: d.update(class_run_mean=0.5), "class_run_mean"),
        (lambda d: d.pop("fleet"), "fleet"),
        (lambda d: d["fleet"]["instances"][0].update(gpus="A10"), "fleet"),
    ],
)
def test_bad_keys_are_named(mutate, key: str) -> None:
    d = copy.deepcopy(_wa())
    mutate(d)
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(d, "test.json")
    assert repr(key) in str(ei.value)


def test_unknown_scenario_name() -> None:
    with pytest.raises(ScenarioError, match="not a shipped scenario"):
        load_scenario("wz")


def _trace(n: int) -> Trace:
    recs = tuple(TraceRecord(float(k), 100 + k, 20 + k) for k in range(n))
    return Trace("mem", "csv", recs)


def test_assignment_is_seeded_and_clipped_to_the_context() -> None:
    sc = load_scenario("wc")
    a = build_workload(sc, _trace(400), seed=1)
    b = build_workload(sc, _trace(400), seed=1)
    c = build_workload(sc, _trace(400), seed=2)
    assert a == b and a != c
    assert {w.slo_class for w in a} == {"interactive", "batch-1", "batch-2"}
    megas = [w for w in a if w.mega]
    assert 5 <= len(megas) <= 40  # 5% of 400
    for w in a:
        assert w.prompt_tokens + w.output_tokens <= 8192 and w.output_tokens <= w.max_tokens


def test_load_scaling_hits_the_requested_rate() -> None:
    sc = load_scenario("wa")
    wl = build_workload(sc, _trace(200), seed=0)
    cap = estimate_capacity(sc.fleet, wl)
    assert cap.requests_per_s > 0
    scaled, _ = scale_to_load(wl, cap.requests_per_s, 2.0)
    rate = (len(scaled) - 1) / (scaled[-1].arrival_s - scaled[0].arrival_s)
    assert rate == pytest.approx(2.0 * cap.requests_per_s)
