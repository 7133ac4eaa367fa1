"""`qlm-bench fidelity`: the simulated engine checked against the real vLLM engine on this machine.

The same arrivals (a slice of a shipped Azure LLM trace, time-compressed) are replayed through a
real tritonserver running the real vLLM engine (tiny-llama__cpu-0) and through engine/sim.py's
SimEngine with the measured CPU profile (engine/profiles/cpu-2core.json). Prints TTFT p50/p99,
TPOT, throughput and queueing delay side by side with their sim/real ratios (goal: within +-25%)
and the real engine's spread over replays, and writes the full numbers to JSON.

`--sweep` runs, on the conversation and code slices, light load, ~0.9x the real engine's measured
capacity and an overload (1.5x), and plots both engines' TTFT over time in the overload cells.
Defaults use trace rows 1000-1120, which the calibration (rows 0-120) never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qlm_backend.bench.real_engine import ROOT, RealEngine, load_slice, trace_path
from qlm_backend.bench.sweep import (
    METRICS,
    SweepSpec,
    add_engine_args,
    cell_arrivals,
    cell_replays,
    check_prereqs,
    make_cell,
    median_summary,
    record,
    sim_replays,
    spec_from_args,
    summarize,
)
from qlm_backend.engine.perf import PerfModel

TOLERANCE = 0.25


def sim_perf() -> PerfModel:
    return PerfModel.from_names("tiny-llama", "cpu-2core")


def compare_cell(cell: dict[str, Any], spec: SweepSpec, perf: PerfModel) -> dict[str, Any]:
    """Sim vs real on one recorded cell: each replay simulated as the engine got it, the medians
    over replays compared."""
    arrivals = cell_arrivals(cell)
    runs = cell_replays(cell)
    sims = sim_replays(perf, runs, spec)
    real, sim = median_summary(runs), median_summary(sims)
    per = [summarize(r) for r in runs]
    return {
        "slice": cell["slice"],
        "load": cell["load"],
        "rate_req_s": (len(arrivals) - 1) / (arrivals[-1].t_s or 1.0),
        "real": real,
        "real_lo": {k: min(x[k] for x in per) for k in real},
        "real_hi": {k: max(x[k] for x in per) for k in real},
        "sim": sim,
        "ratios": {k: sim[k] / real[k] if real[k] else float("nan") for k in real},
        "sim_requests": [o.__dict__ for o in sims[0]],
    }


def print_table(rows: list[dict[str, Any]]) -> bool:
    print(
        f"{'slice':<6}{'load':>6}{'req/s':>7}  {'metric':<18}{'real':>10}{'real range':>22}"
        f"{'sim':>10}{'sim/real':>9}"
    )
    ok = True
    for r in rows:
        for k in METRICS:
            ratio = r["ratios"][k]
            bad = not (1 - TOLERANCE <= ratio <= 1 + TOLERANCE)
            ok &= not bad
            rng = f"{r['real_lo'][k]:.4f}-{r['real_hi'][k]:.4f}"
            load = f"{r['load']:.2f}" if r["load"] > 0 else "-"  # a single replay set: no sweep
            print(
                f"{r['slice']:<6}{load:>6}{r['rate_req_s']:>7.2f}  {k:<18}"
                f"{r['real'][k]:>10.4f}{rng:>22}{r['sim'][k]:>10.4f}{ratio:>9.2f}"
                + ("  <-- outside +-25%" if bad else "")
            )
    return ok


def plot_overload(cells: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    """Both engines' TTFT over time in the overload cells (`rows` compare `cells`, in order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    over = [(c, r) for c, r in zip(cells, rows, strict=True) if r["load"] > 1]
    if not over:
        return
    fig, axes = plt.subplots(1, len(over), figsize=(6 * len(over), 4), squeeze=False)
    for ax, (cell, row) in zip(axes[0], over, strict=True):
        for i, run in enumerate(cell_replays(cell)):
            ax.plot(
                [o.arrival_s for o in run],
                [o.ttft_s for o in run],
                ".",
                alpha=0.6,
                label=f"real vLLM replay {i + 1}",
            )
        sim = row["sim_requests"]
        ax.plot(
            [o["arrival_s"] for o in sim],
            [o["ttft_s"] for o in sim],
            "k-",
            lw=1,
            label="simulated (replay 1's arrivals)",
        )
        ax.set_title(f"{row['slice']} slice at {row['load']:g}x capacity")
        ax.set_xlabel("arrival (s)")
        ax.set_ylabel("TTFT (s)")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qlm-bench fidelity", description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="light / 0.9x / 1.5x on both slices")
    ap.add_argument("--trace", choices=("conv", "code"), default="conv", help="without --sweep")
    ap.add_argument("--rate", type=float, default=6.0, help="without --sweep: requests/s")
    ap.add_argument("--repeats", type=int, default=3, help="replays through the real engine")
    ap.add_argument(
        "--runs", type=Path, help="a recorded sweep (JSON: this bench's --out or calibrate's)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "fidelity.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "results" / "fidelity-overload.png")
    add_engine_args(ap, start=1000)
    a = ap.parse_args(argv)
    spec = spec_from_args(a, a.sweep)

    if a.runs is not None:
        doc = json.loads(a.runs.read_text())
        rec = doc.get("record", doc)  # this bench's own output, or calibrate's recording
        spec = SweepSpec.from_dict(rec["spec"])
    else:
        err = check_prereqs(a.venv, a.model_dir)
        if err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        with RealEngine(
            a.venv, a.model_dir, spec.max_num_seqs, spec.max_num_batched_tokens
        ) as engine:
            print(f"real engine up in {engine.load_s:.1f} s", flush=True)
            if a.sweep:
                rec = record(spec, engine, progress=lambda s: print(s, flush=True))
            else:
                arr = load_slice(
                    trace_path(a.trace),
                    a.start,
                    a.requests,
                    a.rate,
                    a.token_scale,
                    a.max_prompt,
                    a.max_output,
                )
                runs = [engine.replay(arr) for _ in range(a.repeats)]
                # One cell, load 0: a rate given in requests/s, not a share of capacity.
                cell = make_cell(a.trace, spec, 0.0, 0.0, arr, runs)
                rec = {"spec": asdict(spec), "engine_load_s": engine.load_s, "cells": [cell]}
    perf = sim_perf()
    cells = [c for c in rec["cells"] if c["load"] >= 0]  # the capacity probes are not compared
    rows = [compare_cell(c, spec, perf) for c in cells]
    print("real vLLM timed by the engine (its trace; median of the replays, their range shown);")
    print("simulated: SimEngine with engine/profiles/cpu-2core.json")
    ok = print_table(rows)
    worst = max(rows, key=lambda r: max(abs(x - 1) for x in r["ratios"].values()))
    wk = max(worst["ratios"], key=lambda k: abs(worst["ratios"][k] - 1))
    print(
        f"fidelity: {len(rows)} cells x {len(METRICS)} metrics, "
        f"{'all' if ok else 'NOT all'} within +-25%; worst {worst['slice']} x{worst['load']:g} "
        f"{wk} sim/real {worst['ratios'][wk]:.2f}"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"record": rec, "rows": rows, "within_25pct": ok}) + "\n")
    print(f"wrote {a.out}")
    if a.sweep or a.runs is not None:
        plot_overload(cells, rows, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
