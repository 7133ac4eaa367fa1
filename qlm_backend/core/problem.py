"""The planning problem as arrays: groups x pruned candidate instances, with work, swap cost and
the base load of each instance. Shared by the LP and the fallback heuristic.

Pruning: a group may only go to its k instances with the earliest estimated finish (base load +
swap + its own work), which keeps the LP at G x k columns instead of G x I (DESIGN.md section 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qlm_backend.core.groups import RequestGroup
from qlm_backend.core.instances import InstanceState
from qlm_backend.core.policies.base import PlanContext


@dataclass
class Problem:
    now: float
    group_ids: list[str]
    group_models: list[str]
    n: np.ndarray  # (G,) requests per group
    weight: np.ndarray  # (G,) class weight
    slack_s: np.ndarray  # (G,) earliest deadline - now
    prefill_s: np.ndarray  # (G, k) slot-to-first-token time on each candidate
    instance_ids: list[str]
    base_s: np.ndarray  # (I,) time until each instance can start new work
    current: list[str | None]  # (I,) model running or loading
    cand: np.ndarray  # (G, k) instance index, -1 = none
    work_s: np.ndarray  # (G, k) instance-seconds of the whole group there
    swap_s: np.ndarray  # (G, k) load time if the candidate must change model, else 0

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)


def build_problem(
    ctx: PlanContext,
    groups: Sequence[RequestGroup],
    now: float,
    *,
    k: int,
    oracle: bool = False,
    extra_base_s: dict[str, float] | None = None,
) -> Problem:
    est = ctx.estimator
    insts: list[InstanceState] = [i for i in ctx.instances.values() if i.healthy]
    iids = [i.instance_id for i in insts]
    base = np.zeros(len(insts))
    current: list[str | None] = []
    for j, inst in enumerate(insts):
        cur = inst.loading or inst.model
        current.append(cur)
        if inst.loading is not None:
            base[j] = max(0.0, inst.ready_s - now)
        elif inst.model is not None and inst.in_flight:
            # When the first slot frees (the estimator's slot model, so plan and forecast agree).
            base[j] = est.first_slot_s(inst, ctx.requests, now, oracle=oracle)
        if extra_base_s:
            base[j] += extra_base_s.get(inst.instance_id, 0.0)
    G = len(groups)
    kk = max(1, min(k, len(insts)))
    cand = np.full((G, kk), -1, dtype=np.int64)
    work = np.zeros((G, kk))
    swap = np.zeros((G, kk))
    pre = np.zeros((G, kk))
    n = np.array([len(g) for g in groups], dtype=float)
    weight = np.array([ctx.classes[g.slo_class].weight for g in groups])
    slack = np.array([g.deadline_s - now for g in groups])
    by_model: dict[str, list[int]] = {}
    for gi, g in enumerate(groups):
        by_model.setdefault(g.model, []).append(gi)
    for model, gis in by_model.items():
        allowed = [j for j, inst in enumerate(insts) if est.can_serve(model, inst.spec)]
        if not allowed:
            continue
        unit = np.empty(len(allowed))
        lsw = np.empty(len(allowed))
        pf = np.empty(len(allowed))
        for a, j in enumerate(allowed):
            inst = insts[j]
            prof = est.profile(model, inst.spec)
            unit[a] = prof.token_cost_s
            pf[a] = prof.prefill_first_s
            if current[j] == model:
                lsw[a] = 0.0
            else:
                warm = ctx.warm.is_warm(inst.spec.host, model)
                lsw[a] = prof.load_warm_s if warm else prof.load_cold_s
            # group work = n * (mean_out * token_cost + stall); fold the stall per request in below
        stall = np.array([est.profile(model, insts[j].spec).prefill_stall_s for j in allowed])
        gidx = np.array(gis)
        # Per-group mean output tokens (by class) and, for the oracle, the true lengths.
        tokens = np.empty(len(gis))
        for r, gi in enumerate(gis):
            g = groups[gi]
            if oracle:
                tot = 0.0
                for rid in g.request_ids:
                    st = ctx.requests[rid]
                    t = st.req.true_output_tokens
                    tot += (
                        max(1, t - st.tokens_done)
                        if t is not None
                        else est.output_stats(model, g.slo_class)[0]
                    )
                tokens[r] = tot
            else:
                tokens[r] = est.output_stats(model, g.slo_class)[0] * len(g)
        w = tokens[:, None] * unit[None, :] + n[gidx][:, None] * stall[None, :]
        finish = base[np.array(allowed)][None, :] + lsw[None, :] + w
        kc = min(kk, len(allowed))
        if kc < len(allowed):
            part = np.argpartition(finish, kc - 1, axis=1)[:, :kc]
        else:
            part = np.tile(np.arange(len(allowed)), (len(gis), 1))
        # Sort the k candidates by estimated finish so column 0 is the greedy choice.
        fsel = np.take_along_axis(finish, part, axis=1)
        orderk = np.argsort(fsel, axis=1)
        part = np.take_along_axis(part, orderk, axis=1)
        allowed_arr = np.array(allowed)
        cand[gidx, :kc] = allowed_arr[part]
        work[gidx, :kc] = np.take_along_axis(w, part, axis=1)
        swap[gidx, :kc] = lsw[part]
        pre[gidx, :kc] = pf[part]
    return Problem(
        now=now,
        group_ids=[g.group_id for g in groups],
        group_models=[g.model for g in groups],
        n=n,
        weight=weight,
        slack_s=slack,
        prefill_s=pre,
        instance_ids=iids,
        base_s=base,
        current=current,
        cand=cand,
        work_s=work,
        swap_s=swap,
    )


__all__ = ["Problem", "build_problem"]
