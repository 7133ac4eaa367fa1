"""The assignment LP: groups to instances over time buckets, minimising expected weighted SLO
violations with model-swap cost, solved by HiGHS.

Variables: x[g,c,b] = share of group g served on its candidate c within time bucket b (b < B: finite
buckets ending at E_b seconds from now; b = B: overflow, i.e. late); y[i,m] = instance i switches to
model m (relaxed to [0, 1]).
Objective: sum x * cost + swap_penalty * y, where cost[g,c,b] = weight_g * n_g * P(miss | first token
by the middle of bucket b plus prefill) from a normal with a relative spread (the CLT view of the
estimator); overflow costs weight_g * n_g (a certain miss).
Rows: every group fully served (sum x = 1); EDF capacity per instance and finite bucket (work put in
buckets <= b, plus the instance's base load and the swaps it takes, fits before E_b); a swap before
serving another model (sum_b x[g,c,b] <= y[i,m_g]) and at most one swap per instance in the horizon.

Small models are formulated in PuLP (readable, exportable) and solved with its HiGHS API; larger ones
are built directly with highspy's matrix API: docs/triton-vllm-facts.md section 10 measured PuLP's build as the
bottleneck (32 ms at 1,600 columns vs 2 ms with highspy). What goes to highspy is the same LP with
the columns and rows that cannot change its optimum taken out first (lp_compact.py), solved by the
primal simplex from a feasible start; build_matrix keeps the full layout (PuLP, size estimates).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qlm_backend.core.highs import reset_highs_scheduler, silence_highs_banner
from qlm_backend.core.policies.qlm.heuristic import Assignment
from qlm_backend.core.policies.qlm.lp_compact import CompactLp, bucket_costs, build_compact
from qlm_backend.core.policies.qlm.problem import Problem

SOLVER_OK = "optimal"


@dataclass(frozen=True)
class LpResult:
    status: str  # "optimal", "time limit", "infeasible", ...
    assignment: Assignment
    cols: int
    rows: int
    build_s: float
    solve_s: float
    formulation: str  # "highspy" or "pulp"
    objective: float = math.nan


@dataclass
class LpModel:
    """The LP in matrix form (rows as CSR), so one build serves highspy and PuLP alike."""

    cost: np.ndarray
    col_ub: np.ndarray
    row_lo: np.ndarray
    row_hi: np.ndarray
    starts: np.ndarray
    index: np.ndarray
    value: np.ndarray
    n_x: int  # the first n_x columns are x[g,c,b], laid out ((g*k)+c)*(B+1)+b

    @property
    def cols(self) -> int:
        return len(self.cost)

    @property
    def rows(self) -> int:
        return len(self.row_lo)


def bucket_ends(p: Problem, buckets: int) -> np.ndarray:
    """Finite bucket ends (seconds from now): quantiles of the groups' slacks, so buckets fall
    where deadlines are."""
    s = p.slack_s[p.slack_s > 0]
    if len(s) == 0:
        return np.array([1.0])
    qs = np.quantile(s, np.linspace(0, 1, buckets + 1)[1:])
    ends = np.unique(np.maximum(qs, 1.0))
    return ends


def estimate_size(p: Problem, buckets: int) -> tuple[int, int]:
    """(columns, nonzeros) the LP would have, to decide before building whether it can fit.

    Counted as build_matrix lays it out, with `buckets` finite buckets (an upper bound: quantile
    ends that coincide merge): x columns for every (group, candidate slot, bucket), one y column
    per (instance, model) a candidate would switch to; nonzeros of the served-once rows, the EDF
    capacity rows (triangular in the buckets), the swap links and the one-swap-per-instance rows."""
    G, k = p.cand.shape
    B = max(1, buckets)
    nb = B + 1
    valid = p.cand >= 0
    n_valid = int(valid.sum())
    gg, cc = np.nonzero(valid & (p.swap_s > 0))
    n_link = len(gg)
    n_y = len({(int(p.cand[g, c]), p.group_models[g]) for g, c in zip(gg, cc, strict=True)})
    cols = G * k * nb + n_y
    nnz = G * k * nb + n_valid * B * (B + 1) // 2 + n_y * B + n_link * nb + n_y
    return cols, nnz


def predict_lp_s(nnz: int, s_per_nonzero: float, nnz_knee: float) -> float:
    """Predicted build + solve time of an LP with `nnz` nonzeros: HiGHS' simplex grows faster than
    linearly in the size (more rows x more pivots): s_per_nonzero x nnz x (1 + nnz / nnz_knee)."""
    return s_per_nonzero * nnz * (1.0 + nnz / max(1.0, nnz_knee))


def build_matrix(p: Problem, ends: np.ndarray, swap_penalty: float, rel_std: float) -> LpModel:
    G, k = p.cand.shape
    B = len(ends)
    nb = B + 1
    valid = p.cand >= 0
    # --- x costs: expected weighted misses if served by the middle of the bucket
    cost_f, cost_late = bucket_costs(p, ends, rel_std)
    cost_o = np.broadcast_to(cost_late[:, None], (G, k))[:, :, None]
    cost_x = np.concatenate([cost_f, cost_o], axis=2).reshape(-1)
    ub_x = np.repeat(valid.reshape(-1).astype(float), nb)
    n_x = G * k * nb
    # --- y columns: one per (instance, model) a candidate would switch to
    gg, cc = np.nonzero(valid & (p.swap_s > 0))
    y_key: dict[tuple[int, str], int] = {}
    y_load: list[float] = []
    y_inst: list[int] = []
    link_y = np.empty(len(gg), dtype=np.int64)
    for r, (g, c) in enumerate(zip(gg.tolist(), cc.tolist(), strict=True)):
        key = (int(p.cand[g, c]), p.group_models[g])
        j = y_key.get(key)
        if j is None:
            j = y_key[key] = n_x + len(y_load)
            y_load.append(float(p.swap_s[g, c]))
            y_inst.append(key[0])
        link_y[r] = j
    n_y = len(y_load)
    cost = np.concatenate([cost_x, np.full(n_y, swap_penalty)])
    col_ub = np.concatenate([ub_x, np.ones(n_y)])
    # --- rows
    rows_r: list[np.ndarray] = []
    rows_c: list[np.ndarray] = []
    rows_v: list[np.ndarray] = []
    lo: list[np.ndarray] = []
    hi: list[np.ndarray] = []
    # (1) every group fully served
    gcol = np.arange(n_x).reshape(G, k * nb)
    rows_r.append(np.repeat(np.arange(G), k * nb))
    rows_c.append(gcol.reshape(-1))
    rows_v.append(np.ones(n_x))
    lo.append(np.ones(G))
    hi.append(np.ones(G))
    r0 = G
    # (2) EDF capacity per used instance and finite bucket
    vg, vc = np.nonzero(valid)
    used_inst = np.unique(p.cand[valid])
    inst_row = np.full(len(p.instance_ids), -1, dtype=np.int64)
    inst_row[used_inst] = np.arange(len(used_inst))
    pi = inst_row[p.cand[vg, vc]]
    pw = p.work_s[vg, vc]
    base_col = (vg * k + vc) * nb
    for b in range(B):
        for b2 in range(b + 1):
            rows_r.append(r0 + pi * B + b)
            rows_c.append(base_col + b2)
            rows_v.append(pw)
    if n_y:
        yi = inst_row[np.array(y_inst)]
        ycols = np.arange(n_x, n_x + n_y)
        yl = np.array(y_load)
        for b in range(B):
            rows_r.append(r0 + yi * B + b)
            rows_c.append(ycols)
            rows_v.append(yl)
    cap = np.maximum(0.0, ends[None, :] - p.base_s[used_inst][:, None]).reshape(-1)
    lo.append(np.full(len(cap), -np.inf))
    hi.append(cap)
    r0 += len(cap)
    # (3) serve another model only after the swap: sum_b<B x[g,c,b] - y <= 0
    if len(gg):
        link_rows = r0 + np.arange(len(gg))
        lbase = (gg * k + cc) * nb
        for b in range(B):
            rows_r.append(link_rows)
            rows_c.append(lbase + b)
            rows_v.append(np.ones(len(gg)))
        rows_r.append(link_rows)
        rows_c.append(link_y)
        rows_v.append(-np.ones(len(gg)))
        lo.append(np.full(len(gg), -np.inf))
        hi.append(np.zeros(len(gg)))
        r0 += len(gg)
    # (4) at most one swap per instance within the plan's horizon
    if n_y:
        yi_all = np.array(y_inst)
        uy, yrow = np.unique(yi_all, return_inverse=True)
        rows_r.append(r0 + yrow)
        rows_c.append(np.arange(n_x, n_x + n_y))
        rows_v.append(np.ones(n_y))
        lo.append(np.full(len(uy), -np.inf))
        hi.append(np.ones(len(uy)))
        r0 += len(uy)
    rr = np.concatenate(rows_r)
    order = np.argsort(rr, kind="stable")
    rr = rr[order]
    starts = np.searchsorted(rr, np.arange(r0 + 1)).astype(np.int32)
    return LpModel(
        cost=cost,
        col_ub=col_ub,
        row_lo=np.concatenate(lo),
        row_hi=np.concatenate(hi),
        starts=starts,
        index=np.concatenate(rows_c)[order].astype(np.int32),
        value=np.concatenate(rows_v)[order],
        n_x=n_x,
    )


def solve_highspy(
    m: LpModel | CompactLp, time_limit_s: float
) -> tuple[str, np.ndarray | None, float]:
    import highspy

    silence_highs_banner()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue(
        "threads", 1
    )  # one core (docs/triton-vllm-facts.md section 10); see reset_highs_scheduler
    h.setOptionValue("time_limit", max(1e-4, time_limit_s))
    compact = isinstance(m, CompactLp)
    if compact:
        # Reduced before it came here (lp_compact.py): HiGHS' presolve found little more in it
        # and cost as much time as it saved. Primal simplex from the model's feasible start.
        h.setOptionValue("presolve", "off")
        h.setOptionValue("simplex_strategy", 4)
    fmt = highspy.MatrixFormat.kColwise if compact else highspy.MatrixFormat.kRowwise
    inf = highspy.kHighsInf
    # The array form of passModel: filling a HighsLp's fields copies element by element through
    # Python (3 ms for the 10k queued x 256 instances LP). All columns continuous (integrality 0).
    h.passModel(
        m.cols,
        m.rows,
        len(m.value),
        int(fmt),
        int(highspy.ObjSense.kMinimize),
        0.0,
        m.cost,
        np.zeros(m.cols),
        m.col_ub,
        np.where(np.isinf(m.row_lo), -inf, m.row_lo),
        np.where(np.isinf(m.row_hi), inf, m.row_hi),
        m.starts,
        m.index,
        m.value,
        np.zeros(m.cols, dtype=np.int32),
    )
    if isinstance(m, CompactLp):
        _set_start(h, m)
    h.run()
    st = h.getModelStatus()
    if st == highspy.HighsModelStatus.kNotset and reset_highs_scheduler():
        h.run()  # the process' scheduler had another thread count: reset, then solve
        st = h.getModelStatus()
    if st == highspy.HighsModelStatus.kOptimal:
        x = np.asarray(h.getSolution().col_value)
        return SOLVER_OK, x, float(h.getObjectiveValue())
    if st == highspy.HighsModelStatus.kTimeLimit:
        return "time limit", None, math.nan
    return h.modelStatusToString(st), None, math.nan


def _set_start(h: Any, m: CompactLp) -> None:
    import highspy

    bs = highspy.HighsBasisStatus
    basis = highspy.HighsBasis()
    cols = [bs.kLower] * m.cols
    for j in m.start.tolist():
        cols[j] = bs.kBasic
    rows = [bs.kBasic] * m.rows
    rows[: m.groups] = [bs.kLower] * m.groups
    basis.col_status = cols
    basis.row_status = rows
    basis.valid = True
    h.setBasis(basis)  # if HiGHS rejects it, it starts from its own basis: slower, same optimum


def to_pulp(m: LpModel) -> tuple[Any, list[Any]]:
    """The same LP as a PuLP problem (readable; `prob.writeLP(path)` exports it)."""
    import pulp

    prob = pulp.LpProblem("qlm_assignment", pulp.LpMinimize)
    add = getattr(prob, "add_variable", None)  # PuLP >= 3.3 attaches variables to the model
    if add is not None:
        xs = [add(f"v{j}", 0, float(m.col_ub[j])) for j in range(m.cols)]
    else:  # pragma: no cover - older PuLP
        xs = [pulp.LpVariable(f"v{j}", 0, float(m.col_ub[j])) for j in range(m.cols)]
    prob += pulp.lpSum(float(m.cost[j]) * xs[j] for j in range(m.cols) if m.cost[j])
    for r in range(m.rows):
        a, b = int(m.starts[r]), int(m.starts[r + 1])
        expr = pulp.lpSum(
            float(v) * xs[int(j)] for j, v in zip(m.index[a:b], m.value[a:b], strict=True)
        )
        lo_r, hi_r = float(m.row_lo[r]), float(m.row_hi[r])
        if lo_r == hi_r:
            prob += expr == hi_r, f"r{r}"
        else:
            if math.isfinite(hi_r):
                prob += expr <= hi_r, f"r{r}u"
            if math.isfinite(lo_r):
                prob += expr >= lo_r, f"r{r}l"
    return prob, xs


def solve_pulp(m: LpModel, time_limit_s: float) -> tuple[str, np.ndarray | None, float]:
    import pulp

    silence_highs_banner()
    prob, xs = to_pulp(m)
    solver = pulp.HiGHS(msg=False, timeLimit=max(1e-3, time_limit_s), threads=1)
    prob.solve(solver)
    status = pulp.LpStatus[prob.status]
    if status == "Not Solved" and reset_highs_scheduler():
        prob.solve(solver)  # see reset_highs_scheduler
        status = pulp.LpStatus[prob.status]
    if status != "Optimal":
        return status.lower(), None, math.nan
    x = np.array([v.value() or 0.0 for v in xs])
    return SOLVER_OK, x, float(pulp.value(prob.objective) or 0.0)


def round_solution(p: Problem, m: LpModel, x: np.ndarray, buckets: int) -> Assignment:
    """Requests per (group, instance) from a solution of the full LP (round_shares)."""
    G, k = p.cand.shape
    xs = x[: m.n_x].reshape(G, k, buckets + 1)
    return round_shares(p, xs[:, :, :buckets].sum(axis=2), xs[:, :, buckets].sum(axis=1))


def round_shares(p: Problem, fin: np.ndarray, over: np.ndarray) -> Assignment:
    """Requests per (group, instance) from the on-time share of each (group, candidate), (G, k),
    and the late share of each group, (G,) (largest remainder).

    The late (overflow) share has no capacity row, so the LP leaves where it runs open: it is
    placed here, in deadline order, on the candidate whose queue (base load plus the on-time work
    the LP put there plus the late work placed so far) finishes it first. Sending it with the
    group's largest on-time share instead piled every wholly late group of an overload onto the
    same instance (candidate 0 of each, ranked by base load alone), which qlm-eval wa/wc showed
    as LP plans meeting fewer deadlines than the heuristic's."""
    G, k = p.cand.shape
    share = fin.copy()
    share[p.cand < 0] = 0.0
    load = p.base_s.copy()
    valid = p.cand >= 0
    gi, ci = np.nonzero(valid)
    np.add.at(load, p.cand[gi, ci], share[gi, ci] * p.work_s[gi, ci])
    late = np.nonzero(over > 1e-9)[0]
    if len(late):
        # Python floats in the loop: the same float64 arithmetic as numpy's, without its
        # per-element cost.
        cand, work, lo = p.cand.ravel().tolist(), p.work_s.ravel().tolist(), load.tolist()
        for g in late[np.argsort(p.slack_s[late], kind="stable")].tolist():
            o_g = float(over[g])
            best_c, best_t = 0, math.inf
            for c in range(k):
                i = cand[g * k + c]
                if i < 0:
                    break
                t = lo[i] + o_g * work[g * k + c]
                if t < best_t:
                    best_c, best_t = c, t
            share[g, best_c] += o_g
            lo[cand[g * k + best_c]] = best_t
    # Largest remainder, all groups at once: floor each candidate's share of the group's
    # requests, then one more to the candidates with the largest fractions (invalid ones last).
    n = p.n.astype(np.int64)
    q = share * n[:, None]
    base = np.floor(q + 1e-9).astype(np.int64)
    rest = n - base.sum(axis=1)
    short = np.nonzero(rest > 0)[0]
    if len(short):
        frac = q[short] - base[short]
        frac[p.cand[short] < 0] = -1.0
        rank = np.argsort(-frac, axis=1)
        plus = (np.arange(k)[None, :] < rest[short][:, None]).astype(np.int64)
        extra = np.zeros_like(plus)
        np.put_along_axis(extra, rank, plus, axis=1)
        base[short] += extra
    og, oc = np.nonzero((base > 0) & valid)
    return list(zip(og.tolist(), p.cand[og, oc].tolist(), base[og, oc].tolist(), strict=True))


