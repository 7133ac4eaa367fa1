"""Global planner: assign request groups to virtual queues and order them.

Path choice, recorded in the decision: the LP (lp.py) when some group has a model-swap choice and
the problem is small enough to be built and solved inside the time budget; otherwise, or when the
solver runs out of budget, the fallback heuristic (heuristic.py). Either way each instance's queue
is then ordered by ordering.py (model blocks, EDF, swap hysteresis) and forecast by the RWT
estimator, whose expected weighted violations are recorded; where the LP decided, the heuristic's
plan is forecast too and replaces the LP's if it is clearly better (config.lp_replace_margin).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal

from qlm_backend.core.config import ManagerConfig
from qlm_backend.core.decisions import PlanDecision, PlanPath
from qlm_backend.core.estimator import GroupForecast
from qlm_backend.core.groups import RequestGroup
from qlm_backend.core.plan import PlanContext, QueueEntry
from qlm_backend.core.policies.qlm.heuristic import Assignment, swap_aware_edf
from qlm_backend.core.policies.qlm.lp import estimate_size, predict_lp_s, solve_lp
from qlm_backend.core.policies.qlm.ordering import order_queue
from qlm_backend.core.policies.qlm.problem import Problem, build_problem

SolverMode = Literal["auto", "lp", "fallback"]


def _heuristic(p: Problem, cfg: ManagerConfig) -> Assignment:
    return swap_aware_edf(p, cfg.hopeless_before_slack_s, cfg.rebalance_hysteresis)


class GlobalPlanner:
    def __init__(
        self,
        *,
        oracle: bool = False,
        solver: SolverMode = "auto",
        timer: Callable[[], float] = time.perf_counter,
        policy_name: str = "qlm",
        compare_heuristic: bool = True,
    ) -> None:
        self.oracle = oracle
        self.solver = solver
        self.timer = timer
        self.policy_name = policy_name
        # Weigh the heuristic's plan against the LP's by the estimator's expected violations.
        self.compare_heuristic = compare_heuristic

    def assign(
        self, ctx: PlanContext, p: Problem, t_start: float
    ) -> tuple[Assignment, PlanPath, str, dict[str, float]]:
        cfg = ctx.config
        info = {"cols": 0.0, "rows": 0.0, "build_s": 0.0, "solve_s": 0.0}
        if p.num_groups == 0:
            return [], "fallback", "nothing queued", info
        if self.solver == "fallback":
            return (
                _heuristic(p, cfg),
                "fallback",
                "fallback forced",
                info,
            )
        if self.solver == "auto" and cfg.lp_only_with_swaps and not bool((p.swap_s > 0).any()):
            why = "no model-swap choice: heuristic load balancing"
            return _heuristic(p, cfg), "fallback", why, info
        cols, nnz = estimate_size(p, cfg.time_buckets)
        info["cols"] = float(cols)
        work_clock = cfg.plan_budget_clock == "work"
        # Work clock: what was spent so far is not read from a clock (config.plan_budget_clock).
        budget = cfg.plan_budget_s - (0.0 if work_clock else self.timer() - t_start)
        if self.solver == "auto":
            if budget <= 0:
                why = f"budget {cfg.plan_budget_s * 1e3:.0f} ms exhausted before solve"
                return _heuristic(p, cfg), "fallback", why, info
            if cols > cfg.lp_max_cols:
                why = f"too big: {cols} columns > lp_max_cols {cfg.lp_max_cols}"
                return _heuristic(p, cfg), "fallback", why, info
            # Straight to the fallback when the LP would not fit: trying it and running out of
            # budget would cost the LP's time plus the fallback's.
            predicted = predict_lp_s(nnz, cfg.lp_s_per_nonzero, cfg.lp_nnz_knee)
            rest = p.num_groups * cfg.plan_s_per_group
            if predicted + rest > budget:
                why = (
                    f"predicted LP time {predicted * 1e3:.1f} ms + {rest * 1e3:.1f} ms after it > "
                    f"budget left {budget * 1e3:.1f} ms ({cols} columns, {nnz} nonzeros)"
                )
                return _heuristic(p, cfg), "fallback", why, info
        else:
            budget = max(budget, 3600.0)  # forced LP (benchmarks): no budget
        res = solve_lp(
            p,
            buckets=cfg.time_buckets,
            swap_penalty=cfg.swap_hysteresis,
            rel_std=max(cfg.rel_std_floor, 0.15),
            budget_s=3600.0 if work_clock else budget,
            use_pulp=cols <= cfg.pulp_max_cols,
            timer=self.timer,
        )
        info.update(
            cols=float(res.cols), rows=float(res.rows), build_s=res.build_s, solve_s=res.solve_s
        )
        if res.status != "optimal":
            why = f"solver {res.status} ({res.formulation}, budget {budget * 1e3:.1f} ms)"
            return _heuristic(p, cfg), "fallback", why, info
        return res.assignment, "lp", f"lp optimal ({res.formulation}, {res.cols} columns)", info

    def plan(
        self,
        ctx: PlanContext,
        now: float,
        groups: Sequence[RequestGroup] | None = None,
        *,
        keep: dict[str, list[QueueEntry]] | None = None,
        path_override: PlanPath | None = None,
    ) -> tuple[dict[str, list[QueueEntry]], PlanDecision, dict[str, list[GroupForecast]]]:
        """Plan `groups` (default: all queued). `keep` holds entries already placed (incremental
        mode): their load counts as base and they are ordered together with the new ones."""
        t0 = self.timer()
        gl = list(ctx.groups) if groups is None else list(groups)
        extra: dict[str, float] = {}
        if keep:
            for iid, entries in keep.items():
                extra[iid] = self._entries_work(ctx, iid, entries)
        p = build_problem(
            ctx, gl, now, k=ctx.config.candidates_per_group, oracle=self.oracle, extra_base_s=extra
        )
        assignment, path, why, info = self.assign(ctx, p, t0)
        queues, forecasts, total_viol = self._materialise(ctx, now, gl, p, assignment, keep)
        # Full plans with the solver choice left to the planner only: an incremental step
        # forecasts only the queues it changed, which differ between the two plans.
        if path == "lp" and self.compare_heuristic and self.solver == "auto" and keep is None:
            # The LP optimises a coarse proxy (a few time buckets, whole-group shares, rounding);
            # the estimator's forecast of the ordered queues is the finer judge. The heuristic's
            # plan costs O(G k) plus one more ordering, so weigh it too and keep the plan with
            # fewer expected weighted violations (qlm-eval wa: the LP alone planned worse than
            # the heuristic alone).
            h_assign = _heuristic(p, ctx.config)
            hq, hf, hv = self._materialise(ctx, now, gl, p, h_assign, keep)
            if hv <= total_viol - ctx.config.lp_replace_margin:
                why = (
                    f"heuristic plan kept: {hv:.2f} expected violations vs the LP's "
                    f"{total_viol:.2f} ({why})"
                )
                path = "fallback"
                queues, forecasts, total_viol = hq, hf, hv
            else:
                why = f"{why}; heuristic plan {hv:.2f} vs LP {total_viol:.2f} expected violations"
        if path_override is not None:
            path = path_override
        decision = PlanDecision(
            time_s=now,
            policy=self.policy_name,
            path=path,
            reason=why,
            trigger=ctx.trigger,
            groups=len(gl),
            queued=int(p.n.sum()),
            instances=len(p.instance_ids),
            lp_cols=int(info["cols"]),
            lp_rows=int(info["rows"]),
            build_s=info["build_s"],
            solve_s=info["solve_s"],
            planner_s=self.timer() - t0,
            expected_violations=total_viol,
        )
        return queues, decision, forecasts

    def _materialise(
        self,
        ctx: PlanContext,
        now: float,
        gl: Sequence[RequestGroup],
        p: Problem,
        assignment: Assignment,
        keep: dict[str, list[QueueEntry]] | None,
    ) -> tuple[dict[str, list[QueueEntry]], dict[str, list[GroupForecast]], float]:
        """Queues of an assignment (with `keep`), each ordered and forecast; their total expected
        weighted violations."""
        per_inst: dict[str, list[QueueEntry]] = {iid: list(v) for iid, v in (keep or {}).items()}
        offsets: dict[int, int] = {}
        changed: set[str] = set()
        iids = p.instance_ids
        for g, i, cnt in assignment:
            grp = gl[g]
            rids = grp.ids
            a = offsets.get(g, 0)
            offsets[g] = a + cnt
            iid = iids[i]
            # A whole group shares the group's cached id tuple (tuples are immutable).
            part = rids if a == 0 and cnt == len(rids) else rids[a : a + cnt]
            per_inst.setdefault(iid, []).append(QueueEntry(grp.group_id, part))
            changed.add(iid)
        queues: dict[str, list[QueueEntry]] = {}
        forecasts: dict[str, list[GroupForecast]] = {}
        total_viol = 0.0
        for iid, entries in per_inst.items():
            if keep is not None and iid not in changed:
                # Incremental step, nothing new on this queue: keep the order of the last full
                # plan and skip its forecast (no eviction is weighed for it in this step; the next
                # full plan, at most replan_interval_s away, forecasts it again).
                queues[iid] = entries
                continue
            inst = ctx.instances[iid]
            ordered, fc = order_queue(inst, entries, ctx, now, oracle=self.oracle)
            queues[iid] = ordered
            forecasts[iid] = fc
            total_viol += sum(f.expected_violations for f in fc)
        return queues, forecasts, total_viol

    def _entries_work(self, ctx: PlanContext, iid: str, entries: list[QueueEntry]) -> float:
        inst = ctx.instances[iid]
        est = ctx.estimator
        w = 0.0
        for e in entries:
            st = ctx.requests[e.request_ids[0]]
            if not est.can_serve(st.req.model, inst.spec):
                continue
            prof = est.profile(st.req.model, inst.spec)
            w += est.group_work(st.req.model, st.req.slo_class, len(e.request_ids), prof)[0]
        return w


__all__ = ["GlobalPlanner", "SolverMode"]
