"""The evaluation protocol: a development set to tune on and a test set no knob has seen.

    qlm-eval-protocol --set dev                     # tune here: seeds 0-4, loads 1.5 and 2
    qlm-eval-protocol --set test --jobs 2           # report here: seeds 100-109, loads 0.8-3
    qlm-eval-protocol --set test --seeds 100-101    # a cheaper slice of the same set

Each set is cases (a scenario on a trace) x seeds x loads; every cell runs every policy on the same
arrivals (eval/runner.py evaluate_load), with the measured capacity behind `--load` and the upper
bound beside it. One (case, seed) is one unit of work: it builds the workload, measures (or reads
from the cache) its capacity, runs every load and writes `OUT/units/<case>-s<seed>.json`; a unit
already written is skipped, so an interrupted run resumes. Units run in `--jobs` processes. The
report (eval/protocol_report.py) reads the units back.

Why these sets: the development set holds the shipped Azure conversation and code traces and the
generated long-prompt trace wd, at the two loads where scheduling matters most; the test set adds
the loads either side, ten unseen seeds (other class and model assignments, other capacities) and
wd2, a long-prompt trace with other length and burstiness parameters that nothing was tuned on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlm_backend.eval.traces import TRACES_DIR

CONV = str(TRACES_DIR / "AzureLLMInferenceTrace_conv.csv")
CODE = str(TRACES_DIR / "AzureLLMInferenceTrace_code.csv")


@dataclass(frozen=True)
class Case:
    """A scenario on a trace (None: the scenario's own trace, else the conversation trace)."""

    name: str
    scenario: str
    trace: str | None = None


@dataclass(frozen=True)
class ProtocolSet:
    name: str
    cases: tuple[Case, ...]
    seeds: tuple[int, ...]
    loads: tuple[float, ...]


_DEV_CASES = (
    Case("wa-conv", "wa", CONV),
    Case("wb-conv", "wb", CONV),
    Case("wc-conv", "wc", CONV),
    Case("wa-code", "wa", CODE),
    Case("wd", "wd"),
)
SETS: dict[str, ProtocolSet] = {
    "dev": ProtocolSet("dev", _DEV_CASES, tuple(range(0, 5)), (1.5, 2.0)),
    "test": ProtocolSet(
        "test",
        (*_DEV_CASES, Case("wd2", "wd2")),
        tuple(range(100, 110)),
        (0.8, 1.0, 1.5, 2.0, 3.0),
    ),
}
DEFAULT_MAX_REQUESTS = 1000  # per unit: half the scenarios' window, so a test set fits an hour


def parse_seeds(text: str) -> tuple[int, ...]:
    """'100-104' or '0,3,7'."""
    out: list[int] = []
    try:
        for part in text.split(","):
            a, sep, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds: expected 100-104 or 0,3,7; got {text!r}"
        ) from None
    if not out:
        raise argparse.ArgumentTypeError("--seeds: no seed given")
    return tuple(out)


# What a unit's figures depend on: the policies, the engine model, the simulator and the workload
# builders with their data. Not the protocol's own orchestration or the report's formatting.
_RESULT_SOURCES = ("core", "engine", "eval", "data")
_NOT_RESULTS = ("protocol.py", "protocol_report.py", "plots.py", "report.py", "cli.py")


