"""Helpers shared by policies: pruning the previous plan, entries from request lists, eviction
victims, and the 'designate an instance for an absent model' rule of the baselines."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from qlm_backend.core.estimator import normal_cdf
from qlm_backend.core.instances import InstanceState
from qlm_backend.core.plan import PlanContext, QueueEntry
from qlm_backend.core.request import RequestState, Status


def prune_previous(ctx: PlanContext) -> dict[str, list[QueueEntry]]:
    """The last plan's queues with only still-QUEUED requests, on still-healthy instances."""
    out: dict[str, list[QueueEntry]] = {}
    if ctx.previous is None:
        return out
    for iid, entries in ctx.previous.queues.items():
        inst = ctx.instances.get(iid)
        if inst is None or not inst.healthy:
            continue
        kept = []
        for e in entries:
            ids = tuple(
                r
                for r in e.request_ids
                if (st := ctx.requests.get(r)) is not None
                and st.status is Status.QUEUED
                and st.group_id == e.group_id
            )
            if ids:
                kept.append(QueueEntry(e.group_id, ids))
        if kept:
            out[iid] = kept
    return out


def entries_from(rids: Iterable[str], ctx: PlanContext) -> list[QueueEntry]:
    """Consecutive requests of one group become one entry (keeps the given order)."""
    out: list[QueueEntry] = []
    cur_g: str | None = None
    cur: list[str] = []
    for r in rids:
        g = ctx.requests[r].group_id
        assert g is not None
        if g != cur_g and cur:
            out.append(QueueEntry(cur_g or "", tuple(cur)))
            cur = []
        cur_g = g
        cur.append(r)
    if cur:
        out.append(QueueEntry(cur_g or "", tuple(cur)))
    return out


def queued_states(ctx: PlanContext) -> list[RequestState]:
    return [ctx.requests[r] for g in ctx.groups for r in g.request_ids]


def serving(ctx: PlanContext, model: str, exclude: set[str]) -> list[InstanceState]:
    """Healthy instances running or loading `model`."""
    return [
        i
        for i in ctx.instances.values()
        if i.healthy and (i.model == model or i.loading == model) and i.instance_id not in exclude
    ]


def designate(ctx: PlanContext, model: str, taken: set[str]) -> InstanceState | None:
    """Pick the instance to switch to an absent model: an empty one first, then the least busy."""
    best: tuple[int, int, str] | None = None
    pick = None
    for inst in ctx.instances.values():
        if not inst.healthy or inst.instance_id in taken or inst.loading is not None:
            continue
        if not ctx.estimator.can_serve(model, inst.spec):
            continue
        key = (0 if inst.model is None else 1, len(inst.in_flight), inst.instance_id)
        if best is None or key < best:
            best, pick = key, inst
    return pick


def victims(
    inst: InstanceState, ctx: PlanContext, now: float, *, below_priority: int | None
) -> list[RequestState]:
    """In-flight requests that may be evicted: their first token is out (their TTFT SLO is met, so
    eviction costs recompute work, not an SLO), lower class than `below_priority` when given, under
    the per-request eviction cap; the longest-remaining first (they free a slot for longest)."""
    out = []
    for rid in inst.in_flight:
        st = ctx.requests[rid]
        if st.first_token_s is None or st.evictions >= ctx.config.max_evictions_per_request:
            continue
        if below_priority is not None and st.priority <= below_priority:
            continue
        out.append(st)
    mean = {}
    for st in out:
        key = (st.req.model, st.req.slo_class)
        if key not in mean:
            mean[key] = ctx.estimator.output_stats(*key)[0]
    out.sort(
        key=lambda s: (-(mean[(s.req.model, s.req.slo_class)] - s.tokens_done), s.req.request_id)
    )
    return out


def p_meet_at(deadline_s: float, t_s: float, now: float, rel_std: float) -> float:
    sd = max(0.5, rel_std * max(0.0, t_s - now))
    return normal_cdf((deadline_s - t_s) / sd)


def earliest(seq: Sequence[RequestState]) -> float:
    return min((s.req.deadline_s for s in seq), default=math.inf)


__all__ = [
    "designate",
    "earliest",
    "entries_from",
    "p_meet_at",
    "prune_previous",
    "queued_states",
    "serving",
    "victims",
]


def steal_for_idle(queues: dict[str, list[QueueEntry]], ctx: PlanContext) -> None:
    """Late binding across instances: an instance with free slots and nothing of its model queued
    takes requests of its model that another instance would not start now (those past the owner's
    free room), earliest first. Fixes plans that put a whole group on one instance."""
    for iid, inst in ctx.instances.items():
        if not inst.usable or inst.room <= 0:
            continue
        mine = queues.get(iid, [])
        if any(ctx.requests[e.request_ids[0]].req.model == inst.model for e in mine):
            continue
        want = inst.room
        taken: list[QueueEntry] = []
        for oid, entries in queues.items():
            if oid == iid or want <= 0:
                continue
            owner = ctx.instances[oid]
            pos = 0
            free = owner.room if owner.usable else 0
            new_entries: list[QueueEntry] = []
            for e in entries:
                model = ctx.requests[e.request_ids[0]].req.model
                if model != inst.model or want <= 0:
                    new_entries.append(e)
                    pos += len(e.request_ids)
                    continue
                keep_n = max(0, free - pos)
                ids = e.request_ids
                move = ids[keep_n : keep_n + want]
                rest = ids[:keep_n] + ids[keep_n + len(move) :]
                if move:
                    taken.append(QueueEntry(e.group_id, move))
                    want -= len(move)
                if rest:
                    new_entries.append(QueueEntry(e.group_id, rest))
                pos += len(rest)
            queues[oid] = new_entries
        if taken:
            queues[iid] = taken + mine
