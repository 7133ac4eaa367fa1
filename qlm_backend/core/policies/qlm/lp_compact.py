"""The assignment LP of lp.py with what cannot change its optimum taken out before HiGHS sees it.

lp.build_matrix lays the LP out in full (readable, the PuLP export, the size the planner budgets
by). HiGHS' presolve removed about half of that at 10k queued x 256 instances, and took as long
doing so as the simplex did afterwards; these reductions are cheaper in numpy and exact:

- Invalid candidates (slot c of a group with fewer than k candidates) have columns fixed at 0:
  dropped.
- The overflow (late) columns of a group appear only in its served-once row, all with the same
  cost: one per group. round_solution reads only their sum.
- Capacity row (i, b) is redundant when everything that could ever land on instance i fits before
  E_b: the work of all its candidate (group, slot) pairs (each serves at most all of its group)
  plus every swap it might take (y <= 1). Rows grow with b, so from some bucket r_i on all are.
- Beyond r_i, the bucket columns of a (group, slot) pair on instance i appear in the same rows
  (served-once, and the swap link if any): parallel columns, of which an optimum needs only the
  cheapest. round_solution reads only the finite buckets' sum per pair.
- A one-swap-per-instance row over a single y is its bound.

Every optimum of this LP maps to an optimum of the full LP with the same on-time share per
(group, candidate) and the same late share per group, which is all the rounding reads; the
optimal value is the same (tests/unit/core/test_planner_speed_equivalence.py checks both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qlm_backend.core.policies.qlm.problem import Problem


def _erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): no scipy in the core."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return sign * (1.0 - poly * np.exp(-a * a))


def normal_cdf_vec(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


def bucket_costs(p: Problem, ends: np.ndarray, rel_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Cost of serving all of group g on candidate c in finite bucket b, (G, k, B): its expected
    weighted misses if served by the middle of the bucket, plus a small pull towards earlier
    buckets (among plans with equal misses, serve sooner); and of its overflow (late), (G,)."""
    G, k = p.cand.shape
    B = len(ends)
    starts_t = np.concatenate([[0.0], ends[:-1]])
    mids = (starts_t + ends) / 2.0
    t = mids[None, None, :] + p.prefill_s[:, :, None]  # (G, k, B)
    sd = np.maximum(1.0, rel_std * t)
    p_miss = 1.0 - normal_cdf_vec((p.slack_s[:, None, None] - t) / sd)
    wn = (p.weight * p.n)[:, None, None]
    early = 1e-3 * np.broadcast_to(mids / ends[-1], (G, k, B))
    return wn * (p_miss + early), wn[:, 0, 0] * (1.0 + 2e-3)


