"""qlm-bench planner: planner decision time vs queued requests x instances, LP path and fallback
separately (p50/p99), and how often the automatic choice took the LP.

Each cell builds a QueueManager over a mixed fleet (A10 / A100 / H100 instances, 3 models), queues
N requests of mixed models and classes with spread deadlines, and times GlobalPlanner.plan(), the
whole decision (problem build, LP or heuristic, ordering and forecasting of every queue), on one
core. Prints a table, one line per goal (the LP path at 10k queued x 256 instances, any path the
automatic choice takes at 100k x 256) and writes JSON (default results/planner.json).

Before timing a path: one untimed plan (the first of a process fills the estimator's caches and
imports the solver), then one full collection of the heap: otherwise the collector's first full
pass over the requests the cell just created (~0.1 s at 100k) landed inside whichever decision
happened to trigger it. Collector time inside timed decisions is still measured (gc_ms_max).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from qlm_backend.core.api import ManagerConfig, QueueManager, parse_fleet
from qlm_backend.core.policies.qlm.planner import GlobalPlanner, SolverMode
from qlm_backend.stats import percentile

MODELS = ("mistral-7b", "llama-3-8b", "llama-2-13b")
CLASSES = ("interactive", "batch-1", "batch-2")
FULL_QUEUED = (100, 1_000, 10_000, 100_000)
FULL_INSTANCES = (4, 64, 256)
MODES: tuple[SolverMode, ...] = ("auto", "lp", "fallback")
# (queued, instances, mode, p99 target in ms, what it measures)
GOALS = (
    (10_000, 256, "lp", 20.0, "LP path"),
    (100_000, 256, "auto", 50.0, "any path (automatic choice)"),
)


def make_fleet(n: int) -> Any:
    gpus = ("A10", "A100-80G", "H100")
    insts = []
    for k in range(n):
        gpu = gpus[k % 3]
        models = ["mistral-7b", "llama-3-8b"] if gpu == "A10" else list(MODELS)
        insts.append(
            {
                "instance_id": f"{gpu.lower()}-{k}",
                "gpu": gpu,
                "models_allowed": models,
                "initial_model": models[k % len(models)],
                "max_in_flight": 32,
                "host": f"host-{k // 4}",
            }
        )
    return parse_fleet({"instances": insts})


def make_manager(queued: int, instances: int, seed: int = 1) -> QueueManager:
    qm = QueueManager(make_fleet(instances), "qlm", ManagerConfig())
    rng = random.Random(seed)
    for j in range(queued):
        cls = CLASSES[rng.randrange(3)]
        arrival = -rng.uniform(0, 30.0)
        qm.add_request(
            qm.make_request(
                f"r{j}", MODELS[rng.randrange(3)], cls, arrival, rng.randint(50, 2000), 1024
            ),
            0.0,
        )
    return qm


class _GcClock:
    """Collector time spent while it is running (gc.callbacks), to tell collector pauses apart
    from the planner's own work."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t0


def time_cell(qm: QueueManager, mode: SolverMode, reps: int, cap_s: float) -> dict[str, Any]:
    planner = GlobalPlanner(solver=mode)
    ctx = qm._context("bench")
    times: list[float] = []
    gc_s: list[float] = []
    paths: dict[str, int] = {}
    groups = 0
    planner.plan(ctx, 0.0)  # untimed: the first plan fills caches (profiles, imports)
    gc.collect()  # see the module docstring
    clock = _GcClock()
    gc.callbacks.append(clock)
    try:
        t_cell = time.perf_counter()
        for _ in range(reps):
            g0 = clock.total
            t0 = time.perf_counter()
            _, d, _ = planner.plan(ctx, 0.0)
            times.append(time.perf_counter() - t0)
            gc_s.append(clock.total - g0)
            paths[d.path] = paths.get(d.path, 0) + 1
            groups = d.groups
            if time.perf_counter() - t_cell > cap_s:
                break
    finally:
        gc.callbacks.remove(clock)
    p50, p99 = percentile(times, 50), percentile(times, 99)
    assert p50 is not None and p99 is not None  # the loop times at least one plan
    return {
        "p50_ms": p50 * 1e3,
        "p99_ms": p99 * 1e3,
        "runs": len(times),
        "paths": paths,
        "groups": groups,
        "gc_ms_max": max(gc_s) * 1e3,
        "last_reason": d.reason,
    }


