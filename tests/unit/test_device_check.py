"""The device check (scripts/device-check.sh): its pieces here, a dry run on CPU with PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from qlm_backend.bench.device_check import gpu_key, model_figures

ROOT = Path(__file__).resolve().parents[2]


def test_cuda_device_names_map_to_the_modelled_gpus() -> None:
    assert gpu_key("NVIDIA H200") == "H200"
    assert gpu_key("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_key("NVIDIA A100-SXM4-80GB") == "A100-80G"
    assert gpu_key("NVIDIA L4") == "L4" and gpu_key("NVIDIA A10") == "A10"
    assert gpu_key("Tesla T4") is None


def test_the_step_models_figures_are_those_printed_beside_the_measurements() -> None:
    m = model_figures("H200", 14_000_000_000)
    assert m is not None
    # Batch 64 reads 64x the KV of batch 1 on top of the same weights: slower, far from 64x.
    assert m["decode_b1_ms"] < m["decode_b64_ms"] < 64 * m["decode_b1_ms"]
    assert m["pinned_to_device_s"] == pytest.approx(14e9 / 50e9)  # PCIe Gen5 in hardware.py
    assert m["disk_to_device_s"] > m["pinned_to_device_s"]
    assert model_figures(None, 1) is None


def test_a_dry_run_on_cpu_writes_every_figure() -> None:
    py = ROOT / ".venv-vllm" / "bin" / "python"  # the venv with PyTorch
    if not py.exists():
        if os.environ.get("QLM_REQUIRE_VLLM") == "1":
            pytest.fail("no .venv-vllm: `make setup-vllm` builds it")
        pytest.skip("no .venv-vllm with PyTorch (make setup-vllm)")
    out = ROOT / "results" / "device-check-dry-run.json"
    run = subprocess.run(
        ["scripts/device-check.sh", str(out), "--device", "cpu", "--small"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": str(py)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    m = doc["measured"]
    for key in ("decode_b1_ms", "decode_b64_ms", "prefill_2048_ms"):
        assert m[key] > 0, key
    assert m["bytes"] > 0 and m["pinned_to_device_s"] > 0 and m["disk_to_device_s"] > 0
    assert doc["shapes"] == "small" and doc["step_model"] is None
