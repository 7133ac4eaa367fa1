"""qlm-eval: the paper's scenarios on real traces, every policy in virtual time, tables/JSON/PNGs.

    qlm-eval --scenario wa --load 2                      # shipped conversation trace, all policies
    qlm-eval --scenario wb --load 0.5,1,1.5,2,3 --out results/wb-sweep
    qlm-eval --trace my.csv --scenario my_scenario.json --policies qlm,fcfs --ablate

Writes DIR/results.json (one object per load under "runs" for a sweep), DIR/table.txt and PNGs:
ttft_cdf_load<X>.png, timeline_load<X>.png and, for a sweep, attainment_vs_load.png.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlm_backend.core.policies import POLICY_NAMES
from qlm_backend.eval.plots import attainment_vs_load, timeline, ttft_cdf
from qlm_backend.eval.report import table, write_json
from qlm_backend.eval.runner import ABLATIONS, DEFAULT_POLICIES, evaluate_load
from qlm_backend.eval.scenario import SHIPPED, ScenarioError, build_workload, load_scenario
from qlm_backend.eval.traces import DEFAULT_TRACE, TRACE_FORMATS, TraceError, load_trace, window


def _loads(text: str) -> list[float]:
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--load: expected numbers like 2 or 0.5,1,2; got {text!r}"
        ) from None
    if not loads or any(x <= 0 for x in loads):
        raise argparse.ArgumentTypeError(f"--load: every load must be > 0; got {text!r}")
    return loads


def _policies(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in POLICY_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--policies: unknown {bad}; known: {', '.join(POLICY_NAMES)}"
        )
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlm-eval",
        description="Simulate the QLM scenarios in virtual time with every policy and report "
        "SLO attainment, throughput, TTFT, GPU busy share, LSO counts and planner time.",
    )
    p.add_argument(
        "--trace",
        default=str(DEFAULT_TRACE),
        help="trace file (default: the shipped Azure conversation trace)",
    )
    p.add_argument("--trace-format", choices=TRACE_FORMATS, default="auto")
    p.add_argument("--scenario", default="wa", help=f"{'|'.join(SHIPPED)} or a scenario JSON file")
    p.add_argument(
        "--policies",
        type=_policies,
        default=list(DEFAULT_POLICIES),
        help=f"comma list of {','.join(POLICY_NAMES)}",
    )
    p.add_argument(
        "--load",
        type=_loads,
        default=[2.0],
        help="offered load x estimated capacity; a comma list sweeps",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the model/class assignment")
    p.add_argument("--out", default=None, help="output directory (default results/<scenario>)")
    p.add_argument(
        "--ablate", action="store_true", help="add qlm runs with each LSO switched off in turn"
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=None,
        help="trace window: first N requests (default: the scenario's)",
    )
    p.add_argument(
        "--duration-s",
        type=float,
        default=None,
        help="trace window: first S seconds of the trace (before scaling)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _silence_highs_banner() -> None:
    """HiGHS prints a banner on stdout the first time a solver is built in a process; build one now
    with stdout pointed at /dev/null so it does not land in the middle of the table."""
    try:
        import highspy
    except ImportError:
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
            # The banner sits in C stdio's buffer when stdout is a file: flush it to /dev/null.
            ctypes.CDLL(None).fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _progress(total: int, disable: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dev extra: run without a bar
        return None
    return tqdm(total=total, unit="req", disable=disable, dynamic_ncols=True, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t_start = time.perf_counter()
    try:
        sc = load_scenario(args.scenario)
        trace = load_trace(args.trace, args.trace_format)
        max_req = args.max_requests if args.max_requests is not None else sc.window_max_requests
        dur = args.duration_s if args.duration_s is not None else sc.window_duration_s
        if args.max_requests is not None and args.max_requests < 1:
            raise ValueError("--max-requests must be >= 1")
        trace = window(trace, max_requests=max_req, duration_s=dur)
        workload = build_workload(sc, trace, args.seed)
    except (TraceError, ScenarioError, ValueError) as e:
        print(f"qlm-eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("results") / sc.name
    out.mkdir(parents=True, exist_ok=True)
    _silence_highs_banner()
    runs_per_load = len(args.policies) + (len(ABLATIONS) if args.ablate else 0)
    bar = _progress(len(workload) * runs_per_load * len(args.load), args.no_progress)
    on_ended = bar.update if bar is not None else None

    def on_run(label: str) -> None:
        if bar is not None:
            bar.set_description(f"{sc.name} load {load:g} {label}")

    runs: list[dict[str, Any]] = []
    texts: list[str] = []
    classes = [(c.name, c.ttft_slo_s) for c in sc.fleet.slo_classes]
    for load in args.load:
        obj, raw = evaluate_load(
            sc,
            workload,
            load,
            args.policies,
            ablate=args.ablate,
            seed=args.seed,
            trace_path=args.trace,
            on_ended=on_ended,
            on_run=on_run,
        )
        obj["window"] = {"max_requests": max_req, "duration_s": dur}
        runs.append(obj)
        shown = dict(obj)
        shown["policies"] = {**obj["policies"], **obj.get("ablations", {})}
        texts.append(table(shown, [c for c, _ in classes]))
        if not args.no_plots:
            try:
                tag = f"load{load:g}"
                ttft_cdf(
                    raw, classes, out / f"ttft_cdf_{tag}.png", f"{sc.name}, load {load:g}: TTFT CDF"
                )
                main_pols = {k: v for k, v in raw.items() if k in obj["policies"]}
                timeline(
                    main_pols,
                    out / f"timeline_{tag}.png",
                    f"{sc.name}, load {load:g}: model per instance",
                )
            except ImportError:
                print("qlm-eval: matplotlib not installed, plots skipped", file=sys.stderr)
    if bar is not None:
        bar.close()
    if len(runs) == 1:
        result: dict[str, Any] = runs[0]
    else:
        result = {
            "scenario": sc.name,
            "trace": args.trace,
            "seed": args.seed,
            "loads": args.load,
            "runs": runs,
        }
        if not args.no_plots:
            try:
                attainment_vs_load(runs, out / "attainment_vs_load.png")
            except ImportError:
                pass
    result["wall_s"] = round(time.perf_counter() - t_start, 2)
    write_json(out / "results.json", result)
    text = "\n\n".join(texts)
    (out / "table.txt").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'results.json'} (wall {result['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
