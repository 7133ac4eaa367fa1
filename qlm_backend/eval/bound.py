"""An upper bound on class-weighted SLO attainment that no schedule of the simulator can beat.

Every policy's figure in a report is read against this: the bound is what the fleet could attain on
the window's arrivals if scheduling were perfect and free, so a policy's distance from it is what
scheduling can still win, and a policy above it is a bug (in the policy's accounting or here).

The model: a request is attained when its first token comes by arrival + its class's TTFT SLO, and
the first token comes at the end of the engine step that completes the request's prefill. So only
the prefill work of attained requests has to happen inside their own [release, deadline] intervals;
unattained requests are taken as shed and cost nothing. The linear program (HiGHS):

    max  sum_r weight_r x_r                    x_r in [0, 1]: request r attained (1) or not (0)
    s.t. sum_p y_rp = x_r                      y_rp >= 0: share of r's prefill done on pool p
         sum_{r: a <= release_r, deadline_r <= b} w_rp y_rp <= count_p (b - a)
                                               for every pool p and window [a, b] in the set W
         y_rp = 0 where pool p cannot give r its first token by its deadline at all

where a pool is a set of identical instances (same GPU, tp and allowed models) and w_rp is a lower
bound on the engine-seconds r's prefill takes on an instance of pool p (`prefill_work_s`).

Why no schedule beats it (each relaxation below only raises the optimum):
- w_rp is at most what the engine spends: an engine step lasts at least its linear layers at the
  fastest MFU the profile has (prefill or decode, so mixing decodes into a step cannot make prompt
  tokens cheaper than this), with the weight read and the per-step overhead amortised over the
  full token budget (max_num_batched_tokens, the most favourable batching), plus the causal
  attention of the prompt (the same total however the prompt is chunked). KV reads, per-sequence
  and tensor-parallel costs, recompute after a preemption, KV swap copies and decode tokens are
  all left out.
- The prefill that produced r's first token ran on one instance, after r arrived (plus the engine's
  per-request overhead) and ended by its deadline, so all its steps lie inside any window [a, b]
  with a <= release_r and deadline_r <= b; steps of one instance do not overlap, so the work of the
  requests whose whole interval lies in [a, b] fits in (b - a) per instance (the engine's prefix
  cache is keyed per request, so tokens it skips were computed by r itself on that engine inside
  the same interval; a prefix shared across requests would break this). Setting y_rp to r's
  share on p (0 or 1 in a real schedule) satisfies every row; the LP also lets work split across
  pools and across the instances of a pool (migration, a fluid pool), which is a relaxation.
- Model swaps are free and every instance may serve any allowed model at any time (the window rows
  still share an instance's time between its models); KV-cache capacity, sequence limits and
  admission are ignored; decodes are ignored, which is exact rather than loose for the metric:
  a schedule may evict a request right after its first token and never decode it (recompute
  eviction costs the engine nothing), and attainment counts the first token only.
- W is a subset of all windows: any subset of valid rows is a valid relaxation. W is built by
  separation: solve, find for each pool the windows [release_j, deadline_k] the current solution
  overfills most (an O(n^2) sweep over all starts and ends, vectorised), add them, solve again,
  until none is violated or the round/time limits stop it (then the bound is valid, only looser).
- x in [0, 1] is the LP relaxation. A MIP (x binary) on the final rows runs for small workloads
  (or with `integer=True`) under a time limit, windows its incumbent overfills added between
  solves, and its *dual* bound (never its incumbent) replaces the LP figure when lower.

On wa, wb, wc at load 2 the bound is 1.0 and tight (docs/bound.md): decode is most of the work the
load is measured against, and the metric lets a schedule defer all of it.

Per-class figures maximise that class's attained count alone over the same rows (so each is an upper
bound on that class whatever the others get; they are not simultaneously attainable), rounded down:
a count is an integer. `attainment` does the same for the count of all requests (the unweighted
share, metrics.py's `slo_attainment`).

One core: HiGHS runs with threads=1 (it fixes its thread scheduler at the first solve of the
process, and the core's planner LP asks for one thread).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qlm_backend.core.fleet import FleetConfig
from qlm_backend.core.highs import reset_highs_scheduler, silence_highs_banner
from qlm_backend.core.slo import SloClass
from qlm_backend.engine.hardware import KV_BLOCK_TOKENS
from qlm_backend.engine.perf import PerfModel
from qlm_backend.eval.scenario import WorkloadRequest

# The simulator's engines (SimSettings.engine_max_num_batched_tokens, vLLM's default): the most
# prompt tokens one step can carry, so the weight read is amortised over at most this many.
DEFAULT_MAX_BATCHED_TOKENS = 8192
# Float rounding in the work figures must never push the bound below a real schedule.
_WORK_SAFETY = 1.0 - 1e-9
# As the metric: a first token within this of the deadline counts as met.
_DEADLINE_TOL_S = 1e-9
# Rows added per pool and separation round (the worst violated windows first).
_CUTS_PER_ROUND = 300
_MAX_ROUNDS = 60
# integer=None runs the MIP up to this many requests: there it is exact and quick, while on 2,000
# requests it moved the figure by < 0.0002 for seconds of solving (and overran its time limit).
_AUTO_MIP_MAX_REQUESTS = 300
# Starts swept at once in the separation (a starts x n requests float matrix).
_SWEEP_CHUNK = 256


@dataclass(frozen=True)
class ClassBound:
    requests: int
    screened_in: int  # requests of the class some pool could serve by the deadline on its own
    max_attained: int  # upper bound on the class's attained count (this class maximised alone)

    @property
    def attainment(self) -> float | None:
        return self.max_attained / self.requests if self.requests else None


@dataclass(frozen=True)
class BoundResult:
    weighted_attainment: float | None  # upper bound on class-weighted attainment (None: no request)
    lp_weighted_attainment: float | None  # the LP relaxation's figure (>= weighted_attainment)
    attainment: float | None  # upper bound on the share of all requests attained (weights 1)
    per_class: Mapping[str, ClassBound]
    requests: int
    windows: int  # window rows in the final model
    rounds: int  # separation rounds, all objectives together
    solve_s: float  # wall time of the whole bound (model building included)
    method: str  # "lp" or "mip" (the MIP's dual bound was used)
    status: str  # "optimal", or "time limit" / "round limit" (still valid, possibly looser)


@dataclass(frozen=True)
class _Pool:
    gpu: str
    tp: int
    models: tuple[str, ...]
    count: int
    overhead_s: float  # the engines' per-request overhead before the scheduler sees a request


def prefill_work_s(
    perf: PerfModel,
    prompt_tokens: int,
    max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
    step_time_scale: float = 1.0,
) -> float:
    """A lower bound on the engine-seconds a prompt's prefill takes on `perf`, however it is
    chunked and whatever shares its steps.

    A step carrying k <= max_batched_tokens prompt tokens (and any decodes) lasts at least
    ((t_weights)^p + (c k)^p)^(1/p) + step overhead + its chunks' attention, with c the linear-layer
    seconds per token at the largest MFU of the profile (PerfModel.step_s drops nothing but
    non-negative terms from that). Per token that is smallest at the full budget, so each prompt
    token is charged at least that; the causal attention of a prompt's chunks sums to that of the
    whole prompt at offset 0 whatever the chunking. `step_time_scale` is the simulator's perturbed
    engines (eval/perturb.py): every step scaled.
    """
    if prompt_tokens <= 0:
        return 0.0
    e, m, g, tp = perf.eff, perf.model, perf.gpu, perf.tp
    budget = max(1, max_batched_tokens)
    t_weights = perf.weight_bytes / tp / (g.hbm_bytes_per_s * e.decode_bandwidth)
    per_token_flops_s = (
        2.0 * m.layer_params / tp / (g.peak_flops * max(e.prefill_mfu, e.decode_mfu))
    )
    p = e.roofline_sharpness
    t_flops = per_token_flops_s * budget
    if math.isinf(p):
        t_linear = max(t_weights, t_flops)
    else:
        t_linear = (t_weights**p + t_flops**p) ** (1.0 / p)
    per_token_s = (t_linear + e.step_overhead_s) / budget
    attention_s = perf.attention_flops(prompt_tokens, 0) / tp / (g.peak_flops * e.attn_mfu)
    return (prompt_tokens * per_token_s + attention_s) * step_time_scale * _WORK_SAFETY


def _pools(fleet: FleetConfig) -> list[_Pool]:
    counts: dict[tuple[str, int, tuple[str, ...]], int] = {}
    for inst in fleet.instances:
        key = (inst.gpu, inst.tp, tuple(sorted(inst.models_allowed)))
        counts[key] = counts.get(key, 0) + 1
    out = []
    for (gpu, tp, models), n in counts.items():
        overheads = []
        for mdl in models:
            try:
                overheads.append(PerfModel.from_names(mdl, gpu, tp).eff.request_overhead_s)
            except ValueError:
                continue
        out.append(_Pool(gpu, tp, models, n, min(overheads, default=0.0)))
    return out


@dataclass(frozen=True)
class _Problem:
    release_s: np.ndarray  # (n,)
    deadline_s: np.ndarray  # (n,)
    weight: np.ndarray  # (n,)
    cls: np.ndarray  # (n,) index into class names
    work_s: np.ndarray  # (n, pools): w_rp, inf where pool p cannot attain r
    count: np.ndarray  # (pools,) instances per pool


def _problem(
    fleet: FleetConfig,
    workload: Sequence[WorkloadRequest],
    classes: Sequence[SloClass],
    max_batched_tokens: int,
    step_time_scale: float,
) -> _Problem:
    pools = _pools(fleet)
    by_name = {c.name: (k, c) for k, c in enumerate(classes)}
    n, k = len(workload), len(pools)
    work = np.full((n, k), np.inf)
    release = np.empty(n)
    deadline = np.empty(n)
    weight = np.empty(n)
    cls = np.empty(n, dtype=np.int64)
    perfs: dict[tuple[str, int], PerfModel | None] = {}
    for r, w in enumerate(workload):
        if w.slo_class not in by_name:
            raise ValueError(f"request {w.request_id}: slo_class {w.slo_class!r} not in classes")
        ci, c = by_name[w.slo_class]
        cls[r], weight[r] = ci, c.weight
        deadline[r] = w.arrival_s + c.ttft_slo_s + _DEADLINE_TOL_S
        release[r] = w.arrival_s
        overhead = math.inf
        for p, pool in enumerate(pools):
            if w.model not in pool.models:
                continue
            if (w.model, p) not in perfs:
                try:
                    perfs[w.model, p] = PerfModel.from_names(w.model, pool.gpu, pool.tp)
                except ValueError:
                    perfs[w.model, p] = None  # does not fit on this instance
            perf = perfs[w.model, p]
            if perf is None or math.ceil((w.prompt_tokens + 1) / KV_BLOCK_TOKENS) > (
                perf.kv_capacity_blocks
            ):
                continue  # the engine refuses a prompt over its KV cache
            work[r, p] = prefill_work_s(perf, w.prompt_tokens, max_batched_tokens, step_time_scale)
            overhead = min(overhead, pool.overhead_s)
        if math.isfinite(overhead):
            release[r] += overhead
        # Its own prefill alone must fit between release and deadline on one instance.
        work[r, work[r] > deadline[r] - release[r]] = np.inf
    return _Problem(release, deadline, weight, cls, work, np.array([p.count for p in pools]))


class _Lp:
    """The HiGHS model: columns x_r (screened-in requests), then y_rp for requests with a choice
    of pools; rows sum_p y_rp - x_r = 0, then the window rows added by separation."""

    def __init__(self, prob: _Problem) -> None:
        import highspy

        self.hs = highspy
        self.prob = prob
        ok = np.isfinite(prob.work_s)
        self.req = np.nonzero(ok.any(axis=1))[0]  # screened-in requests, column j = x of req[j]
        nx = len(self.req)
        # (request, pool) -> column of its work on that pool
        self.col = np.full(prob.work_s.shape, -1, dtype=np.int64)
        next_col = nx
        link_rows: list[tuple[list[int], list[float]]] = []
        for j, r in enumerate(self.req):
            pools = np.nonzero(ok[r])[0]
            if len(pools) == 1:
                self.col[r, pools[0]] = j
                continue
            cols = list(range(next_col, next_col + len(pools)))
            self.col[r, pools] = cols
            next_col += len(pools)
            link_rows.append(([j, *cols], [-1.0] + [1.0] * len(pools)))
        self.ncols = next_col
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", 1)
        lower = np.zeros(self.ncols)
        upper = np.full(self.ncols, highspy.kHighsInf)
        upper[:nx] = 1.0
        h.addVars(self.ncols, lower, upper)
        h.changeObjectiveSense(highspy.ObjSense.kMaximize)
        for cols, vals in link_rows:
            h.addRow(0.0, 0.0, len(cols), np.array(cols, dtype=np.int32), np.array(vals))
        self.h = h
        self.windows: set[tuple[int, float, float]] = set()

    def set_objective(self, cost_x: np.ndarray) -> None:
        cost = np.zeros(self.ncols)
        cost[: len(self.req)] = cost_x
        self.h.changeColsCost(self.ncols, np.arange(self.ncols, dtype=np.int32), cost)

    def run(self) -> str:
        h = self.h
        h.run()
        st = h.getModelStatus()
        if st == self.hs.HighsModelStatus.kNotset and reset_highs_scheduler():
            h.run()  # another thread count started the process' scheduler: reset, solve again
            st = h.getModelStatus()
        return h.modelStatusToString(st)

    def loads(self, values: np.ndarray) -> np.ndarray:
        """(n, pools) prefill seconds the solution puts on each pool."""
        prob = self.prob
        out = np.zeros(prob.work_s.shape)
        has = self.col >= 0
        out[has] = prob.work_s[has] * np.maximum(values[self.col[has]], 0.0)
        return out

    def add_windows(self, cuts: Sequence[tuple[int, float, float]]) -> int:
        """Add the rows of windows (pool, a, b) not in the model yet; how many were added."""
        prob = self.prob
        starts, index, value, upper = [0], [], [], []
        for p, a, b in cuts:
            if (p, a, b) in self.windows:
                continue
            members = np.nonzero(
                (prob.release_s >= a) & (prob.deadline_s <= b) & (self.col[:, p] >= 0)
            )[0]
            if len(members) == 0:
                continue
            self.windows.add((p, a, b))
            index.append(self.col[members, p])
            value.append(prob.work_s[members, p])
            starts.append(starts[-1] + len(members))
            upper.append(float(prob.count[p] * (b - a)))
        if upper:
            k = len(upper)
            self.h.addRows(
                k,
                np.full(k, -self.hs.kHighsInf),
                np.array(upper),
                starts[-1],
                np.array(starts[:-1], dtype=np.int32),
                np.concatenate(index).astype(np.int32),
                np.concatenate(value),
            )
        return len(upper)


def _violated_windows(
    prob: _Problem, loads: np.ndarray, limit: int
) -> list[tuple[float, int, float, float]]:
    """(violation_s, pool, a, b) of the windows [release_j, deadline_k] the loads overfill most:
    for each start the worst end, then the worst starts."""
    found: list[tuple[float, int, float, float]] = []
    for p in range(loads.shape[1]):
        act = np.nonzero(loads[:, p] > 1e-12)[0]
        if len(act) == 0:
            continue
        order = act[np.argsort(prob.deadline_s[act], kind="stable")]
        rel, dl, ld = prob.release_s[order], prob.deadline_s[order], loads[order, p]
        cap = float(prob.count[p])
        starts = np.unique(rel)
        best_v = np.empty(len(starts))
        best_b = np.empty(len(starts))
        for s0 in range(0, len(starts), _SWEEP_CHUNK):
            a = starts[s0 : s0 + _SWEEP_CHUNK, None]
            inside = rel[None, :] >= a
            filled = np.cumsum(np.where(inside, ld[None, :], 0.0), axis=1)
            # Ends only at deadlines of requests in the window (b > a, and no emptier twin).
            v = np.where(inside, filled - cap * (dl[None, :] - a), -np.inf)
            j = np.argmax(v, axis=1)
            best_v[s0 : s0 + len(a)] = v[np.arange(len(a)), j]
            best_b[s0 : s0 + len(a)] = dl[j]
        tol = 1e-7 * np.maximum(1.0, cap * (best_b - starts))
        bad = np.nonzero(best_v > tol)[0]
        top = bad[np.argsort(-best_v[bad], kind="stable")[:limit]]
        found.extend((float(best_v[i]), p, float(starts[i]), float(best_b[i])) for i in top)
    return found


def _separate(lp: _Lp, deadline: float) -> tuple[str, float, np.ndarray, int]:
    """Solve, add the violated windows, repeat: (status, objective, column values, rounds)."""
    rounds = 0
    while True:
        status = lp.run()
        if status != "Optimal":
            raise RuntimeError(f"attainment bound: HiGHS says {status!r}")
        sol = np.asarray(lp.h.getSolution().col_value)
        obj = float(lp.h.getInfo().objective_function_value)
        rounds += 1
        cuts = _violated_windows(lp.prob, lp.loads(sol), _CUTS_PER_ROUND)
        if not cuts:
            return "optimal", obj, sol, rounds
        if rounds >= _MAX_ROUNDS:
            return "round limit", obj, sol, rounds
        if time.perf_counter() >= deadline:
            return "time limit", obj, sol, rounds
        if lp.add_windows([(p, a, b) for _, p, a, b in cuts]) == 0:
            return "optimal", obj, sol, rounds  # every violated window is in already (tolerance)


def _mip_bound(lp: _Lp, time_limit_s: float) -> tuple[float | None, str, int]:
    """The MIP's dual bound (x binary, y continuous): (bound, status, rounds). Windows the
    incumbent overfills are added and the MIP solved again while time is left, so on small
    problems the figure is the exact optimum of the relaxation over all windows."""
    h, hs = lp.h, lp.hs
    nx = len(lp.req)
    cols = np.arange(nx, dtype=np.int32)
    h.changeColsIntegrality(nx, cols, np.full(nx, hs.HighsVarType.kInteger))
    # Presolve's probing ignores the time limit on these dense rows (12 s on wc at load 4, with
    # no bound at the end); the root LP and its cuts do without it.
    h.setOptionValue("presolve", "off")
    stop_at = time.perf_counter() + time_limit_s
    best: float | None = None
    status, rounds = "time limit", 0
    try:
        while True:
            left = stop_at - time.perf_counter()
            if left <= 0:
                break
            # HiGHS measures time_limit against the object's run clock, which already ran the LPs.
            h.setOptionValue("time_limit", h.getRunTime() + left)
            st = lp.run()
            rounds += 1
            # Never the incumbent: "Optimal" only means the gap is within mip_rel_gap.
            dual = float(h.getInfo().mip_dual_bound)
            if st not in ("Optimal", "Time limit reached") or not math.isfinite(dual):
                break
            best = dual if best is None else min(best, dual)
            if st != "Optimal":
                break
            sol = np.asarray(h.getSolution().col_value)
            cuts = _violated_windows(lp.prob, lp.loads(sol), _CUTS_PER_ROUND)
            if not cuts or lp.add_windows([(p, a, b) for _, p, a, b in cuts]) == 0:
                status = "optimal"
                break
    finally:
        h.changeColsIntegrality(nx, cols, np.full(nx, hs.HighsVarType.kContinuous))
        h.setOptionValue("time_limit", hs.kHighsInf)
        h.setOptionValue("presolve", "choose")
    return best, status, rounds


def attainment_bound(
    fleet: FleetConfig,
    workload: Sequence[WorkloadRequest],
    classes: Sequence[SloClass] | None = None,
    *,
    integer: bool | None = None,
    time_limit_s: float = 8.0,
    mip_time_limit_s: float = 2.0,
    max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
    step_time_scale: float = 1.0,
) -> BoundResult:
    """An upper bound on the class-weighted SLO attainment of any schedule of `workload` (already
    scaled to its load) on `fleet` (see the module docstring for the relaxation).

    `classes` default to the fleet's; `max_batched_tokens` and `step_time_scale` must be the
    simulator's (SimSettings.engine_max_num_batched_tokens, step_time_scale) for the bound to
    hold. `time_limit_s` caps the separation rounds (all objectives together), `mip_time_limit_s`
    the MIP; either stopping early leaves a valid, looser bound.
    """
    t0 = time.perf_counter()
    cls_list = tuple(fleet.slo_classes if classes is None else classes)
    names = [c.name for c in cls_list]
    if not workload:
        empty = {c: ClassBound(0, 0, 0) for c in names}
        return BoundResult(None, None, None, empty, 0, 0, 0, 0.0, "lp", "optimal")
    silence_highs_banner()
    prob = _problem(fleet, workload, cls_list, max_batched_tokens, step_time_scale)
    lp = _Lp(prob)
    total_weight = float(prob.weight.sum())
    req_cls = prob.cls[lp.req]
    stop_at = t0 + time_limit_s
    statuses: list[str] = []
    rounds = 0
    per_class: dict[str, ClassBound] = {}
    for ci, name in enumerate(names):
        in_class = req_cls == ci
        total = int((prob.cls == ci).sum())
        if not in_class.any():
            per_class[name] = ClassBound(total, 0, 0)
            continue
        lp.set_objective(in_class.astype(float))
        st, obj, _, k = _separate(lp, stop_at)
        statuses.append(st)
        rounds += k
        # A count is an integer; the small slack absorbs the LP's feasibility tolerance.
        per_class[name] = ClassBound(total, int(in_class.sum()), math.floor(obj + 1e-6))
    if len(lp.req):
        lp.set_objective(np.ones(len(lp.req)))
        st, count_obj, _, k = _separate(lp, stop_at)
        statuses.append(st)
        rounds += k
        attained = min(len(workload), math.floor(count_obj + 1e-6))
        lp.set_objective(prob.weight[lp.req])
        st, lp_obj, _, k = _separate(lp, stop_at)
        statuses.append(st)
        rounds += k
    else:
        lp_obj, attained = 0.0, 0
    best, method = lp_obj, "lp"
    if integer is None:
        integer = len(lp.req) <= _AUTO_MIP_MAX_REQUESTS
    if integer and len(lp.req):
        dual, mip_status, k = _mip_bound(lp, mip_time_limit_s)
        rounds += k
        if dual is not None and dual < best:
            best, method = dual, "mip"
        if mip_status != "optimal":
            statuses.append("time limit")
    status = next((s for s in statuses if s != "optimal"), "optimal")
    return BoundResult(
        weighted_attainment=min(1.0, best / total_weight),
        lp_weighted_attainment=min(1.0, lp_obj / total_weight),
        attainment=attained / len(workload),
        per_class=per_class,
        requests=len(workload),
        windows=len(lp.windows),
        rounds=rounds,
        solve_s=time.perf_counter() - t0,
        method=method,
        status=status,
    )


def bound_summary(res: BoundResult) -> dict[str, Any]:
    """The bound as the report shows it beside the policies (plain dict, results.json-ready)."""

    def r4(x: float | None) -> float | None:
        # Rounded up: the shown bound stays >= every policy's figure rounded to 4 places.
        return None if x is None else math.ceil(x * 1e4 - 1e-6) / 1e4

    return {
        "weighted_attainment": r4(res.weighted_attainment),
        "lp_weighted_attainment": r4(res.lp_weighted_attainment),
        "slo_attainment": r4(res.attainment),
        "per_class": {
            c: {
                "requests": b.requests,
                "max_attained": b.max_attained,
                "slo_attainment": r4(b.attainment),
            }
            for c, b in res.per_class.items()
        },
        "windows": res.windows,
        "solve_s": round(res.solve_s, 3),
        "method": res.method,
        "status": res.status,
    }


__all__ = [
    "DEFAULT_MAX_BATCHED_TOKENS",
    "BoundResult",
    "ClassBound",
    "attainment_bound",
    "bound_summary",
    "prefill_work_s",
]
