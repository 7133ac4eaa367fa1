"""`qlm-bench calibration`: how wrong is the RWT estimator, and does online recalibration help?

A scenario's trace window is simulated in virtual time (eval/simulator.py) with a ForecastRecorder
on the queue manager (eval/calibration.py): every request's forecast when it is first planned and
when it is pulled, scored against what then happened. Five worlds ("cases"):

- prior: the truth is what the estimator is told. Its output-length priors per (model, class) are
  the window's own mean and standard deviation, and the engines run the roofline (PerfModel) its
  profiles come from;
- out-x2, out-x0.5: (a) the true output lengths are 2x / 0.5x those (clipped to max_tokens), the
  priors stay;
- step+30%, step-30%: (b) every engine iteration takes 1.3x / 0.7x what the profiles say
  (SimSettings.step_time_scale), which the core does not know.

Each with three estimators ("variants"): frozen (no online learning: ewma_alpha 0), ewma (the
estimator's own EWMAs of output lengths and decode step, without core/recalibration.py: the
estimator before it), recal (both). The offered load is `--load` x the fluid capacity estimate
(eval/load.py) of the case's true workload and engines, so every case is equally loaded.

Printed: per case and variant the SLO attainment, the Brier score of P(meet) against the base
rate's, and the median |predicted - actual| first-token time relative to the true wait in the
first and last third of the run (by forecast time), for both decision points; then the truth =
prior case in detail (reliability table, error by queue position). Writes everything to `--out`
(JSON) and a reliability diagram next to it (.png); the summary line comes last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qlm_backend.core.config import ManagerConfig, OutputPrior
from qlm_backend.core.policies import POLICY_NAMES
from qlm_backend.eval import calibration as cal
from qlm_backend.eval.load import estimate_capacity, scale_to_load
from qlm_backend.eval.report import write_json
from qlm_backend.eval.runner import horizon_for
from qlm_backend.eval.scenario import Scenario, WorkloadRequest, build_workload, load_scenario
from qlm_backend.eval.simulator import SimSettings, Simulation
from qlm_backend.eval.traces import DEFAULT_TRACE, load_trace, window


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    output_scale: float = 1.0
    step_time_scale: float = 1.0


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    config: Mapping[str, Any] = field(default_factory=dict)


CASES: tuple[Case, ...] = (
    Case("prior", "truth = prior: output lengths as the priors, engines as the profiles"),
    Case("out-x2", "(a) true output lengths 2x the priors", output_scale=2.0),
    Case("out-x0.5", "(a) true output lengths 0.5x the priors", output_scale=0.5),
    Case("step+30%", "(b) engine iterations 1.3x the profiles", step_time_scale=1.3),
    Case("step-30%", "(b) engine iterations 0.7x the profiles", step_time_scale=0.7),
)
VARIANTS: tuple[Variant, ...] = (
    Variant("frozen", "no online learning (ewma_alpha 0)", {"ewma_alpha": 0.0}),
    Variant("ewma", "the estimator's EWMAs only (recalibrate off)", {"recalibrate": False}),
    Variant("recal", "EWMAs + core/recalibration.py", {"recalibrate": True}),
)
DATE = "2026-12-02"


# ---------------------------------------------------------------------------------- one run
def window_priors(workload: Sequence[WorkloadRequest]) -> dict[tuple[str, str], OutputPrior]:
    """The window's own output-length mean and std per (model, class): a prior that is the truth."""
    by: dict[tuple[str, str], list[int]] = {}
    for w in workload:
        by.setdefault((w.model, w.slo_class), []).append(w.output_tokens)
    return {k: OutputPrior(statistics.fmean(v), statistics.pstdev(v)) for k, v in by.items()}


def case_workload(
    sc: Scenario, workload: Sequence[WorkloadRequest], case: Case, load: float
) -> list[WorkloadRequest]:
    """The case's true workload, time-scaled to `load` x what its engines can serve."""
    wl = list(workload)
    if case.output_scale != 1.0:
        wl = [
            replace(
                w,
                output_tokens=max(1, min(w.max_tokens, round(w.output_tokens * case.output_scale))),
            )
            for w in wl
        ]
    # Engines slower by s serve 1/s of what the profiles say (every iteration scales).
    cap = estimate_capacity(sc.fleet, wl).requests_per_s / case.step_time_scale
    scaled, _ = scale_to_load(wl, cap, load)
    return scaled


