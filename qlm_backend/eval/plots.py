"""PNG plots: SLO attainment vs load (sweeps), TTFT CDF per class, per-instance model timeline.

matplotlib is imported lazily with the Agg backend (no display on servers); without matplotlib the
plots are skipped with a note and the tables and results.json are still written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlm_backend.eval.simulator import SimResult


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attainment_vs_load(runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    loads = [r["load"] for r in runs]
    names: list[str] = []
    for r in runs:
        names += [n for n in r["policies"] if n not in names]
    for name in names:
        ys = [r["policies"].get(name, {}).get("slo_attainment") for r in runs]
        ax.plot(loads, [np.nan if y is None else y for y in ys], marker="o", label=name)
    ax.set_xlabel("offered load (x estimated fleet capacity)")
    ax.set_ylabel("SLO attainment (all requests)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"scenario {runs[0]['scenario']}: SLO attainment vs load")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ttft_cdf(
    results: Mapping[str, SimResult], classes: Sequence[tuple[str, float]], path: Path, title: str
) -> Path:
    """One panel per class; the dashed line is the class's TTFT SLO. Requests never served run
    off the right edge (the CDF stays below 1 by their share)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 3.6), squeeze=False)
    for ax, (cls, slo) in zip(axes[0], classes, strict=True):
        for name, res in results.items():
            recs = [r for r in res.records if r.req.slo_class == cls]
            if not recs:
                continue
            t = np.sort(
                [r.first_token_s - r.req.arrival_s for r in recs if r.first_token_s is not None]
            )
            y = np.arange(1, len(t) + 1) / len(recs)
            ax.step(t, y, where="post", label=name)
        ax.axvline(slo, color="k", ls="--", lw=0.8)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("share of requests")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{cls} (SLO {slo:g} s)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def timeline(results: Mapping[str, SimResult], path: Path, title: str) -> Path:
    """For each policy a panel, one row per instance: which model served when; hatched = loading."""
    plt = _plt()
    models = sorted({s.model or "-" for res in results.values() for s in res.segments})
    colors = {m: plt.cm.tab10(k % 10) for k, m in enumerate(models)}
    n = len(results)
    insts = sorted({s.instance_id for res in results.values() for s in res.segments})
    fig, axes = plt.subplots(
        n, 1, figsize=(10, 0.45 * len(insts) * n + 1.2), squeeze=False, sharex=True
    )
    for ax, (name, res) in zip(axes[:, 0], results.items(), strict=True):
        for s in res.segments:
            y = insts.index(s.instance_id)
            c = colors[s.model or "-"]
            hatch = "////" if s.kind != "serve" else None
            ax.barh(
                y,
                s.end_s - s.start_s,
                left=s.start_s,
                color=c,
                hatch=hatch,
                edgecolor="k" if hatch else c,
                lw=0.3,
            )
        ax.set_yticks(range(len(insts)), insts, fontsize=7)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("virtual time (s); hatched: model loading")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[m]) for m in models]
    fig.legend(handles, models, loc="upper right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["attainment_vs_load", "timeline", "ttft_cdf"]
