"""Order one instance's virtual queue: model blocks, EDF inside a block, swap hysteresis between.

Why blocks: an instance runs one model at a time, so interleaving models would pay a swap per
change; all groups of one model run back to back. Inside a block, earliest deadline first, except
lost causes (deadline past, or closer than the request's own prefill: the violation is certain)
which go last so they do not take capacity from groups that can still make it. When the block cannot meet every deadline, EDF spends
the capacity on whichever request is due first, whatever its class: a single-model queue is also
ordered class first (strict priority, as vLLM's priority scheduling does), and the order with fewer
expected weighted violations is kept. Between blocks the incumbent (the model running now)
goes first unless putting the most urgent other block first lowers the expected weighted violations
by more than `swap_hysteresis` (docs/triton-vllm-facts.md section 12: without hysteresis 5 models on 3 slots
thrashed 692 times), or another block is due (its head waited `swap_due_share` of its SLO) and
serving it before the incumbent's later work costs less than it saves (`_time_slice`,
docs/scheduling.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter

from qlm_backend.core.estimator import GroupForecast
from qlm_backend.core.instances import InstanceState
from qlm_backend.core.plan import PlanContext, QueueEntry
from qlm_backend.core.request import Request


def _entry_key(
    req: Request, now: float, hopeless_before_slack_s: float, weight: float, prefill_s: float
) -> tuple[int, float, float]:
    dl = req.deadline_s
    # Certain to miss, not only missed: even first in line it would need its own prefill. Served
    # at the edge of its deadline it misses by a little and takes the capacity the requests
    # behind it needed (qlm-eval wa on the Azure code trace, development seeds 0-9: burst heads
    # pulled 19.3 s into a 20 s SLO missed by 0.2-0.5 s; the heuristic's `lost` is the same test).
    if dl < now + prefill_s:
        tier = 1  # hopeless: behind what can still be met ...
    elif dl - now > hopeless_before_slack_s:
        tier = 2  # ... but ahead of far-deadline work, which can wait without missing
    else:
        tier = 0
    return (tier, dl, -weight)


def order_queue(
    inst: InstanceState,
    entries: Sequence[QueueEntry],
    ctx: PlanContext,
    now: float,
    *,
    oracle: bool = False,
    bound: int | None = None,
) -> tuple[list[QueueEntry], list[GroupForecast]]:
    """Return the ordered entries and their forecasts."""
    if not entries:
        return [], []
    blocks: dict[str, list[tuple[tuple[int, float, float], QueueEntry]]] = {}
    requests, classes = ctx.requests, ctx.classes
    hopeless = ctx.config.hopeless_before_slack_s
    est = ctx.estimator
    perfs = {}
    for e in entries:
        req = requests[e.request_ids[0]].req
        if req.model not in perfs:
            perfs[req.model] = est.perf(req.model, inst.spec)
        perf = perfs[req.model]
        pre = perf.prefill_s(req.prompt_tokens) if perf is not None else 0.0
        key = _entry_key(req, now, hopeless, classes[req.slo_class].weight, pre)
        blocks.setdefault(req.model, []).append((key, e))
    for b in blocks.values():
        b.sort(key=itemgetter(0))
    if len(blocks) == 1:
        block = next(iter(blocks.values()))
        ordered = [e for _, e in block]
        fc = est.forecast_queue(inst, ordered, ctx, now, oracle=oracle, bound=bound)
        if all(f.p_meet >= ctx.config.evict_p_threshold for f in fc):
            return ordered, fc  # EDF meets everything: it is the order that can
        by_class = [
            e
            for _, e in sorted(
                block,
                key=lambda ke: (
                    ke[0][0],
                    classes[requests[ke[1].request_ids[0]].req.slo_class].priority,
                    *ke[0][1:],
                ),
            )
        ]
        if by_class == ordered:
            return ordered, fc
        fc_b = est.forecast_queue(inst, by_class, ctx, now, oracle=oracle, bound=bound)
        if sum(f.expected_violations for f in fc_b) < sum(f.expected_violations for f in fc):
            return by_class, fc_b
        return ordered, fc
    incumbent = inst.loading or inst.model

    def urgency(model: str) -> tuple[int, float]:
        return blocks[model][0][0][:2]

    others = sorted((m for m in blocks if m != incumbent), key=urgency)
    order_a = ([incumbent] if incumbent in blocks else []) + others
    order_b = sorted(blocks, key=urgency)

    def flat(order: list[str]) -> list[QueueEntry]:
        return [e for m in order for _, e in blocks[m]]

    qa = flat(order_a)
    fa = est.forecast_queue(inst, qa, ctx, now, oracle=oracle, bound=bound)
    if order_a == order_b:
        return qa, fa
    # A freshly loaded model keeps the instance while it has work (anti-thrash).
    if incumbent in blocks and now - inst.loaded_s < ctx.config.min_resident_s:
        return qa, fa
    va = sum(f.expected_violations for f in fa)
    qb = flat(order_b)
    fb = est.forecast_queue(inst, qb, ctx, now, oracle=oracle, bound=bound)
    if sum(f.expected_violations for f in fb) + ctx.config.swap_hysteresis < va:
        return qb, fb
    sliced = _time_slice(blocks, incumbent, others, ctx, now)
    if sliced is not None:
        before, due, rest = sliced
        qc = [*before, *due, *rest]
        fc = est.forecast_queue(inst, qc, ctx, now, oracle=oracle, bound=bound)
        vc = sum(f.expected_violations for f in fc)
        # Order a's forecast is optimistic for the due block: it sees the incumbent's work queued
        # now, not the arrivals that will join the incumbent's block ahead of it at every later
        # plan. Kept running, the due block would miss whatever the slice lets it meet, so the
        # slice is taken when it costs the rest less than that.
        saved = sum(
            f.n * classes[requests[e.request_ids[0]].req.slo_class].weight - f.expected_violations
            for e, f in zip(due, fc[len(before) : len(before) + len(due)], strict=True)
        )
        if vc - saved < va:
            return qc, fc
    return qa, fa


def _time_slice(
    blocks: dict[str, list[tuple[tuple[int, float, float], QueueEntry]]],
    incumbent: str | None,
    others: list[str],
    ctx: PlanContext,
    now: float,
) -> tuple[list[QueueEntry], list[QueueEntry], list[QueueEntry]] | None:
    """Incumbent work due before the most urgent *due* other block, that block's model, the rest.

    Why: the incumbent goes first by default, and its fresh arrivals join its block, so a busy
    model can hold an instance forever while another model's queue waits (measured, qlm-eval wb:
    a 70B model kept a shared instance for 73 s while vicuna requests, forecast on time at every
    plan, missed their 60 s SLO: each plan put the 70B's newest arrivals ahead of them). A block
    whose head has waited `swap_due_share` of its class's TTFT SLO is due: incumbent work with a
    later deadline goes behind it, so waiting is bounded by that share plus a drain and a load.
    """
    if incumbent not in blocks or not others:
        return None
    share = ctx.config.swap_due_share
    requests, classes = ctx.requests, ctx.classes
    due: str | None = None
    for m in others:  # sorted by urgency: the first due one is the most urgent due one
        key, e = blocks[m][0]
        req = requests[e.request_ids[0]].req
        if key[0] == 0 and now - req.arrival_s >= share * classes[req.slo_class].ttft_slo_s:
            due = m
            break
    if due is None:
        return None
    cut = blocks[due][0][0][:2]
    inc = blocks[incumbent]
    before = [e for k, e in inc if k[:2] <= cut]
    after = [e for k, e in inc if k[:2] > cut]
    if not after:
        return None  # the incumbent's work all goes first anyway: order_a
    rest = [e for m in others if m != due for _, e in blocks[m]]
    return before, [e for _, e in blocks[due]], after + rest


__all__ = ["order_queue"]