def goal_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for queued, insts, mode, target, what in GOALS:
        cell = [r for r in rows if r["queued"] == queued and r["instances"] == insts]
        if not cell or mode not in cell[0]:
            continue
        c = cell[0][mode]
        out.append(
            f"goal {what} at {queued // 1000}k queued x {insts} instances: p50 {c['p50_ms']:.1f} ms "
            f"p99 {c['p99_ms']:.1f} ms (target p99 <= {target:.0f} ms): "
            f"{'met' if c['p99_ms'] <= target else 'NOT met'}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qlm-bench planner", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="reduced grid (100, 1k x 4, 64)")
    ap.add_argument("--reps", type=int, default=30, help="plans per cell (capped by time)")
    ap.add_argument("--cap-s", type=float, default=8.0, help="wall cap per cell and path")
    ap.add_argument("--out", default="results/planner.json")
    ap.add_argument("--queued", type=int, nargs="*", help="override the queued-request grid")
    ap.add_argument("--instances", type=int, nargs="*", help="override the instance grid")
    ap.add_argument(
        "--modes",
        nargs="*",
        choices=MODES,
        help="solver modes to time (default all three; the goals need lp and auto)",
    )
    ap.add_argument("--cpu", type=int, help="pin the process to this CPU (Linux)")
    args = ap.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    queued = args.queued or ((100, 1_000) if args.quick else FULL_QUEUED)
    instances = args.instances or ((4, 64) if args.quick else FULL_INSTANCES)
    modes: tuple[SolverMode, ...] = tuple(args.modes) if args.modes else MODES
    rows = []
    total = len(queued) * len(instances)
    k = 0
    for n_inst in instances:
        for n_q in queued:
            k += 1
            print(
                f"[{k}/{total}] {n_q} queued x {n_inst} instances ...", file=sys.stderr, flush=True
            )
            qm = make_manager(n_q, n_inst)
            reps = max(3, args.reps if n_q <= 10_000 else args.reps // 3)
            row: dict[str, Any] = {"queued": n_q, "instances": n_inst}
            for mode in modes:
                row[mode] = time_cell(qm, mode, reps, args.cap_s)
            row["groups"] = row[modes[0]]["groups"]
            rows.append(row)
    hdr = (
        f"{'queued':>7} {'inst':>4} {'groups':>6} | {'decision p50':>12} {'p99':>7} "
        f"{'LP/fb':>7} | {'LP p50':>8} {'p99':>8} | {'fallback p50':>12} {'p99':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    none = {"p50_ms": math.nan, "p99_ms": math.nan, "paths": {}}

    def ms(c: dict[str, Any], key: str, width: int) -> str:
        v = c[key]
        return f"{v:>{width}.1f}ms" if not math.isnan(v) else f"{'-':>{width + 2}}"

    for r in rows:
        a, lp, fb = (r.get(m, none) for m in MODES)
        split = f"{a['paths'].get('lp', 0)}/{a['paths'].get('fallback', 0)}"
        print(
            f"{r['queued']:>7} {r['instances']:>4} {r['groups']:>6} | "
            f"{ms(a, 'p50_ms', 10)} {ms(a, 'p99_ms', 5)} {split:>7} | "
            f"{ms(lp, 'p50_ms', 6)} {ms(lp, 'p99_ms', 6)} | "
            f"{ms(fb, 'p50_ms', 10)} {ms(fb, 'p99_ms', 5)}"
        )
    for line in goal_lines(rows):
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"budget_s": ManagerConfig().plan_budget_s, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
