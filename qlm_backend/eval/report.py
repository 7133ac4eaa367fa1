"""The terminal table and results.json.

One row per policy (and per ablation), the figures of metrics.py; the ratio lines come last:
qlm/fcfs and qlm/edf for SLO attainment and throughput. (qlm-true-lengths is no base: it is QLM
with the true output lengths, not an upper bound.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RATIO_BASES = ("fcfs", "edf")


def _fmt(x: Any, spec: str) -> str:
    if x is None:
        return "-"
    return format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "n/a"
    if b == 0:
        return "inf" if a > 0 else "n/a"
    return f"{a / b:.2f}x"


def table(run: Mapping[str, Any], class_order: Sequence[str]) -> str:
    """The summary of one (scenario, load) run as fixed-width text."""
    pols: Mapping[str, Mapping[str, Any]] = run["policies"]
    head = ["policy", "weighted", "attain"] + [f"{c[:11]}" for c in class_order]
    head += ["req/s", "tok/s", "busy", "evict", "kvswp", "swp w/c"]
    head += [f"p50 {c[:11]}" for c in class_order] + [f"p99 {c[:11]}" for c in class_order]
    head += ["plan p50/p99 ms", "fallbk"]
    rows = [head]
    for name, p in pols.items():
        pc = p["per_class"]
        lso = p["lso"]
        row = [name, _fmt(p.get("weighted_attainment"), ".3f"), _fmt(p["slo_attainment"], ".3f")]
        row += [_fmt(pc.get(c, {}).get("slo_attainment"), ".3f") for c in class_order]
        row += [
            _fmt(p["throughput_rps"], ".2f"),
            _fmt(p["output_tokens_per_s"], ".0f"),
            _fmt(p["gpu_busy_share"], ".2f"),
            str(lso["evictions"]),
            str(lso["kv_swaps_out"]),
            f"{lso['model_swaps_warm']}/{lso['model_swaps_cold']}",
        ]
        row += [_fmt(pc.get(c, {}).get("ttft_p50_s"), ".1f") for c in class_order]
        row += [_fmt(pc.get(c, {}).get("ttft_p99_s"), ".1f") for c in class_order]
        row += [
            f"{_fmt(p['planner_ms_p50'], '.2f')}/{_fmt(p['planner_ms_p99'], '.1f')}",
            str(p["fallback_plans"]),
        ]
        rows.append(row)
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    lines = [
        f"scenario {run['scenario']}  load {run['load']:g}  requests {run['requests']}  "
        f"capacity {run['capacity_rps']:.2f} req/s  trace {Path(run['trace']).name}  seed {run['seed']}"
    ]
    for k, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    b = run.get("bound")
    if b is not None:
        pcb = b["per_class"]
        lines.append(
            f"upper bound (eval/bound.py, {b['method']} {b['status']}, {b['solve_s']:.2f} s): "
            f"attain {_fmt(b['slo_attainment'], '.3f')}  "
            f"weighted {_fmt(b['weighted_attainment'], '.3f')}  "
            + "  ".join(
                f"{c} {_fmt(pcb.get(c, {}).get('slo_attainment'), '.3f')}" for c in class_order
            )
        )
    lines.append(ratio_line(run))
    return "\n".join(lines)


def ratios(run: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    pols = run["policies"]
    out: dict[str, dict[str, str]] = {}
    if "qlm" not in pols:
        return out
    q = pols["qlm"]
    for b in RATIO_BASES:
        if b in pols:
            out[f"qlm/{b}"] = {
                "slo_attainment": _ratio(q["slo_attainment"], pols[b]["slo_attainment"]),
                "throughput": _ratio(q["throughput_rps"], pols[b]["throughput_rps"]),
            }
    return out


def ratio_line(run: Mapping[str, Any]) -> str:
    rs = ratios(run)
    if not rs:
        if "qlm" not in run["policies"]:
            return "ratios: qlm not in this run"
        return f"ratios: no base ({', '.join(RATIO_BASES)}) in this run"
    parts = [f"{k}: attain {v['slo_attainment']} thr {v['throughput']}" for k, v in rs.items()]
    return "ratios  " + "  |  ".join(parts)


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


__all__ = ["RATIO_BASES", "ratio_line", "ratios", "table", "write_json"]
