"""The protocol's report: tables and plots from the units eval/protocol.py wrote.

Per (case, load), over the seeds run: class-weighted attainment (mean and spread) of every policy
and of the upper bound, the best baseline, qlm's margin over it and the share of the distance from
the best baseline to the bound that qlm closes; then per-class attainment, goodput, TTFT p50/p99,
GPU busy share, model swaps per hour and the planner's LP / fallback / incremental shares. Plots:
per case, attainment vs load (weighted and per class), a line per policy, the bound dashed.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qlm_backend.eval.protocol import ProtocolSet

QLM = "qlm"
NOT_BASELINES = ("qlm", "qlm-true-lengths")  # the baselines are today's schedulers


def _mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _sd(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def collect(units: Sequence[Mapping[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """(case, load) -> {"seeds", "policies": name -> list of summaries, "bound": list, ...}."""
    cells: dict[tuple[str, float], dict[str, Any]] = {}
    for u in units:
        for run in u["runs"]:
            c = cells.setdefault(
                (u["case"], float(run["load"])),
                {"seeds": [], "policies": {}, "bound": [], "classes": u["classes"], "cap": []},
            )
            c["seeds"].append(u["seed"])
            c["bound"].append(run.get("bound") or {})
            c["cap"].append(run.get("capacity", {}).get("requests_per_s"))
            for name, summ in run["policies"].items():
                c["policies"].setdefault(name, []).append(summ)
    return cells


def _weighted(summs: Sequence[Mapping[str, Any]]) -> list[float]:
    return [s["weighted_attainment"] for s in summs if s.get("weighted_attainment") is not None]


def headline(cell: Mapping[str, Any]) -> dict[str, Any]:
    pols = cell["policies"]
    means = {n: _mean(_weighted(s)) for n, s in pols.items()}
    bound = _mean([b["weighted_attainment"] for b in cell["bound"] if b])
    base = {n: m for n, m in means.items() if n not in NOT_BASELINES and m is not None}
    best = max(base, key=lambda n: base[n]) if base else None
    q = means.get(QLM)
    out: dict[str, Any] = {"means": means, "bound": bound, "best": best, "qlm": q}
    if best is not None and q is not None:
        out["margin"] = q - base[best]
        gap = (bound - base[best]) if bound is not None else None
        out["closed"] = (q - base[best]) / gap if gap is not None and gap > 1e-9 else None
    return out


def markdown(units: Sequence[Mapping[str, Any]], pset: ProtocolSet, img: str | None) -> str:
    cells = collect(units)
    if not cells:
        return f"# Protocol {pset.name}: no results yet\n"
    # A fixed order (qlm, its variants, then the baselines by name): a set's own order follows the
    # process's string hashing and reshuffled the columns from one report to the next.
    policies = sorted(
        {n for c in cells.values() for n in c["policies"]},
        key=lambda n: (n != QLM, not n.startswith(QLM), n),
    )
    seeds = sorted({s for c in cells.values() for s in c["seeds"]})
    lines = [
        f"# Evaluation protocol: {pset.name} set",
        "",
        f"Seeds run: {seeds[0]}-{seeds[-1]} ({len(seeds)} of {len(pset.seeds)}); "
        f"loads x measured capacity; {units[0]['max_requests']} requests per run. "
        "Class-weighted SLO attainment, mean (sd over seeds); `bound`: no schedule of the same "
        "arrivals can do better (eval/bound.py); `closed`: share of the distance from the best "
        "baseline to the bound that qlm closes.",
        "",
        "| case | load | bound | "
        + " | ".join(policies)
        + " | best baseline | qlm - best | closed |",
        "|" + "---|" * (len(policies) + 6),
    ]
    wins = total = 0
    for (case, load), c in sorted(cells.items()):
        h = headline(c)
        row = [case, f"{load:g}", _f(h["bound"])]
        for n in policies:
            ws = _weighted(c["policies"].get(n, []))
            row.append(f"{_f(_mean(ws))} ({_f(_sd(ws), '.3f')})" if ws else "-")
        margin = h.get("margin")
        if margin is not None:
            total += 1
            wins += margin >= 0
        row += [h["best"] or "-", _f(margin, "+.3f"), _f(h.get("closed"), ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"qlm at or above the best baseline in {wins} of {total} cells.", ""]
    lines += _top_class_check(cells)
    lines += _details(cells, policies)
    if img:
        lines += ["", "## Plots", ""]
        for case in sorted({k[0] for k in cells}):
            lines.append(f"![{case}]({img}/protocol-{pset.name}-{case}.png)")
    return "\n".join(lines) + "\n"


def _top_class_check(cells: Mapping[tuple[str, float], Mapping[str, Any]]) -> list[str]:
    """The top class alone within capacity must be served: its share of requests x load (its own
    demand, in units of the measured capacity of the whole mix) <= 0.9 -> qlm attains >= 0.99."""
    held, failed = 0, []
    for (case, load), c in sorted(cells.items()):
        ss = c["policies"].get(QLM, [])
        top = c["classes"][0]
        if not ss:
            continue
        n_top = _mean([s["per_class"].get(top, {}).get("requests") or 0 for s in ss]) or 0.0
        n_all = _mean([sum(v.get("requests") or 0 for v in s["per_class"].values()) for s in ss])
        if not n_all or n_top / n_all * load > 0.9:
            continue
        att = _mean(
            [
                s["per_class"][top]["slo_attainment"]
                for s in ss
                if s["per_class"].get(top, {}).get("slo_attainment") is not None
            ]
        )
        if att is not None and att >= 0.99:
            held += 1
        else:
            failed.append(f"{case} load {load:g}: {_f(att)}")
    total = held + len(failed)
    text = f"Top class at >= 0.99 wherever its own demand is <= 0.9 x capacity: {held} of {total}"
    return [text + (f" (below: {'; '.join(failed)})." if failed else "."), ""]


def _details(
    cells: Mapping[tuple[str, float], Mapping[str, Any]], policies: list[str]
) -> list[str]:
    lines = [
        "## Per class and the rest (means over seeds)",
        "",
        "| case | load | policy | per-class attainment | goodput req/s | TTFT p50 / p99 s (top "
        "class) | GPU busy | swaps/h | LP / fallback / incremental |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (case, load), c in sorted(cells.items()):
        classes = c["classes"]
        for n in policies:
            ss = c["policies"].get(n, [])
            if not ss:
                continue

            def m(key: str, ss: Sequence[Mapping[str, Any]] = ss) -> float | None:
                return _mean([s[key] for s in ss if s.get(key) is not None])

            pcs = []
            for cl in classes:
                v = _mean(
                    [
                        s["per_class"][cl]["slo_attainment"]
                        for s in ss
                        if s["per_class"].get(cl, {}).get("slo_attainment") is not None
                    ]
                )
                pcs.append(_f(v, ".2f"))
            top = classes[0]
            p50 = _mean(
                [s["per_class"][top]["ttft_p50_s"] or 0.0 for s in ss if top in s["per_class"]]
            )
            p99 = _mean(
                [s["per_class"][top]["ttft_p99_s"] or 0.0 for s in ss if top in s["per_class"]]
            )
            swaps = _mean(
                [
                    (s["lso"]["model_swaps_warm"] + s["lso"]["model_swaps_cold"])
                    * 3600.0
                    / max(s["makespan_s"], 1e-9)
                    for s in ss
                ]
            )
            full = [max(1, s["full_plans"]) for s in ss]
            lp = _mean([s["lp_plans"] / f for s, f in zip(ss, full, strict=True)])
            fb = _mean([s["fallback_plans"] / f for s, f in zip(ss, full, strict=True)])
            inc = _mean([1.0 - s["full_plans"] / max(1, s["plan_calls"]) for s in ss])
            lines.append(
                f"| {case} | {load:g} | {n} | {' / '.join(pcs)} | {_f(m('goodput_rps'), '.2f')} | "
                f"{_f(p50, '.1f')} / {_f(p99, '.1f')} | {_f(m('gpu_busy_share'), '.2f')} | "
                f"{_f(swaps, '.0f')} | {_f(lp, '.2f')} / {_f(fb, '.2f')} / {_f(inc, '.2f')} |"
            )
    return lines


def plot(units: Sequence[Mapping[str, Any]], pset: ProtocolSet, img_dir: Path) -> list[Path]:
    from qlm_backend.eval.plots import _plt

    plt = _plt()
    cells = collect(units)
    paths = []
    for case in sorted({k[0] for k in cells}):
        loads = sorted(ld for c, ld in cells if c == case)
        classes = cells[(case, loads[0])]["classes"]
        panels = ["weighted", *classes]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4), squeeze=False)
        names = sorted({n for ld in loads for n in cells[(case, ld)]["policies"]})
        for ax, panel in zip(axes[0], panels, strict=True):
            for n in names:
                ys, es = [], []
                for ld in loads:
                    ss = cells[(case, ld)]["policies"].get(n, [])
                    if panel == "weighted":
                        vs = _weighted(ss)
                    else:
                        vs = [
                            s["per_class"][panel]["slo_attainment"]
                            for s in ss
                            if s["per_class"].get(panel, {}).get("slo_attainment") is not None
                        ]
                    ys.append(_mean(vs) if vs else float("nan"))
                    es.append(_sd(vs) if vs else 0.0)
                ax.errorbar(loads, ys, yerr=es, marker="o", ms=3, capsize=2, label=n)
            bs = []
            for ld in loads:
                bb = [b for b in cells[(case, ld)]["bound"] if b]
                if panel == "weighted":
                    vals = [b["weighted_attainment"] for b in bb]
                else:
                    vals = [b["per_class"].get(panel, {}).get("slo_attainment") for b in bb]
                    vals = [v for v in vals if v is not None]
                bs.append(_mean(vals) if vals else float("nan"))
            ax.plot(loads, bs, "k--", label="bound")
            ax.set_title(f"{case}: {panel}")
            ax.set_xlabel("load (x measured capacity)")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("SLO attainment")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        img_dir.mkdir(parents=True, exist_ok=True)
        path = img_dir / f"protocol-{pset.name}-{case}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(units: Sequence[Mapping[str, Any]], pset: ProtocolSet, out: Path) -> Path:
    """OUT/protocol-<set>.md and OUT/img/protocol-<set>-<case>.png."""
    out.mkdir(parents=True, exist_ok=True)
    img = None
    try:
        if units:
            plot(units, pset, out / "img")
            img = "img"
    except ImportError:
        pass
    path = out / f"protocol-{pset.name}.md"
    path.write_text(markdown(units, pset, img))
    return path


__all__ = ["collect", "headline", "markdown", "plot", "write_report"]