def code_digest(root: Path | None = None) -> str:
    """sha256 (16 hex digits) over the package files behind a unit's figures, by relative path."""
    base = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for sub in _RESULT_SOURCES:
        for f in sorted((base / sub).rglob("*")):
            if not f.is_file() or "__pycache__" in f.parts or f.name in _NOT_RESULTS:
                continue
            h.update(f.relative_to(base).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def is_current(path: Path, code: str) -> bool:
    """Written, whole, and by the code that runs now."""
    try:
        return bool(json.loads(path.read_text()).get("code") == code)
    except (OSError, ValueError):
        return False


def run_unit(
    case: Case, seed: int, loads: Sequence[float], max_requests: int, out: Path, code: str = ""
) -> dict[str, Any]:
    """Every load of one (case, seed); writes and returns the unit's JSON object."""
    from qlm_backend.core.highs import silence_highs_banner
    from qlm_backend.eval.load import (
        OfferedCapacity,
        cached_measured_capacity,
        default_cache_path,
        estimate_capacity,
    )
    from qlm_backend.eval.runner import DEFAULT_POLICIES, evaluate_load
    from qlm_backend.eval.scenario import build_workload, load_scenario
    from qlm_backend.eval.traces import DEFAULT_TRACE, load_trace, window

    silence_highs_banner()
    t0 = time.perf_counter()
    sc = load_scenario(case.scenario)
    trace_path = case.trace or str(sc.trace_path or DEFAULT_TRACE)
    trace = window(load_trace(trace_path), max_requests=max_requests, duration_s=None)
    workload = build_workload(sc, trace, seed)
    fluid = estimate_capacity(sc.fleet, workload).requests_per_s
    measured = cached_measured_capacity(
        sc,
        workload,
        seed=seed,
        window=(max_requests, None),
        start_rps=fluid,
        cache_path=default_cache_path(),
        trace_path=trace_path,
    )
    assert measured is not None
    cap = OfferedCapacity("measured", measured.requests_per_s, fluid, measured)
    runs = []
    for load in loads:
        obj, _ = evaluate_load(
            sc,
            workload,
            load,
            DEFAULT_POLICIES,
            ablate=False,
            seed=seed,
            trace_path=trace_path,
            capacity=cap,
        )
        obj["capacity"] = cap.to_json()
        runs.append(obj)
    unit = {
        "case": case.name,
        "scenario": case.scenario,
        "trace": Path(trace_path).name,
        "seed": seed,
        "max_requests": max_requests,
        "weights": {c.name: c.weight for c in sc.fleet.slo_classes},
        "classes": [c.name for c in sc.fleet.slo_classes],
        "runs": runs,
        "wall_s": round(time.perf_counter() - t0, 1),
        "code": code or code_digest(),
    }
    path = unit_path(out, case.name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(unit, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return unit


def unit_path(out: Path, case: str, seed: int) -> Path:
    return out / "units" / f"{case}-s{seed}.json"


def load_units(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "units").glob("*.json"))]


def run_set(
    pset: ProtocolSet,
    out: Path,
    *,
    jobs: int,
    max_requests: int,
    cases: Sequence[str] | None = None,
) -> None:
    code = code_digest()
    chosen = [(c, s) for c in pset.cases if cases is None or c.name in cases for s in pset.seeds]
    todo = [(c, s) for c, s in chosen if not is_current(unit_path(out, c.name, s), code)]
    stale = sum(1 for c, s in todo if unit_path(out, c.name, s).exists())
    total = len(todo)
    if stale:
        print(
            f"qlm-eval-protocol: {stale} unit(s) in {out} were written by other code "
            f"(digest != {code}): running them again",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"qlm-eval-protocol: {pset.name}: {total} units to run "
        f"({len(pset.cases)} cases x {len(pset.seeds)} seeds, loads {list(pset.loads)}; "
        f"{max_requests} requests each) in {jobs} process(es), results in {out}",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futs = {
            pool.submit(run_unit, c, s, pset.loads, max_requests, out, code): (c.name, s)
            for c, s in todo
        }
        for k, fut in enumerate(as_completed(futs), 1):
            name, seed = futs[fut]
            unit = fut.result()
            el = time.perf_counter() - t0
            eta = el / k * (total - k)
            print(
                f"qlm-eval-protocol: [{k}/{total}] {name} seed {seed} done in "
                f"{unit['wall_s']:.0f} s; elapsed {el / 60:.1f} min, about {eta / 60:.1f} min left",
                file=sys.stderr,
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qlm-eval-protocol", description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=sorted(SETS), default="test")
    p.add_argument("--seeds", type=parse_seeds, default=None, help="a slice of the set's seeds")
    p.add_argument("--cases", default=None, help="comma list of case names (default: all)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS)
    p.add_argument("--out", default=None, help="default results/protocol-<set>")
    p.add_argument("--report", default=None, help="write the report (markdown + PNGs) here")
    args = p.parse_args(argv)
    pset = SETS[args.set]
    if args.seeds is not None:
        bad = sorted(set(args.seeds) - set(pset.seeds))
        if bad:
            p.error(f"--seeds: {bad} not in the {pset.name} set's seeds {list(pset.seeds)}")
        pset = ProtocolSet(pset.name, pset.cases, args.seeds, pset.loads)
    cases = None
    if args.cases:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        known = {c.name for c in pset.cases}
        bad_c = [c for c in cases if c not in known]
        if bad_c:
            p.error(f"--cases: unknown {bad_c}; known: {sorted(known)}")
    if args.jobs < 1 or args.max_requests < 1:
        p.error("--jobs and --max-requests must be >= 1")
    out = Path(args.out) if args.out else Path("results") / f"protocol-{pset.name}"
    run_set(pset, out, jobs=args.jobs, max_requests=args.max_requests, cases=cases)
    from qlm_backend.eval.protocol_report import write_report

    report_dir = Path(args.report) if args.report else out
    path = write_report(load_units(out), pset, report_dir)
    print(path.read_text())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "SETS",
    "Case",
    "ProtocolSet",
    "code_digest",
    "is_current",
    "load_units",
    "parse_seeds",
    "run_set",
    "run_unit",
]