def run_one(
    sc: Scenario,
    workload: Sequence[WorkloadRequest],
    priors: Mapping[tuple[str, str], OutputPrior],
    case: Case,
    variant: Variant,
    policy: str,
) -> dict[str, Any]:
    cfg = ManagerConfig(
        warm_slots_per_host=sc.fleet.warm_slots_per_host, priors=dict(priors), **variant.config
    )
    settings = SimSettings(
        policy,
        label=f"{case.name}/{variant.name}",
        manager_config=cfg,
        horizon_s=horizon_for(workload, sc),
        step_time_scale=case.step_time_scale,
    )
    sim = Simulation(sc.fleet, workload, settings)
    rec = cal.ForecastRecorder()
    sim.qm.plan_observer = rec
    res = sim.run()
    truths = {
        r.req.request_id: cal.Truth(r.req.request_id, r.deadline_s, r.first_token_s)
        for r in res.records
    }
    weights = {c.name: c.weight for c in sc.fleet.slo_classes}
    met = [t.met for t in truths.values()]
    wsum = sum(weights.get(r.req.slo_class, 1.0) for r in res.records)
    wmet = sum(
        weights.get(r.req.slo_class, 1.0) for r in res.records if truths[r.req.request_id].met
    )
    scored = cal.score(rec.points, truths)
    out: dict[str, Any] = {
        "attainment": sum(met) / len(met) if met else None,
        "weighted_attainment": wmet / wsum if wsum else None,
        "sim_wall_s": round(res.wall_s, 2),
        "recalibration": {
            "/".join(map(str, k)): v.__dict__ for k, v in sim.qm.estimator.recal.state().items()
        },
    }
    for kind in cal.POINT_KINDS:
        pts = [x for x in scored if x.point.kind == kind]
        thirds = cal.thirds(pts)
        out[kind] = {
            "all": cal.summarize(pts),
            "thirds": [
                {k: v for k, v in cal.summarize(t).items() if k not in ("reliability", "positions")}
                for t in thirds
            ],
        }
    return out


