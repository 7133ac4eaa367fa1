"""The evaluation protocol's sets and its report, on hand-made results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from qlm_backend.eval.protocol import SETS, code_digest, is_current, parse_seeds
from qlm_backend.eval.protocol_report import collect, headline, markdown


def test_dev_and_test_sets_share_no_seed_and_test_holds_out_wd2() -> None:
    dev, test = SETS["dev"], SETS["test"]
    assert set(dev.seeds).isdisjoint(test.seeds)
    assert dev.seeds == (0, 1, 2, 3, 4) and test.seeds == tuple(range(100, 110))
    assert test.loads == (0.8, 1.0, 1.5, 2.0, 3.0) and dev.loads == (1.5, 2.0)
    assert {c.name for c in test.cases} - {c.name for c in dev.cases} == {"wd2"}


def test_seed_lists_and_ranges_parse_and_bad_text_names_the_option() -> None:
    assert parse_seeds("100-102") == (100, 101, 102)
    assert parse_seeds("0,3,7") == (0, 3, 7)
    with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
        parse_seeds("a-b")


def _summary(w: float, interactive: float) -> dict:
    return {
        "weighted_attainment": w,
        "per_class": {
            "interactive": {
                "slo_attainment": interactive,
                "ttft_p50_s": 1.0,
                "ttft_p99_s": 5.0,
                "requests": 40,
            },
            "batch-2": {
                "slo_attainment": 1.0,
                "ttft_p50_s": 9.0,
                "ttft_p99_s": 9.0,
                "requests": 60,
            },
        },
        "goodput_rps": 1.0,
        "gpu_busy_share": 0.9,
        "lso": {"model_swaps_warm": 1, "model_swaps_cold": 1},
        "makespan_s": 3600.0,
        "full_plans": 10,
        "lp_plans": 5,
        "fallback_plans": 5,
        "plan_calls": 20,
    }


def _unit(seed: int, qlm: float, prio: float, bound: float) -> dict:
    return {
        "case": "wd",
        "seed": seed,
        "classes": ["interactive"],
        "max_requests": 100,
        "runs": [
            {
                "load": 2.0,
                "bound": {"weighted_attainment": bound, "per_class": {}},
                "policies": {
                    "qlm": _summary(qlm, qlm),
                    "priority": _summary(prio, prio),
                    "qlm-true-lengths": _summary(0.99, 0.99),  # not a baseline
                },
            }
        ],
    }


def test_headline_compares_qlm_with_the_best_baseline_and_the_bound() -> None:
    cells = collect([_unit(0, 0.8, 0.6, 1.0), _unit(1, 0.9, 0.7, 1.0)])
    h = headline(cells[("wd", 2.0)])
    assert h["best"] == "priority"  # qlm-true-lengths is no baseline
    assert h["margin"] == pytest.approx(0.2)
    assert h["closed"] == pytest.approx(0.2 / 0.35)  # (0.85 - 0.65) / (1.0 - 0.65)


def test_the_report_counts_the_cells_qlm_wins() -> None:
    text = markdown([_unit(0, 0.5, 0.6, 1.0)], SETS["test"], img=None)
    assert "qlm at or above the best baseline in 0 of 1 cells" in text
    assert "| wd | 2 | 1.000 |" in text
    # swaps per hour, LP / fallback / incremental shares of the planner's decisions
    assert "| 2 | 0.50 / 0.50 / 0.50 |" in text
    # interactive: 40% of requests x load 2 = 0.8 of capacity, attained 0.5 < 0.99
    assert "Top class at >= 0.99 wherever its own demand is <= 0.9 x capacity: 0 of 1" in text


def test_report_columns_keep_one_order_whatever_order_the_units_name_policies() -> None:
    unit = _unit(0, 0.9, 0.6, 1.0)
    pols = unit["runs"][0]["policies"]
    pols["edf"] = _summary(0.5, 0.5)
    reordered = _unit(0, 0.9, 0.6, 1.0)
    reordered["runs"][0]["policies"] = dict(reversed(list(pols.items())))
    header = [
        ln for ln in markdown([unit], SETS["test"], img=None).splitlines() if "| case |" in ln
    ]
    again = [
        ln for ln in markdown([reordered], SETS["test"], img=None).splitlines() if "| case |" in ln
    ]
    assert header == again
    # qlm, its variant, then the baselines by name
    assert "| qlm | qlm-true-lengths | edf | priority |" in header[0]


def _tree(root: Path) -> Path:
    for rel, text in (
        ("core/policy.py", "x = 1\n"),
        ("eval/runner.py", "y = 2\n"),
        ("eval/protocol.py", "z = 3\n"),
        ("data/traces/t.csv", "a,b\n"),
    ):
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


def test_code_digest_follows_result_sources_not_the_protocol_or_report(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    before = code_digest(root)
    (root / "eval" / "protocol.py").write_text("z = 4\n")  # orchestration: same figures
    (root / "core" / "__pycache__").mkdir()
    (root / "core" / "__pycache__" / "policy.pyc").write_bytes(b"\0")
    assert code_digest(root) == before
    (root / "core" / "policy.py").write_text("x = 2\n")  # a policy change: other figures
    changed = code_digest(root)
    assert changed != before
    (root / "data" / "traces" / "t.csv").write_text("a,c\n")  # other arrivals
    assert code_digest(root) not in (before, changed)


def test_a_unit_is_current_only_when_whole_and_written_by_the_same_code(tmp_path: Path) -> None:
    unit = tmp_path / "wa-code-s100.json"
    assert not is_current(unit, "abc")  # not written
    unit.write_text(json.dumps({"case": "wa-code", "code": "abc"}))
    assert is_current(unit, "abc")
    assert not is_current(unit, "def")  # other code: stale, runs again
    unit.write_text(json.dumps({"case": "wa-code"}))
    assert not is_current(unit, "abc")  # written before units carried a digest
    unit.write_text('{"case": "wa-co')
    assert not is_current(unit, "abc")  # cut short
