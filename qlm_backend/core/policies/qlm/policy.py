"""QLM: the global planner (LP or swap-aware EDF fallback) over request groups, plus eviction,
swap hysteresis, warm start and shedding."""

from __future__ import annotations

import time
from collections.abc import Callable

from qlm_backend.core.estimator import GroupForecast
from qlm_backend.core.instances import InstanceState
from qlm_backend.core.lso import EngineLoad
from qlm_backend.core.plan import Plan, PlanContext, QueueEntry
from qlm_backend.core.policies.base import PolicyTraits
from qlm_backend.core.policies.common import p_meet_at, prune_previous, steal_for_idle, victims
from qlm_backend.core.policies.qlm.planner import GlobalPlanner, SolverMode
from qlm_backend.core.policies.qlm.shedding import shed_reason
from qlm_backend.core.request import Request, RequestState
from qlm_backend.engine.perf import PerfModel


class QlmPolicy:
    name = "qlm"

    def __init__(
        self,
        *,
        solver: SolverMode = "auto",
        timer: Callable[[], float] = time.perf_counter,
        oracle: bool = False,
        evict: bool = True,
        warm_start: bool = True,
        shed: bool = True,
    ) -> None:
        self.planner = GlobalPlanner(
            oracle=oracle, solver=solver, timer=timer, policy_name=self.name
        )
        self.evict = evict
        self.traits = PolicyTraits(
            bounded_pull=True,
            engine_scheduling="priority",
            pull_bound="work",
            warm_start=warm_start,
            sheds=shed,
            uses_true_lengths=oracle,
        )

    # ------------------------------------------------------------------ admission
    def admit(self, req: Request, ctx: PlanContext, now: float) -> str | None:
        """Shed a sheddable request whose deadline cannot be met where it would stand in any
        queue (rejecting it at once beats letting it time out after occupying a slot, and keeps
        an overload from burying the classes above it: shedding.py)."""
        return shed_reason(req, ctx, now)

    # ------------------------------------------------------------------ planning
    def plan(self, ctx: PlanContext, now: float) -> Plan:
        forecasts: dict[str, list[GroupForecast]] = {}
        if ctx.trigger == "incremental" and ctx.previous is not None:
            keep = prune_previous(ctx)
            touched = ctx.new_groups
            keep = {i: [e for e in es if e.group_id not in touched] for i, es in keep.items()}
            kept = {e.group_id for es in keep.values() for e in es}
            todo = [g for g in ctx.groups if g.group_id not in kept]
            if not todo:
                steal_for_idle(keep, ctx)
                return Plan(queues=keep)
            queues, decision, forecasts = self.planner.plan(
                ctx, now, todo, keep=keep, path_override="incremental"
            )
            decision = decision.__class__(
                **{**decision.__dict__, "reason": f"incremental: {decision.reason}"}
            )
        else:
            queues, decision, forecasts = self.planner.plan(ctx, now)
        steal_for_idle(queues, ctx)
        evictions = self._evictions(ctx, queues, forecasts, now) if self.evict else []
        return Plan(queues=queues, evictions=evictions, decision=decision)

    def _evictions(
        self,
        ctx: PlanContext,
        queues: dict[str, list[QueueEntry]],
        forecasts: dict[str, list[GroupForecast]],
        now: float,
    ) -> list[tuple[str, str]]:
        """Evict running requests already past their first token (of any class by default, lower
        classes first: config.evict_victims) when a queued group would miss its deadline waiting
        for a slot, and the eviction lifts its P(meet) by at least evict_gain_min. A per-instance
        cooldown keeps it from thrashing. Victims of any class, as SHEPHERD evicts: a request
        whose first token is out has met its TTFT SLO, so the eviction costs a KV swap or a
        recompute, not an SLO (qlm-eval load 2, seeds 0/1: wa 0.867/0.830 -> 0.919/0.890 and
        wc 0.644/0.667 -> 0.886/0.892 with the other changes of that commit)."""
        cfg = ctx.config
        cooldown = (
            cfg.evict_cooldown_s if cfg.qlm_evict_cooldown_s is None else cfg.qlm_evict_cooldown_s
        )
        out: list[tuple[str, str]] = []
        for iid, entries in queues.items():
            inst = ctx.instances[iid]
            fcs = forecasts.get(iid)
            if not entries or not fcs or len(fcs) != len(entries) or not inst.in_flight:
                continue
            if inst.loading is not None or now - inst.last_evict_s < cooldown:
                continue
            est = ctx.estimator
            head = ctx.requests[entries[0].request_ids[0]].req
            if head.model != inst.model:
                # A swap is pending behind a drain: evict everything if all of it may go.
                f = fcs[0]
                prio = ctx.classes[head.slo_class].priority
                vs = victims(inst, ctx, now, below_priority=prio)
                if f.p_meet >= cfg.evict_p_threshold or len(vs) != len(inst.in_flight):
                    continue
                prof = est.profile(head.model, inst.spec)
                warm = ctx.warm.is_warm(inst.spec.host, head.model)
                t = now + (prof.load_warm_s if warm else prof.load_cold_s) + prof.prefill_first_s
                if (
                    p_meet_at(head.deadline_s, t, now, cfg.rel_std_floor) - f.p_meet
                    >= cfg.evict_gain_min
                ):
                    out.extend(
                        (v.req.request_id, f"swap to {head.model} for {f.group_id}") for v in vs
                    )
                continue
            out.extend(self._slot_evictions(ctx, inst, entries, fcs, now))
        return out

    def _slot_evictions(
        self,
        ctx: PlanContext,
        inst: InstanceState,
        entries: list[QueueEntry],
        fcs: list[GroupForecast],
        now: float,
    ) -> list[tuple[str, str]]:
        """Evictions that let a queued group at risk into the engine now. Which requests wait is
        what the executor would do (core/lso.py: the count bound and, for a work-bounded policy,
        the prefill and KV caps). Eviction must pay for itself: the victim's re-prefill delays
        everything queued behind on this instance, and it is capacity taken from the marginal
        request (the lowest class on this queue that would still meet its deadline, or one like
        the request let in when none would: in an overload of its own class an eviction only
        reorders that class and burns a prefill). The larger of the two expected losses, weighted
        by class, must stay below the weighted gain of the request let in; a long-prompt victim
        costs more, and the cheapest victims of the lowest class go first. (Azure code trace, wa,
        load 2: evictions that charged only the delay cut throughput by a fifth and interactive
        attainment from 0.74 to 0.52, docs/scheduling.md.)"""
        cfg = ctx.config
        est = ctx.estimator
        prof = est.profile(inst.model, inst.spec)  # type: ignore[arg-type]
        perf = est.perf(inst.model, inst.spec)  # type: ignore[arg-type]
        hit_share = est.resume_hit_share(inst.spec.instance_id)
        load = EngineLoad(inst, ctx, now, self.traits.engine_scheduling == "priority")
        work = self.traits.pull_bound == "work"
        room = max(0, inst.spec.max_in_flight - len(inst.in_flight))
        out: list[tuple[str, str]] = []
        chosen: set[str] = set()
        for k, (e, f) in enumerate(zip(entries, fcs, strict=True)):
            st0 = ctx.requests[e.request_ids[0]]
            if st0.req.model != inst.model:
                break
            waiting = []
            for rid in e.request_ids:
                st = ctx.requests[rid]
                if room > 0 and (not work or load.fits(st)):
                    room -= 1
                    load.add(st)
                else:
                    waiting.append(st)
            if not waiting or f.p_meet >= cfg.evict_p_threshold:
                continue
            # Let in now, it still waits for the prompts ahead of it in the engine (its class and
            # above under priority scheduling): the gain is counted from there, not from now.
            t = now + load.prefill_ahead_s(st0) + prof.prefill_first_s
            gain = p_meet_at(st0.req.deadline_s, t, now, cfg.rel_std_floor) - f.p_meet
            if gain < cfg.evict_gain_min:
                continue
            w_gain = ctx.classes[st0.req.slo_class].weight * gain
            w_marginal = self._marginal_weight(ctx, entries, fcs, inst.model, st0)
            per_request_s, _ = est.group_work(st0.req.model, st0.req.slo_class, 1, prof)
            prio = ctx.classes[st0.req.slo_class].priority
            behind = list(zip(entries[k + 1 :], fcs[k + 1 :], strict=True))
            cands = [
                v for v in self._victims(inst, ctx, now, prio) if v.req.request_id not in chosen
            ]
            for st in waiting:
                while cands and not (room > 0 and (not work or load.fits(st))):
                    v = cands.pop(0)
                    cost_s = self._resume_cost_s(v, perf, hit_share)
                    capacity_loss = w_marginal * cost_s / max(per_request_s, 1e-6)
                    if max(self._delay_loss(ctx, behind, cost_s, now), capacity_loss) >= w_gain:
                        cands = []  # cheapest first: the rest cost more
                        break
                    chosen.add(v.req.request_id)
                    load.remove(v)
                    room += 1
                    out.append((v.req.request_id, f"slot for {f.group_id} (P {f.p_meet:.2f})"))
                if room > 0 and (not work or load.fits(st)):
                    room -= 1
                    load.add(st)
                else:
                    break
        return out

    @staticmethod
    def _marginal_weight(
        ctx: PlanContext,
        entries: list[QueueEntry],
        fcs: list[GroupForecast],
        model: str | None,
        beneficiary: RequestState,
    ) -> float:
        ws = [
            ctx.classes[r.slo_class].weight
            for e, f in zip(entries, fcs, strict=True)
            if f.p_meet >= ctx.config.evict_p_threshold
            and (r := ctx.requests[e.request_ids[0]].req).model == model
        ]
        return min(ws) if ws else ctx.classes[beneficiary.req.slo_class].weight

    @staticmethod
    def _resume_cost_s(victim: RequestState, perf: PerfModel | None, hit_share: float) -> float:
        """Engine seconds the victim's resume re-prefills: its context less what the engine's
        prefix cache still holds, at the hit share its engine reported for earlier resumes (0
        until one is reported: the prefix cache keeps a freed request's blocks only until they are
        handed out again, and an eviction is made precisely because the engine needs them;
        qlm-eval on a long-prompt trace found 0% still cached, docs/scheduling.md)."""
        if perf is None:
            return 0.0
        context = max(1, victim.req.prompt_tokens + victim.tokens_done)
        return perf.prefill_s(max(1, round(context * (1.0 - hit_share))))

    @staticmethod
    def _delay_loss(
        ctx: PlanContext,
        behind: list[tuple[QueueEntry, GroupForecast]],
        delay_s: float,
        now: float,
    ) -> float:
        """Weighted expected violations added by delaying the groups behind by delay_s."""
        floor = ctx.config.rel_std_floor
        loss = 0.0
        for e, f in behind:
            r = ctx.requests[e.request_ids[0]].req
            t = f.first_token_mean_s
            dp = p_meet_at(r.deadline_s, t, now, floor) - p_meet_at(
                r.deadline_s, t + delay_s, now, floor
            )
            loss += ctx.classes[r.slo_class].weight * f.n * max(0.0, dp)
        return loss

    @staticmethod
    def _victims(
        inst: InstanceState, ctx: PlanContext, now: float, prio: int
    ) -> list[RequestState]:
        mode = ctx.config.evict_victims
        if mode == "lower":
            vs = victims(inst, ctx, now, below_priority=prio)
        elif mode == "same":  # the beneficiary's class or lower
            vs = victims(inst, ctx, now, below_priority=prio - 1)
        else:
            vs = victims(inst, ctx, now, below_priority=None)
        # Lower classes first (their later tokens matter least), the cheapest to resume within a
        # class (shortest context: the least re-prefill), longest remaining among equals.
        vs.sort(key=lambda v: (-v.priority, v.req.prompt_tokens + v.tokens_done))
        return vs


__all__ = ["QlmPolicy"]