# ---------------------------------------------------------------------------------- report
def _f(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def summary_table(result: Mapping[str, Any]) -> str:
    head = f"{'case':<9} {'variant':<7} {'attain':>6} {'w.att':>6} | " + " | ".join(
        f"{k:<7} {'Brier':>6} {'base':>6} {'rel|e| 1st':>10} {'3rd':>6} {'|e| 1st':>8} {'3rd':>7}"
        for k in cal.POINT_KINDS
    )
    lines = [head, "-" * len(head)]
    for cname, variants in result["cases"].items():
        for vname, r in variants.items():
            cells = []
            for kind in cal.POINT_KINDS:
                a, t = r[kind]["all"], r[kind]["thirds"]
                cells.append(
                    f"{'':<7} {_f(a['brier']):>6} {_f(a['brier_base_rate']):>6} "
                    f"{_f(t[0]['rel_abs_err_p50']):>10} {_f(t[2]['rel_abs_err_p50']):>6} "
                    f"{_f(t[0]['abs_err_p50_s'], 2):>8} {_f(t[2]['abs_err_p50_s'], 2):>7}"
                )
            lines.append(
                f"{cname:<9} {vname:<7} {_f(r['attainment']):>6} {_f(r['weighted_attainment']):>6} | "
                + " | ".join(cells)
            )
    return "\n".join(lines)


def reliability_table(summary: Mapping[str, Any]) -> str:
    lines = [f"{'P(meet) bin':<12} {'count':>6} {'mean P':>7} {'observed':>8}"]
    for b in summary["reliability"]:
        lines.append(
            f"{b['lo']:.1f}-{b['hi']:.1f}".ljust(12)
            + f" {b['count']:>6} {_f(b['mean_predicted']):>7} {_f(b['observed']):>8}"
        )
    return "\n".join(lines)


def position_table(summary: Mapping[str, Any]) -> str:
    lines = [
        f"{'position':<9} {'count':>6} {'|e| p50':>8} {'|e| p90':>8} {'e p50':>8} {'e p90':>8} "
        f"{'rel p50':>8}"
    ]
    for p in summary["positions"]:
        lines.append(
            f"{p['label']:<9} {p['count']:>6} {_f(p['abs_p50_s'], 2):>8} {_f(p['abs_p90_s'], 2):>8} "
            f"{_f(p['signed_p50_s'], 2):>8} {_f(p['signed_p90_s'], 2):>8} {_f(p['rel_abs_p50']):>8}"
        )
    return "\n".join(lines)


def plot_reliability(result: Mapping[str, Any], path: Path) -> Path:
    from qlm_backend.eval.plots import _plt

    plt = _plt()
    kinds, variants = cal.POINT_KINDS, [v.name for v in VARIANTS]
    fig, axes = plt.subplots(
        len(kinds), len(variants), figsize=(4.2 * len(variants), 4.0 * len(kinds)), squeeze=False
    )
    for i, kind in enumerate(kinds):
        for j, vname in enumerate(variants):
            ax = axes[i][j]
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            for cname, vs in result["cases"].items():
                bins = [b for b in vs[vname][kind]["all"]["reliability"] if b["count"]]
                if not bins:
                    continue
                ax.plot(
                    [b["mean_predicted"] for b in bins],
                    [b["observed"] for b in bins],
                    marker="o",
                    ms=3,
                    label=cname,
                )
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{kind}, {vname}", fontsize=10)
            ax.set_xlabel("predicted P(meet)")
            ax.set_ylabel("observed frequency")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"{result['scenario']} load {result['load']:g} seed {result['seed']}: reliability of P(meet)",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def headline(result: Mapping[str, Any]) -> str:
    """Median relative first-token error at planning in the last third, mean over the perturbed
    cases, per variant; the truth = prior case's Brier next to its base rate."""
    perturbed = [c for c in result["cases"] if c != "prior"]
    parts = []
    for v in VARIANTS:
        xs = [
            result["cases"][c][v.name]["planned"]["thirds"][2]["rel_abs_err_p50"] for c in perturbed
        ]
        xs = [x for x in xs if x is not None]
        parts.append(f"{v.name} {statistics.fmean(xs):.3f}" if xs else f"{v.name} -")
    prior = result["cases"].get("prior", {}).get("recal")
    brier = ""
    if prior is not None:
        a = prior["planned"]["all"]
        brier = f"; prior case Brier {_f(a['brier'])} (base rate {_f(a['brier_base_rate'])})"
    return (
        f"calibration {result['scenario']} load {result['load']:g} seed {result['seed']} "
        f"({result['requests']} req): planned rel |err| last third, mean of perturbed cases: "
        + ", ".join(parts)
        + brier
    )


# ---------------------------------------------------------------------------------- cli
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlm-bench calibration", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="wa", help="wa|wb|wc or a scenario JSON file")
    p.add_argument("--load", type=float, default=2.0, help="x the fluid capacity estimate")
    p.add_argument("--seed", type=int, default=0, help="seed of the model/class assignment")
    p.add_argument("--max-requests", type=int, default=800, help="trace window: first N")
    p.add_argument("--policy", default="qlm", choices=POLICY_NAMES)
    p.add_argument(
        "--cases",
        default=",".join(c.name for c in CASES),
        help=f"comma list of {','.join(c.name for c in CASES)}".replace("%", "%%"),
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/bench-calibration.json"),
        help="JSON path; the reliability diagram goes next to it (.png)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    known = {c.name: c for c in CASES}
    names = [x.strip() for x in a.cases.split(",") if x.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        print(
            f"qlm-bench calibration: unknown case(s) {bad}; known: {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    if a.load <= 0 or a.max_requests < 2:
        print("qlm-bench calibration: --load must be > 0, --max-requests >= 2", file=sys.stderr)
        return 2
    from qlm_backend.core.highs import silence_highs_banner

    t0 = time.perf_counter()
    sc = load_scenario(a.scenario)
    trace = window(load_trace(str(DEFAULT_TRACE)), max_requests=a.max_requests, duration_s=None)
    base = build_workload(sc, trace, a.seed)
    priors = window_priors(base)
    silence_highs_banner()
    result: dict[str, Any] = {
        "bench": "calibration",
        "date": DATE,
        "scenario": sc.name,
        "load": a.load,
        "seed": a.seed,
        "policy": a.policy,
        "requests": len(base),
        "capacity": "fluid estimate (eval/load.py) of each case's true workload and engines",
        "priors": {f"{m}/{c}": p.__dict__ for (m, c), p in priors.items()},
        "cases_what": {c.name: c.what for c in CASES if c.name in names},
        "variants_what": {v.name: v.what for v in VARIANTS},
        "cases": {},
    }
    for cname in names:
        case = known[cname]
        wl = case_workload(sc, base, case, a.load)
        result["cases"][cname] = {}
        for v in VARIANTS:
            r = run_one(sc, wl, priors, case, v, a.policy)
            result["cases"][cname][v.name] = r
            print(
                f"  {cname:<9} {v.name:<7} attainment {_f(r['attainment'])} "
                f"({r['sim_wall_s']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"{sc.name} load {a.load:g} seed {a.seed}, {len(base)} requests, policy {a.policy}")
    print(
        "rel|e|: median |predicted - actual first token| / true wait; |e| in s; "
        "1st / 3rd: first / last third of the forecasts"
    )
    print(summary_table(result))
    detail = next((c for c in ("prior", *names) if c in result["cases"]), None)
    if detail is not None:
        for vname in ("ewma", "recal"):
            for kind in cal.POINT_KINDS:
                s = result["cases"][detail][vname][kind]["all"]
                print(f"\n{detail}, {vname}, {kind}: reliability of P(meet)")
                print(reliability_table(s))
                print(f"{detail}, {vname}, {kind}: first-token error by queue position (s)")
                print(position_table(s))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    wrote = [str(a.out)]
    if not a.no_plot:
        try:
            wrote.append(str(plot_reliability(result, a.out.with_suffix(".png"))))
        except ImportError:
            print("qlm-bench calibration: matplotlib not installed, plot skipped", file=sys.stderr)
    print(f"\n{headline(result)}; wrote {', '.join(wrote)} (wall {result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