@dataclass
class CompactLp:
    """Column-wise (CSC) LP. Columns: finite-bucket x of valid (group, slot) pairs, then one
    overflow column per group, then the y (swap) columns."""

    cost: np.ndarray
    col_ub: np.ndarray
    row_lo: np.ndarray
    row_hi: np.ndarray
    starts: np.ndarray  # (cols + 1,) int32
    index: np.ndarray  # row of each nonzero, int32
    value: np.ndarray
    pair: np.ndarray  # (n_fin,) flat g * k + c of each finite-bucket column
    bucket: np.ndarray  # (n_fin,) the bucket of the full LP it stands for
    n_fin: int
    groups: int
    # A primal-feasible starting basis, one basic column per group (with every row but the
    # served-once rows' slacks): the group's cheapest column outside every capacity and swap row,
    # else its overflow column. From there the primal simplex took 1.5-3x fewer iterations than
    # HiGHS' dual simplex from the slack basis on the qlm-bench planner cells of 1k-10k queued.
    start: np.ndarray

    @property
    def cols(self) -> int:
        return len(self.cost)

    @property
    def rows(self) -> int:
        return len(self.row_lo)

    @property
    def nnz(self) -> int:
        return len(self.value)

    def shares(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(on-time share per (group, slot), (G, k); late share per group, (G,)) of a solution."""
        G = self.groups
        fin = np.bincount(self.pair, weights=x[: self.n_fin], minlength=G * k).reshape(G, k)
        return fin, np.asarray(x[self.n_fin : self.n_fin + G], dtype=float)


def _segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of these lengths laid end to end: each element's segment and its position
    inside it."""
    seg = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts
    return seg, np.arange(len(seg)) - first[seg]


def build_compact(p: Problem, ends: np.ndarray, swap_penalty: float, rel_std: float) -> CompactLp:
    G, k = p.cand.shape
    B = len(ends)
    valid = p.cand >= 0
    cost_f, cost_o = bucket_costs(p, ends, rel_std)
    vg, vc = np.nonzero(valid)
    V = len(vg)
    vi = p.cand[vg, vc]
    pw = p.work_s[vg, vc]
    # --- y: one per (instance, model) a candidate would switch to, in order of first appearance
    swapping = p.swap_s[vg, vc] > 0
    sv = np.nonzero(swapping)[0]
    model_code = {m: j for j, m in enumerate(dict.fromkeys(p.group_models))}
    gm = np.fromiter((model_code[m] for m in p.group_models), dtype=np.int64, count=G)
    key = vi[sv] * max(1, len(model_code)) + gm[vg[sv]]
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    link_y = rank[inv.reshape(-1)]  # y of each swapping pair
    y_first = np.sort(first)
    y_inst = vi[sv[y_first]]
    y_load = p.swap_s[vg[sv[y_first]], vc[sv[y_first]]]
    n_y = len(y_first)
    # --- capacity rows still binding: (instance, b < r_i)
    n_i = len(p.instance_ids)
    most = np.bincount(vi, weights=pw, minlength=n_i) + np.bincount(
        y_inst, weights=y_load, minlength=n_i
    )
    cap = np.maximum(0.0, ends[None, :] - p.base_s[:, None])  # (I, B), rises with b
    # A margin so that float summation order can never make a binding row look redundant; an
    # instance nothing can land on has no rows at all.
    redundant = (most[:, None] * (1.0 + 1e-9) + 1e-9 <= cap) | (most == 0.0)[:, None]
    r_inst = B - redundant.sum(axis=1)
    cap_first = G + np.cumsum(r_inst) - r_inst  # row of (i, 0)
    n_cap = int(r_inst.sum())
    link_row = np.full(V, -1, dtype=np.int64)
    link_row[sv] = G + n_cap + np.arange(len(sv))
    swaps_of = np.bincount(y_inst, minlength=n_i)
    swap_row = np.full(n_i, -1, dtype=np.int64)
    multi = np.nonzero(swaps_of > 1)[0]
    swap_row[multi] = G + n_cap + len(sv) + np.arange(len(multi))
    n_rows = G + n_cap + len(sv) + len(multi)
    # --- finite-bucket columns: b < r_i each, then one for all b >= r_i (the cheapest of them)
    r = r_inst[vi]
    per_pair = r + (r < B)
    cpair, pos = _segments(per_pair)
    bucket = pos.copy()
    merged = pos == r[cpair]
    if merged.any():
        mp = cpair[merged]
        tail = cost_f[vg[mp], vc[mp], :].copy()
        tail[np.arange(B)[None, :] < r[mp][:, None]] = np.inf
        bucket[merged] = np.argmin(tail, axis=1)
    n_fin = len(cpair)
    # Nonzeros of a finite column: served-once row, capacity rows b..r_i-1, its swap link.
    n_capnz = np.where(merged, 0, r[cpair] - bucket)
    has_link = swapping[cpair]
    cnt_x = 1 + n_capnz + has_link
    # --- y columns: capacity rows of their instance, their links (-1), their one-swap row
    y_r = r_inst[y_inst]
    y_links = np.bincount(link_y, minlength=n_y)
    y_swap = swap_row[y_inst] >= 0
    cnt_y = y_r + y_links + y_swap
    counts = np.concatenate([cnt_x, np.ones(G, dtype=np.int64), cnt_y])
    starts = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    nnz = int(starts[-1])
    index = np.empty(nnz, dtype=np.int64)
    value = np.empty(nnz)
    sx = starts[:n_fin]
    gx = vg[cpair]
    index[sx] = gx
    value[sx] = 1.0
    ccol, cj = _segments(n_capnz)
    at = sx[ccol] + 1 + cj
    index[at] = cap_first[vi[cpair[ccol]]] + bucket[ccol] + cj
    value[at] = pw[cpair[ccol]]
    lk = np.nonzero(has_link)[0]
    at = sx[lk] + 1 + n_capnz[lk]
    index[at] = link_row[cpair[lk]]
    value[at] = 1.0
    so = starts[n_fin : n_fin + G]
    index[so] = np.arange(G)
    value[so] = 1.0
    if n_y:
        sy = starts[n_fin + G : -1]
        ycol, yj = _segments(y_r)
        at = sy[ycol] + yj
        index[at] = cap_first[y_inst[ycol]] + yj
        value[at] = y_load[ycol]
        order = np.argsort(link_y, kind="stable")
        lcol, lj = _segments(y_links)
        at = sy[lcol] + y_r[lcol] + lj
        index[at] = link_row[sv[order]]
        value[at] = -1.0
        ys = np.nonzero(y_swap)[0]
        at = sy[ys] + y_r[ys] + y_links[ys]
        index[at] = swap_row[y_inst[ys]]
        value[at] = 1.0
    # Free columns: a merged bucket of a pair without a swap link sits in its served-once row only.
    free = np.nonzero(cnt_x == 1)[0]
    free = free[np.lexsort((cost_f[gx[free], vc[cpair[free]], bucket[free]], gx[free]))]
    head = np.ones(len(free), dtype=bool)
    head[1:] = gx[free[1:]] != gx[free[:-1]]
    start = n_fin + np.arange(G)
    start[gx[free[head]]] = free[head]
    inf = math.inf
    cap_rows = cap[np.arange(B)[None, :] < r_inst[:, None]]  # instance-major, as numbered
    row_lo = np.concatenate([np.ones(G), np.full(n_rows - G, -inf)])
    row_hi = np.concatenate([np.ones(G), cap_rows, np.zeros(len(sv)), np.ones(len(multi))])
    cost = np.concatenate([cost_f[gx, vc[cpair], bucket], cost_o, np.full(n_y, swap_penalty)])
    col_ub = np.concatenate([np.ones(n_fin), valid.any(axis=1).astype(float), np.ones(n_y)])
    return CompactLp(
        cost=cost,
        col_ub=col_ub,
        row_lo=row_lo,
        row_hi=row_hi,
        starts=starts.astype(np.int32),
        index=index.astype(np.int32),
        value=value,
        pair=(vg * k + vc)[cpair],
        bucket=bucket,
        n_fin=n_fin,
        groups=G,
        start=start,
    )


__all__ = ["CompactLp", "bucket_costs", "build_compact", "normal_cdf_vec"]
