"""The load sweep over the real vLLM engine: per trace slice, its measured capacity, then replays
at light load, near capacity and in overload. Recorded as JSON so that the calibration can refit
and the fidelity table can be recomputed without rerunning the real engine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qlm_backend.bench.real_engine import (
    ROOT,
    Arrival,
    Outcome,
    RealEngine,
    load_slice,
    rescale,
    run_sim,
    trace_path,
)
from qlm_backend.engine.perf import PerfModel
from qlm_backend.stats import percentile

METRICS = ("ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "throughput_tok_s", "queue_mean_s")
# Requests of a slice all sent within this many seconds: the capacity probe.
PROBE_SPAN_S = 0.5


@dataclass(frozen=True)
class SweepSpec:
    slices: tuple[str, ...] = ("conv", "code")
    start: int = 0
    requests: int = 120
    loads: tuple[float, ...] = (0.25, 0.9, 1.5)
    repeats: int = 2
    token_scale: float = 1.0
    max_prompt: int = 7000
    max_output: int = 1000
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        """From a recording's "spec" (JSON has lists where the spec has tuples)."""
        return cls(**{**d, "slices": tuple(d["slices"]), "loads": tuple(d["loads"])})


def summarize(outs: Sequence[Outcome]) -> dict[str, float]:
    """TTFT p50/p99, mean time per output token after the first, completed tokens per second of
    the run (first arrival to last token: below the offered load in overload), mean queueing."""
    ttft = [o.ttft_s for o in outs]
    tpot = [(o.e2e_s - o.ttft_s) / (o.output_tokens - 1) for o in outs if o.output_tokens > 1]
    start = min(o.arrival_s for o in outs)
    end = max(o.arrival_s + o.e2e_s for o in outs)
    p50, p99 = percentile(ttft, 50), percentile(ttft, 99)
    assert p50 is not None and p99 is not None  # outs is not empty: min() above would raise
    return {
        "ttft_p50_s": p50,
        "ttft_p99_s": p99,
        "tpot_mean_s": statistics.fmean(tpot),
        "throughput_tok_s": sum(o.output_tokens for o in outs) / (end - start),
        "queue_mean_s": statistics.fmean(o.queue_s for o in outs),
    }


def median_summary(runs: Sequence[Sequence[Outcome]]) -> dict[str, float]:
    per = [summarize(r) for r in runs]
    return {k: statistics.median(x[k] for x in per) for k in per[0]}


def record(
    spec: SweepSpec, engine: RealEngine, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Runs the sweep on the real engine; returns the JSON-able record."""
    cells: list[dict[str, Any]] = []
    for kind in spec.slices:
        base = load_slice(
            trace_path(kind),
            spec.start,
            spec.requests,
            1.0,
            spec.token_scale,
            spec.max_prompt,
            spec.max_output,
        )
        probe_arr = rescale(base, (len(base) - 1) / PROBE_SPAN_S)
        probe = engine.replay(probe_arr)
        makespan = max(o.arrival_s + o.e2e_s for o in probe)
        capacity_rps = len(probe) / makespan
        progress(f"{kind}: capacity {capacity_rps:.2f} req/s ({makespan:.1f} s for {len(probe)})")
        cells.append(make_cell(kind, spec, -1.0, capacity_rps, probe_arr, [probe]))
        arrs = {load: rescale(base, load * capacity_rps) for load in spec.loads}
        runs: dict[float, list[list[Outcome]]] = {load: [] for load in spec.loads}
        # Round robin over the loads: this VM's speed drifts by tens of percent over minutes
        # (seen at light load: one cell's three back-to-back replays slowed 1.16x -> 1.57x against
        # the model), so each cell gets replays from different times instead of one stretch.
        for rep in range(spec.repeats):
            for load in spec.loads:
                runs[load].append(engine.replay(arrs[load]))
                s = summarize(runs[load][-1])
                progress(
                    f"{kind} x{load:g} replay {rep + 1}/{spec.repeats}: "
                    + " ".join(f"{k}={v:.4f}" for k, v in s.items())
                )
        for load in spec.loads:
            cells.append(make_cell(kind, spec, load, capacity_rps, arrs[load], runs[load]))
    return {
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "engine_load_s": engine.load_s,
        "spec": asdict(spec),
        "cells": cells,
    }


def make_cell(
    kind: str,
    spec: SweepSpec,
    load: float,
    capacity_rps: float,
    arrivals: list[Arrival],
    runs: list[list[Outcome]],
) -> dict[str, Any]:
    return {
        "slice": kind,
        "rows": [spec.start, spec.start + spec.requests],
        "load": load,  # -1: the capacity probe
        "capacity_rps": capacity_rps,
        "arrivals": [asdict(a) for a in arrivals],
        "replays": [[asdict(o) for o in r] for r in runs],
    }


def cell_arrivals(cell: dict[str, Any]) -> list[Arrival]:
    return [Arrival(**a) for a in cell["arrivals"]]


def cell_replays(cell: dict[str, Any]) -> list[list[Outcome]]:
    return [[Outcome(**o) for o in r] for r in cell["replays"]]


def sim_replays(
    perf: PerfModel, runs: Sequence[Sequence[Outcome]], spec: SweepSpec
) -> list[list[Outcome]]:
    """Each real replay's requests through the simulated engine, as the engine got them: its
    arrival times at the glue (a stalled client sends some late, in bunches) and prompt lengths."""
    out = []
    for run in runs:
        arr = [Arrival(o.arrival_s, o.prompt_tokens, o.output_tokens) for o in run]
        out.append(run_sim(perf, arr, spec.max_num_seqs, spec.max_num_batched_tokens))
    return out


# --- command-line options shared by `qlm-bench fidelity` and `qlm-bench calibrate` --------------
def add_engine_args(ap: argparse.ArgumentParser, start: int) -> None:
    ap.add_argument("--slices", default="conv,code", help="trace slices of the sweep")
    ap.add_argument("--start", type=int, default=start, help="first trace row of each slice")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--loads", default="0.25,0.9,1.5", help="x the measured capacity")
    ap.add_argument("--token-scale", type=float, default=1.0)
    ap.add_argument("--max-prompt", type=int, default=7000)
    ap.add_argument("--max-output", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv-vllm")
    ap.add_argument("--model-dir", type=Path, default=ROOT / ".qlm" / "models" / "tiny-llama")


def spec_from_args(a: argparse.Namespace, sweep: bool) -> SweepSpec:
    return SweepSpec(
        slices=tuple(a.slices.split(",")) if sweep else (a.trace,),
        start=a.start,
        requests=a.requests,
        loads=tuple(float(x) for x in a.loads.split(",")) if sweep else (),
        repeats=a.repeats,
        token_scale=a.token_scale,
        max_prompt=a.max_prompt,
        max_output=a.max_output,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
    )


def check_prereqs(venv: Path, model_dir: Path) -> str | None:
    if not (venv / "bin" / "python").exists():
        return f"no vLLM venv at {venv}: run scripts/setup-vllm.sh"
    if not (model_dir / "config.json").exists():
        return f"no tiny model at {model_dir}: run qlm-build-tiny-model"
    return None
