"""qlm-eval: the paper's scenarios on real traces, every policy in virtual time, tables/JSON/PNGs.

    qlm-eval --scenario wa --load 2                      # shipped conversation trace, all policies
    qlm-eval --scenario wb --load 0.5,1,1.5,2,3 --out results/wb-sweep
    qlm-eval --trace my.csv --scenario my_scenario.json --policies qlm,fcfs --ablate
    qlm-eval --generate long.csv --requests 2000 --prompt-mean 12000 --prompt-median 7000 \
        --output-mean 300 --output-median 180 --rate 1 --arrival-cv 2 --seed 1

Writes DIR/results.json (one object per load under "runs" for a sweep), DIR/table.txt and PNGs:
ttft_cdf_load<X>.png, timeline_load<X>.png and, for a sweep, attainment_vs_load.png.

`--load X` offers X times the fleet's capacity: by default the measured one (the highest rate at
which FCFS keeps its queue bounded on this window, eval/load.py; cached per scenario, window and
seed), `--capacity fluid` the roofline estimate. Both are printed above the table.

`--generate OUT.csv` writes a seeded synthetic trace instead (eval/generate.py) and exits.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlm_backend.core.highs import silence_highs_banner
from qlm_backend.core.policies import POLICY_NAMES
from qlm_backend.eval import generate as gen
from qlm_backend.eval.load import (
    CapacityError,
    OfferedCapacity,
    Probe,
    cached_measured_capacity,
    default_cache_path,
    estimate_capacity,
)
from qlm_backend.eval.plots import attainment_vs_load, timeline, ttft_cdf
from qlm_backend.eval.report import table, write_json
from qlm_backend.eval.runner import ABLATIONS, DEFAULT_POLICIES, evaluate_load
from qlm_backend.eval.scenario import (
    SHIPPED,
    Scenario,
    ScenarioError,
    WorkloadRequest,
    build_workload,
    load_scenario,
)
from qlm_backend.eval.traces import DEFAULT_TRACE, TRACE_FORMATS, TraceError, load_trace, window

# The generator's options: (dest, type, help). All default to None so that a generator option given
# without --generate is caught, and --generate's defaults are filled in by _generate.
_GEN_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("requests", int, "number of requests (default 2000)"),
    ("prompt_mean", float, "mean prompt tokens (default 1000)"),
    ("prompt_median", float, "median prompt tokens (or --prompt-sigma; default sigma 1)"),
    ("prompt_sigma", float, "lognormal sigma of prompt tokens"),
    ("prompt_max", int, "cap on prompt tokens; mean and median are of the capped lengths"),
    ("output_mean", float, "mean output tokens (default 250)"),
    ("output_median", float, "median output tokens (or --output-sigma; default sigma 1)"),
    ("output_sigma", float, "lognormal sigma of output tokens"),
    ("output_max", int, "cap on output tokens; mean and median are of the capped lengths"),
    ("rate", float, "mean arrivals per second (default 1)"),
    ("arrival_cv", float, "CV of the gamma inter-arrival times: 1 Poisson, > 1 bursty (default 1)"),
    ("models", str, "model mix written to the model column, e.g. a:0.5,b:0.5"),
    ("classes", str, "SLO class mix written to the slo_class column, e.g. interactive:0.4,..."),
)


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
        default=None,
        help="trace file (default: the scenario's own trace if it names one, else the shipped "
        "Azure conversation trace)",
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
        help="offered load x capacity (see --capacity); a comma list sweeps",
    )
    p.add_argument(
        "--capacity",
        choices=("measured", "fluid"),
        default="measured",
        help="what --load multiplies: the rate at which FCFS keeps its queue bounded in the "
        "simulator (measured, cached) or the roofline estimate (fluid)",
    )
    p.add_argument(
        "--capacity-cache",
        default=None,
        metavar="PATH",
        help=f"measured-capacity cache (default {default_cache_path()}; 'none' for no cache)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the model/class assignment (with --generate: of the generator)",
    )
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
    g = p.add_argument_group("trace generator (eval/generate.py)")
    g.add_argument(
        "--generate",
        metavar="OUT.csv",
        default=None,
        help="write a seeded synthetic trace (generic CSV) and exit",
    )
    for dest, typ, text in _GEN_OPTIONS:
        g.add_argument("--" + dest.replace("_", "-"), dest=dest, type=typ, default=None, help=text)
    return p


def _generate(args: argparse.Namespace) -> int:
    def opt(name: str, default: Any) -> Any:
        v = getattr(args, name)
        return default if v is None else v

    try:
        prompt = gen.length_dist(
            "prompt",
            opt("prompt_mean", 1000.0),
            args.prompt_median,
            args.prompt_sigma,
            args.prompt_max,
        )
        output = gen.length_dist(
            "output",
            opt("output_mean", 250.0),
            args.output_median,
            args.output_sigma,
            args.output_max,
        )
        spec = gen.make_spec(
            requests=opt("requests", 2000),
            prompt=prompt,
            output=output,
            rate_per_s=opt("rate", 1.0),
            arrival_cv=opt("arrival_cv", 1.0),
            models=gen.parse_mix(args.models, "models") if args.models is not None else (),
            classes=gen.parse_mix(args.classes, "classes") if args.classes is not None else (),
            seed=args.seed,
        )
        records = gen.write_trace(args.generate, spec)
    except gen.GenerateError as e:
        print(f"qlm-eval: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"qlm-eval: error: --generate: cannot write {args.generate}: {e}", file=sys.stderr)
        return 2
    d = gen.describe(records)
    shares = "".join(
        f"  {k.removesuffix('_shares')} {', '.join(f'{n} {s:.3f}' for n, s in v.items())}"
        for k, v in d.items()
        if isinstance(v, dict)
    )
    print(
        f"wrote {args.generate}: {len(records)} requests, prompt mean {d['prompt_mean']:.0f} "
        f"median {d['prompt_median']:.0f}, output mean {d['output_mean']:.0f} median "
        f"{d['output_median']:.0f}, rate {d.get('rate_per_s', 0.0):.3f}/s, arrival CV "
        f"{d.get('arrival_cv', 0.0):.2f}{shares}"
    )
    return 0


def _capacity(
    args: argparse.Namespace,
    sc: Scenario,
    workload: list[WorkloadRequest],
    trace_path: str,
    window_key: tuple[int | None, float | None],
) -> OfferedCapacity:
    """The capacity --load multiplies, with both figures; measures (and caches) if it must."""
    fluid = estimate_capacity(sc.fleet, workload).requests_per_s
    text = args.capacity_cache
    cache = None if text == "none" else Path(text) if text else default_cache_path()
    measuring = args.capacity == "measured"
    t0 = time.perf_counter()

    def on_probe(p: Probe) -> None:
        if not args.no_progress:
            print(
                f"qlm-eval: {sc.name} capacity: FCFS at {p.rate_rps:.4g} req/s: "
                f"{'bounded' if p.bounded else 'queue grows'} (wait {p.wait_middle_s:.1f} -> "
                f"{p.wait_last_s:.1f} s, limit +{p.allowed_growth_s:.1f} s) "
                f"[{time.perf_counter() - t0:.0f} s]",
                file=sys.stderr,
                flush=True,
            )

    if measuring and not args.no_progress:
        print(
            f"qlm-eval: {sc.name}: measuring the FCFS capacity of {len(workload)} requests "
            f"(fluid estimate {fluid:.4g} req/s) unless cached",
            file=sys.stderr,
            flush=True,
        )
    measured = cached_measured_capacity(
        sc,
        workload,
        seed=args.seed,
        window=window_key,
        start_rps=fluid,
        cache_path=cache,
        on_probe=on_probe,
        lookup_only=not measuring,
        trace_path=trace_path,
    )
    if measuring:
        assert measured is not None
        return OfferedCapacity("measured", measured.requests_per_s, fluid, measured)
    return OfferedCapacity("fluid", fluid, fluid, measured)


def _progress(total: int, disable: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dev extra: run without a bar
        return None
    return tqdm(total=total, unit="req", disable=disable, dynamic_ncols=True, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    given = [d for d, _, _ in _GEN_OPTIONS if getattr(args, d) is not None]
    if args.generate is not None:
        return _generate(args)
    if given:
        p.error(f"--{given[0].replace('_', '-')} only applies with --generate OUT.csv")
    t_start = time.perf_counter()
    silence_highs_banner()  # the capacity estimate is the first LP of the process
    try:
        sc = load_scenario(args.scenario)
        trace_path = args.trace or str(sc.trace_path or DEFAULT_TRACE)
        trace = load_trace(trace_path, args.trace_format)
        max_req = args.max_requests if args.max_requests is not None else sc.window_max_requests
        dur = args.duration_s if args.duration_s is not None else sc.window_duration_s
        if args.max_requests is not None and args.max_requests < 1:
            raise ValueError("--max-requests must be >= 1")
        trace = window(trace, max_requests=max_req, duration_s=dur)
        workload = build_workload(sc, trace, args.seed)
        capacity = _capacity(args, sc, workload, trace_path, (max_req, dur))
    except CapacityError as e:
        print(f"qlm-eval: error: --capacity measured: {e}; try --capacity fluid", file=sys.stderr)
        return 2
    except (TraceError, ScenarioError, ValueError) as e:
        print(f"qlm-eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("results") / sc.name
    out.mkdir(parents=True, exist_ok=True)
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
            trace_path=trace_path,
            on_ended=on_ended,
            on_run=on_run,
            capacity=capacity,
        )
        obj["window"] = {"max_requests": max_req, "duration_s": dur}
        obj["capacity"] = capacity.to_json()
        runs.append(obj)
        shown = dict(obj)
        shown["policies"] = {**obj["policies"], **obj.get("ablations", {})}
        texts.append(capacity.describe() + "\n" + table(shown, [c for c, _ in classes]))
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
            "trace": trace_path,
            "seed": args.seed,
            "loads": args.load,
            "capacity": capacity.to_json(),
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
