"""QLM shedding under overload: when would a new request get its first token if admitted now?

A sheddable request is refused at once when no instance can give it its first token by its deadline
(P(meet) below `shed_p_threshold`). "Can" is judged where the request would really stand, not at
the head of a queue: the planner orders a virtual queue by deadline, so the request would wait
behind the in-flight work and the queued work of its model whose deadlines come before its own
(the last plan's virtual queue of that instance). While it waits, requests of higher classes keep
arriving and go ahead of it where their deadlines come first: their recent arrival rate times
their work takes a share of the instance (higher_class_delay).

Why: checking only the head of each queue admitted every batch request of a 10x burst (each
could be met at the head), the queue grew without bound and, ordered by deadline, buried the
interactive requests that arrived later (qlm-bench overload: interactive 31% attained, 0 shed).
"""

from __future__ import annotations

import math

from qlm_backend.core.estimator import ServiceProfile, SlotClock
from qlm_backend.core.instances import InstanceState
from qlm_backend.core.plan import PlanContext
from qlm_backend.core.policies.common import p_meet_at
from qlm_backend.core.request import Request


def serving_count(model: str, ctx: PlanContext) -> int:
    """Healthy instances running or loading `model` (at least 1)."""
    return max(
        1,
        sum(
            1
            for i in ctx.instances.values()
            if i.healthy and (i.model == model or i.loading == model)
        ),
    )


def higher_class_delay(
    req: Request, prof: ServiceProfile, serving: int, ctx: PlanContext, now: float, wait_s: float
) -> float:
    """Seconds that higher-class arrivals (priority numbers below the request's) add to a wait of
    `wait_s`: each class c takes a share rho_c of the instance (its recent arrival rate x work,
    spread over the instances serving the model) and goes ahead only while its deadlines come
    before the request's (arrivals up to D - SLO_c), extrapolated at most `reserve_horizon_s`:
    a burst's rate is not assumed to last an hour. Unbounded, the delay is wait x rho / (1 - rho)."""
    est = ctx.estimator
    cfg = ctx.config
    prio = ctx.classes[req.slo_class].priority
    rho, bounded = 0.0, 0.0
    for c in ctx.classes.values():
        if c.priority >= prio:
            continue
        rate = est.arrival_rate(req.model, c.name, now)
        if rate <= 0.0:
            continue
        rho_c = rate * est.group_work(req.model, c.name, 1, prof)[0] / serving
        horizon = min(cfg.reserve_horizon_s, max(0.0, req.deadline_s - c.ttft_slo_s - now))
        rho += rho_c
        bounded += rho_c * horizon
    rho = min(cfg.reserve_max_share, rho)
    return min(wait_s * rho / (1.0 - rho), bounded)


def first_token_if_admitted(
    req: Request, inst: InstanceState, ctx: PlanContext, now: float, serving: int
) -> float:
    """Expected absolute time of the request's first token on `inst` at its deadline-ordered
    place in that instance's virtual queue (inf where the instance cannot serve it); `serving`:
    serving_count(req.model, ctx), counted once per admission."""
    est = ctx.estimator
    if not inst.healthy or not est.can_serve(req.model, inst.spec):
        return math.inf
    prof = est.profile(req.model, inst.spec)
    t = now
    if inst.loading is not None:
        t = max(now, inst.ready_s)
    runs = inst.loading or inst.model
    if runs != req.model:
        # A swap first (the planner swaps only after a drain: count the in-flight work as well).
        warm = ctx.warm.is_warm(inst.spec.host, req.model)
        t += est.first_slot_s(inst, ctx.requests, now) + (
            prof.load_warm_s if warm else prof.load_cold_s
        )
        return t + prof.prefill_first_s
    rem: list[float] = []
    if inst.loading is None:
        rem, _ = est.inflight_remaining(inst, ctx.requests, prof, now)
    # Queued work of its model ahead of it by deadline, on this instance's last planned queue.
    n_ahead, work_ahead = 0, 0.0
    entries = ctx.previous.queues.get(inst.instance_id, ()) if ctx.previous is not None else ()
    for e in entries:
        st = ctx.requests.get(e.request_ids[0])
        if st is None or st.req.model != req.model or st.req.deadline_s > req.deadline_s:
            continue
        n = len(e.request_ids)
        n_ahead += n
        work_ahead += est.group_work(req.model, st.req.slo_class, n, prof)[0]
    mean_w, var_w = est.group_work(req.model, req.slo_class, 1, prof)
    cv2 = var_w / (mean_w * mean_w) if mean_w > 0 else 0.0
    clock = SlotClock(prof.batch, rem)
    clock.push(n_ahead, 0.5 * mean_w * (1.0 + cv2))
    wait = clock.start(n_ahead, sum(rem) + work_ahead)
    wait += higher_class_delay(req, prof, serving, ctx, now, wait)
    return t + wait + prof.prefill_first_s


def shed_reason(req: Request, ctx: PlanContext, now: float) -> str | None:
    """None to admit; else why the request cannot meet its deadline anywhere."""
    best_p, best_t = 0.0, math.inf
    serving = serving_count(req.model, ctx)
    for inst in ctx.instances.values():
        t = first_token_if_admitted(req, inst, ctx, now, serving)
        if t == math.inf:
            continue
        p = p_meet_at(req.deadline_s, t, now, ctx.config.rel_std_floor)
        # The earliest first token, whatever its P(meet): when P underflows to 0 everywhere the
        # reason still says when a served instance could start it (clients read Retry-After off it).
        best_p, best_t = max(best_p, p), min(best_t, t)
        if best_p >= ctx.config.shed_p_threshold:
            return None
    wait = (
        "no instance serves it" if best_t == math.inf else f"first token in ~{best_t - now:.1f} s"
    )
    return (
        f"deadline in {req.deadline_s - now:.1f} s cannot be met ({wait} behind the work queued "
        f"ahead of it; best P(meet) {best_p:.3f})"
    )


__all__ = ["first_token_if_admitted", "higher_class_delay", "serving_count", "shed_reason"]