def solve_lp(
    p: Problem,
    *,
    buckets: int,
    swap_penalty: float,
    rel_std: float,
    budget_s: float,
    use_pulp: bool,
    timer: Callable[[], float],
) -> LpResult:
    t0 = timer()
    formulation = "pulp" if use_pulp else "highspy"
    ends = bucket_ends(p, buckets)
    # PuLP gets the full LP (readable, exportable); HiGHS' matrix API the reduced one.
    m: LpModel | CompactLp = (
        build_matrix(p, ends, swap_penalty, rel_std)
        if use_pulp
        else build_compact(p, ends, swap_penalty, rel_std)
    )
    t1 = timer()
    build_s = t1 - t0
    left = budget_s - build_s
    if left <= 0:
        return LpResult("budget spent in build", [], m.cols, m.rows, build_s, 0.0, formulation)
    if isinstance(m, LpModel):
        status, x, obj = solve_pulp(m, left)
    else:
        status, x, obj = solve_highspy(m, left)
    solve_s = timer() - t1
    if status == SOLVER_OK and build_s + solve_s > budget_s:
        status = "over budget"
    if status != SOLVER_OK or x is None:
        return LpResult(status, [], m.cols, m.rows, build_s, solve_s, formulation)
    if isinstance(m, LpModel):
        assignment = round_solution(p, m, x, len(ends))
    else:
        assignment = round_shares(p, *m.shares(x, p.cand.shape[1]))
    return LpResult(SOLVER_OK, assignment, m.cols, m.rows, build_s, solve_s, formulation, obj)


__all__ = [
    "LpModel",
    "LpResult",
    "bucket_ends",
    "build_matrix",
    "estimate_size",
    "predict_lp_s",
    "round_shares",
    "round_solution",
    "solve_highspy",
    "solve_lp",
    "solve_pulp",
    "to_pulp",
]
