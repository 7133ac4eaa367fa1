"""shepherd: a SHEPHERD-like (Zhang et al., NSDI'23) batch-aware, preemptive scheduler adapted to
LLM serving, class-agnostic as SHEPHERD is.

- Goodput ordering: requests that can still meet their deadline go first, EDF among them; requests
  whose deadline can no longer be met go last (serving them cannot raise goodput).
- Batch-aware: instances pull up to their in-flight bound (the largest batch that keeps step times
  bounded), dealt by load per unit of speed as in edf.
- Preemptive: when queued requests would miss their deadline waiting for a slot but would meet it if
  started now, running requests that already have their first token (their TTFT goal is met) are
  evicted to make room; a per-instance cooldown bounds the preemption rate.
"""

from __future__ import annotations

from qlm_backend.core.plan import PlanContext, QueueEntry
from qlm_backend.core.policies.common import p_meet_at, victims
from qlm_backend.core.policies.edf import EdfPolicy
from qlm_backend.core.request import RequestState


class ShepherdPolicy(EdfPolicy):
    name = "shepherd"

    def order_key(self, st: RequestState, now: float) -> tuple[float, ...]:
        lost = 1.0 if st.req.deadline_s < now else 0.0
        return (lost, st.req.deadline_s, st.req.arrival_s)

    def evictions(
        self, ctx: PlanContext, queues: dict[str, list[QueueEntry]], now: float
    ) -> list[tuple[str, str]]:
        cfg = ctx.config
        out: list[tuple[str, str]] = []
        for iid, entries in queues.items():
            inst = ctx.instances[iid]
            if inst.model is None or inst.loading is not None or not inst.in_flight:
                continue
            if now - inst.last_evict_s < cfg.evict_cooldown_s:
                continue
            fcs = ctx.estimator.forecast_queue(inst, entries, ctx, now)
            prof = ctx.estimator.profile(inst.model, inst.spec)
            room = max(0, inst.spec.max_in_flight - len(inst.in_flight))
            pos, urgent = 0, 0
            for e, f in zip(entries, fcs, strict=True):
                if pos >= inst.spec.max_in_flight:
                    break
                st0 = ctx.requests[e.request_ids[0]]
                if st0.req.model != inst.model:
                    break
                n = len(e.request_ids)
                waiting = n - max(0, min(n, room - pos))
                pos += n
                t = now + prof.prefill_first_s
                if (
                    waiting > 0
                    and f.p_meet < cfg.evict_p_threshold
                    and p_meet_at(st0.req.deadline_s, t, now, cfg.rel_std_floor)
                    >= cfg.evict_p_threshold
                ):
                    urgent += waiting
            for v in victims(inst, ctx, now, below_priority=None)[:urgent]:
                out.append((v.req.request_id, "shepherd preemption"))
        return out


__all__ = ["ShepherdPolicy"]
