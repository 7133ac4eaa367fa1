"""Fallback planner: swap-aware earliest-deadline-first with slack ordering.

Groups are taken in deadline order (lost causes, whose deadline is already past, last); each goes to
the candidate instance where it starts earliest, counting a model swap only the first time a model
is added to an instance's queue, and preferring an instance where it still meets its deadline. A
group that would meet its deadline only in part is split: the part that fits stays, the rest tries
the next candidate (load balancing a burst over several instances). O(G k), no solver.
"""

from __future__ import annotations

import math

import numpy as np

from qlm_backend.core.policies.qlm.problem import Problem

Assignment = list[tuple[int, int, int]]  # (group index, instance index, number of requests)


def swap_aware_edf(
    p: Problem, hopeless_before_slack_s: float = math.inf, hysteresis: float = 0.0
) -> Assignment:
    k = p.cand.shape[1]
    models_on: list[set[str]] = [{c} if c is not None else set() for c in p.current]
    lost = p.slack_s < p.prefill_s[:, 0]
    # Tiers: meetable, then hopeless (EDF among them), then far-deadline work (ordering.py).
    tier = np.where(lost, 1, np.where(p.slack_s > hopeless_before_slack_s, 2, 0))
    order = np.lexsort((-p.weight, p.slack_s, tier))
    out: Assignment = []
    # Flat Python lists, not numpy scalars, in the loop (a third of its time at 100k queued was
    # numpy element access; nested lists would be one tracked object per group for the garbage
    # collector to count). The same float64 arithmetic in the same order, so the same plan.
    cand, work, swap = p.cand.ravel().tolist(), p.work_s.ravel().tolist(), p.swap_s.ravel().tolist()
    pre, slack, n_of = p.prefill_s.ravel().tolist(), p.slack_s.tolist(), p.n.tolist()
    cur: list[float] = p.base_s.tolist()  # when each instance's queue frees
    models = p.group_models
    prev = p.prev_i.tolist() if p.prev_i is not None and hysteresis > 0 else None
    stay = 1.0 - hysteresis
    for g in order.tolist():
        n_g = n_of[g]
        remaining = int(n_g)
        row = g * k
        if remaining == 0 or cand[row] < 0:
            continue
        model = models[g]
        slack_g = slack[g]
        used: set[int] = set()
        home = prev[g] if prev is not None else -1
        while remaining > 0:
            best_c, best_key = -1, (True, math.inf)
            for c in range(row, row + k):
                i = cand[c]
                if i < 0:
                    break
                if i in used:
                    continue
                start = cur[i] + (0.0 if model in models_on[i] else swap[c])
                miss = start + pre[c] > slack_g
                finish = start + work[c] * remaining / n_g
                key = (miss, finish if i != home else finish * stay)
                if key < best_key:
                    best_c, best_key = c, key
            if best_c < 0:
                break
            i = cand[best_c]
            per = work[best_c] / n_g
            start = cur[i] + (0.0 if model in models_on[i] else swap[best_c])
            take = remaining
            if not best_key[0] and per > 0 and len(used) + 1 < k:
                fit = int((slack_g - pre[best_c] - start) / per) + 1
                take = max(1, min(remaining, fit))
            out.append((g, i, take))
            cur[i] = start + per * take
            models_on[i].add(model)
            used.add(i)
            remaining -= take
        if remaining > 0:
            # Every candidate used: the rest goes with the first placement.
            g0, i0, t0 = out[-1]
            out[-1] = (g0, i0, t0 + remaining)
    return out


__all__ = ["Assignment", "swap_aware_edf"]
