"""Figures of one simulated run: SLO attainment, throughput, TTFT, GPU busy share, LSO counts,
planner time. Plain dicts so they go straight into results.json.

Definitions (so that numbers are comparable across policies):
- SLO attainment: share of ALL requests of the window whose first token came by its deadline
  (arrival + class TTFT SLO); rejected, refused and unfinished requests count as misses.
- Class-weighted attainment (the objective every policy is judged by): the same, each request
  counted with its class's weight (the scenario's `weight`, e.g. interactive 10, batch 2 and 1):
  sum of weights of requests that met their SLO / sum of weights of all requests.
- Throughput: finished requests (and their output tokens) per second of makespan, from the first
  arrival to the last completion; every policy serves the same window to the end (drain), so a
  policy that wastes GPU time (thrashing swaps, recompute) takes longer and scores lower.
- Goodput: requests that met their SLO per second of makespan.
- TTFT percentiles are over the requests that got a first token (`served` says how many); every
  percentile interpolates linearly between the closest ranks (qlm_backend/stats.py).
- GPU busy share: engine iteration time x GPUs of the instance over GPUs x makespan (model loads
  are not busy time: the GPU serves nothing meanwhile).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qlm_backend.eval.simulator import SimResult
from qlm_backend.stats import percentile


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def weighted(
    per_class: Mapping[str, Mapping[str, Any]], weights: Mapping[str, float]
) -> float | None:
    """Class-weighted attainment from per-class attainment and request counts."""
    num = den = 0.0
    for c, pc in per_class.items():
        n, a = pc.get("requests") or 0, pc.get("slo_attainment")
        w = weights.get(c, 1.0)
        den += w * n
        num += w * n * (a or 0.0)
    return num / den if den > 0 else None


def summarize(
    res: SimResult, class_order: list[str], weights: Mapping[str, float] | None = None
) -> dict[str, Any]:
    recs = res.records
    n = len(recs)
    makespan = max(1e-9, res.end_s - res.start_s)
    met_all = 0
    finished = 0
    out_tokens = 0
    per_class: dict[str, dict[str, Any]] = {}
    ttfts: dict[str, list[float]] = {c: [] for c in class_order}
    counts: dict[str, list[int]] = {c: [0, 0] for c in class_order}  # [met, total]
    outcomes: dict[str, int] = {}
    waits: dict[str, tuple[list[float], list[float]]] = {}  # class -> (router wait, engine queue)
    for rec in recs:
        c = rec.req.slo_class
        ttfts.setdefault(c, [])
        counts.setdefault(c, [0, 0])
        counts[c][1] += 1
        outcomes[rec.outcome or "open"] = outcomes.get(rec.outcome or "open", 0) + 1
        if rec.first_token_s is not None:
            ttfts[c].append(rec.first_token_s - rec.req.arrival_s)
            # Where the first token's wait went: in the router until the pull, then in the engine.
            pulled = rec.pulled_s if rec.pulled_s is not None else rec.req.arrival_s
            scheduled = rec.scheduled_s if rec.scheduled_s is not None else pulled
            waits.setdefault(c, ([], []))
            waits[c][0].append(pulled - rec.req.arrival_s)
            waits[c][1].append(scheduled - pulled)
            if rec.first_token_s <= rec.deadline_s + 1e-9:
                met_all += 1
                counts[c][0] += 1
        if rec.outcome == "finished":
            finished += 1
            out_tokens += rec.tokens
    for c in counts:
        met, tot = counts[c]
        per_class[c] = {
            "requests": tot,
            "slo_attainment": _r(met / tot if tot else None),
            "ttft_p50_s": _r(percentile(ttfts[c], 50), 3),
            "ttft_p99_s": _r(percentile(ttfts[c], 99), 3),
            "served": len(ttfts[c]),
            "router_wait_p50_s": _r(percentile(waits.get(c, ([], []))[0], 50), 3),
            "engine_queue_p50_s": _r(percentile(waits.get(c, ([], []))[1], 50), 3),
        }
    cnt = res.counters
    core = res.core_counters
    lso = {
        # The executor's LSO counts (router/executor.py), as the router's qlm_lso_total counts them.
        "pulls": cnt.get("pull", 0),
        "evictions": cnt.get("evict", 0) + cnt.get("evict_swap", 0),
        "kv_swaps_out": cnt.get("kv_swap_out", 0),
        "kv_swaps_in": cnt.get("kv_swap_in", 0),
        "resumes_recompute": cnt.get("resume_recompute", 0),
        # Share of resumed requests' context still in the engine's prefix cache when pulled again.
        "resume_cache_hit_share": _r(
            cnt.get("resume_cached_tokens", 0) / cnt["resume_tokens"]
            if cnt.get("resume_tokens")
            else None
        ),
        "model_swaps_warm": cnt.get("swap_model_warm", 0),
        "model_swaps_cold": cnt.get("swap_model_cold", 0),
        "rebalances": cnt.get("rebalance", 0),
        "keep_warm": cnt.get("keep_warm", 0),
        "release": cnt.get("release", 0),
        "rejected": outcomes.get("rejected", 0),
        "refused": outcomes.get("refused", 0),
        "unfinished": outcomes.get("unfinished", 0),
    }
    anomalies = {
        k: cnt[k]
        for k in (
            "pull_to_wrong_model",
            "evict_not_in_engine",
            "swap_on_busy_engine",
            "warm_flag_mismatch",
            "stalled",
        )
        if cnt.get(k)
    }
    plan_ms = [s * 1e3 for s in res.planner_s]
    full_ms = [s * 1e3 for s in res.full_planner_s]
    return {
        "label": res.label,
        "policy": res.policy,
        "requests": n,
        "slo_attainment": _r(met_all / n if n else None),
        "weighted_attainment": _r(weighted(per_class, weights or {})),
        "throughput_rps": _r(finished / makespan),
        "output_tokens_per_s": _r(out_tokens / makespan, 1),
        "goodput_rps": _r(met_all / makespan),
        "makespan_s": _r(makespan, 2),
        "gpu_busy_share": _r(res.busy_gpu_s / (res.gpus * makespan)),
        "per_class": per_class,
        "lso": lso,
        "planner_ms_p50": _r(percentile(plan_ms, 50), 3),
        "planner_ms_p99": _r(percentile(plan_ms, 99), 3),
        "planner_full_ms_p50": _r(percentile(full_ms, 50), 3),
        "planner_full_ms_p99": _r(percentile(full_ms, 99), 3),
        "plan_calls": len(plan_ms),
        "full_plans": len(full_ms),
        "lp_plans": core.get("path_lp", 0),
        "fallback_plans": core.get("path_fallback", 0),
        "outcomes": outcomes,
        "anomalies": anomalies,
        "sim_wall_s": _r(res.wall_s, 2),
    }


__all__ = ["summarize", "weighted"]
