"""Locust, headless for a few seconds against the session server: nothing lost, the report written."""

from __future__ import annotations

import json

import pytest

from qlm_backend.eval.traces import DEFAULT_TRACE
from qlm_backend.loadtest_runner import main

pytestmark = pytest.mark.timeout(120)


def _report(d) -> dict:
    # Ours, and Locust's own (--csv / --html).
    for name in ("attainment.json", "attainment.csv", "attainment.png", "locust_stats.csv",
                 "locust.html"):  # fmt: skip
        assert (d / name).stat().st_size > 0, name
    return json.loads((d / "attainment.json").read_text())


def test_weighted_slo_class_users_over_grpc_and_http_lose_nothing(triton, tmp_path):
    rc = main(["--grpc-url", triton.grpc_url, "--http-url", triton.http_url,
               "--router", "qlm-test", "--time-scale", "0.1", "--run-time-s", "5",
               "--users", "6", "--spawn-rate", "6", "--max-tokens", "16",
               "--report-dir", str(tmp_path)])  # fmt: skip
    rep = _report(tmp_path)
    assert rc == 0, rep
    t = rep["totals"]
    assert t["sent"] > 0 and t["lost"] == 0 and t["abandoned"] == 0, t
    assert t["completed"] + t["errors"] == t["sent"]
    assert "interactive" in rep["classes"]


def test_trace_replay_sends_every_request_and_loses_none(triton, tmp_path):
    rc = main(["--grpc-url", triton.grpc_url, "--http-url", triton.http_url,
               "--router", "qlm-test", "--time-scale", "0.1", "--trace", str(DEFAULT_TRACE),
               "--trace-speedup", "20", "--trace-max-requests", "30", "--max-tokens", "32",
               "--report-dir", str(tmp_path)])  # fmt: skip
    rep = _report(tmp_path)
    assert rc == 0, rep
    assert rep["totals"]["sent"] == 30 and rep["totals"]["lost"] == 0
