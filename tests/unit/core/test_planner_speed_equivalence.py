"""The planner's faster paths decide as the plain ones did: the reduced LP (lp_compact.py) has the
full LP's optimum and maps onto it, the vectorised rounding is the per-group largest remainder, and
a group's cached request ids follow its changes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_request

from qlm_backend.core.groups import GroupIndex
from qlm_backend.core.policies.qlm.lp import (
    LpModel,
    bucket_ends,
    build_matrix,
    round_shares,
    round_solution,
    solve_highspy,
)
from qlm_backend.core.policies.qlm.lp_compact import CompactLp, build_compact
from qlm_backend.core.policies.qlm.problem import Problem, build_problem


def _random_problem(rng: np.random.Generator) -> Problem:
    """Groups of 3 models over instances of which some are busy (base load) and some run another
    model (swap cost); some groups have fewer than k candidates, some none at all."""
    G, k, n_i = int(rng.integers(1, 30)), int(rng.integers(1, 5)), int(rng.integers(1, 9))
    cand = np.full((G, k), -1, dtype=np.int64)
    for g in range(G):
        m = int(rng.integers(0, min(k, n_i) + 1))
        cand[g, :m] = rng.permutation(n_i)[:m]
    valid = cand >= 0
    swap = np.where(rng.random((G, k)) < 0.3, rng.uniform(5, 40, (G, k)), 0.0) * valid
    return Problem(
        now=0.0,
        group_ids=[f"g{g}" for g in range(G)],
        group_models=[f"m{rng.integers(0, 3)}" for _ in range(G)],
        n=rng.integers(1, 64, G).astype(float),
        weight=rng.choice([1.0, 2.0, 4.0], G),
        slack_s=rng.uniform(-20, 400, G),
        prefill_s=rng.uniform(0.05, 1.0, (G, k)),
        instance_ids=[f"i{i}" for i in range(n_i)],
        base_s=rng.uniform(0, 60, n_i) * (rng.random(n_i) < 0.6),
        current=[f"m{rng.integers(0, 3)}" for _ in range(n_i)],
        cand=cand,
        work_s=rng.uniform(0.5, 80, (G, k)) * valid,
        swap_s=swap,
    )


def _on_full_layout(p: Problem, c: CompactLp, m: LpModel, x: np.ndarray) -> np.ndarray:
    """A compact solution as a point of the full LP: each column on the bucket it stands for,
    a group's late share on its first candidate's overflow column, the y columns as they are."""
    G, k = p.cand.shape
    nb = m.n_x // (G * k)
    full = np.zeros(m.cols)
    np.add.at(full, c.pair * nb + c.bucket, x[: c.n_fin])
    full[np.arange(G) * k * nb + nb - 1] += x[c.n_fin : c.n_fin + G]
    full[m.n_x :] = x[c.n_fin + G :]
    return full


def _assert_same_optimum(p: Problem, buckets: int) -> None:
    ends = bucket_ends(p, buckets)
    m = build_matrix(p, ends, 1.0, 0.15)
    c = build_compact(p, ends, 1.0, 0.15)
    assert c.cols <= m.cols and c.rows <= m.rows and c.nnz <= len(m.value)
    st_full, x_full, obj_full = solve_highspy(m, 60.0)
    st, x, obj = solve_highspy(c, 60.0)
    assert st == st_full
    if st != "optimal":
        return
    assert x is not None and x_full is not None
    tol = 1e-6 * max(1.0, abs(obj_full))
    assert obj == pytest.approx(obj_full, abs=tol)
    full = _on_full_layout(p, c, m, x)
    rows = np.repeat(np.arange(m.rows), np.diff(m.starts))
    act = np.zeros(m.rows)
    np.add.at(act, rows, m.value * full[m.index])
    assert (act <= m.row_hi + 1e-7).all() and (act >= m.row_lo - 1e-7).all()
    assert (full >= -1e-9).all() and (full <= m.col_ub + 1e-9).all()
    assert float(m.cost @ full) == pytest.approx(obj_full, abs=tol)
    # What the rounding reads is the same through either layout.
    G, k = p.cand.shape
    fin, over = c.shares(x, k)
    xs = full[: m.n_x].reshape(G, k, len(ends) + 1)
    assert np.allclose(fin, xs[:, :, :-1].sum(axis=2)) and np.allclose(over, xs[:, :, -1].sum(1))


def test_reduced_lp_has_the_full_lps_optimum_on_random_problems() -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        _assert_same_optimum(_random_problem(rng), int(rng.integers(1, 6)))


def test_reduced_lp_has_the_full_lps_optimum_on_benchmark_fleets() -> None:
    from qlm_backend.bench.planner import make_manager

    for queued, insts in ((300, 4), (1_000, 64)):
        ctx = make_manager(queued, insts)._context("test")
        p = build_problem(ctx, list(ctx.groups), 0.0, k=ctx.config.candidates_per_group)
        _assert_same_optimum(p, ctx.config.time_buckets)


def test_reduced_lp_starts_from_a_feasible_basis() -> None:
    # One basic column per group that touches its served-once row only: every other row keeps
    # its slack, so the start is primal feasible whatever the capacities.
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = _random_problem(rng)
        c = build_compact(p, bucket_ends(p, 3), 1.0, 0.15)
        assert len(c.start) == c.groups
        for g, j in enumerate(c.start.tolist()):
            assert c.starts[j + 1] - c.starts[j] == 1 and c.index[c.starts[j]] == g


def _largest_remainder(p: Problem, share: np.ndarray) -> list[tuple[int, int, int]]:
    """The rounding one group at a time, as the planner did it before it was vectorised."""
    out = []
    for g in range(share.shape[0]):
        n = int(p.n[g])
        q = share[g] * n
        base = np.floor(q + 1e-9).astype(int)
        rest = n - int(base.sum())
        if rest > 0:
            frac = q - base
            frac[p.cand[g] < 0] = -1.0
            for c in np.argsort(-frac)[:rest]:
                base[c] += 1
        for c in range(share.shape[1]):
            if base[c] > 0 and p.cand[g, c] >= 0:
                out.append((g, int(p.cand[g, c]), int(base[c])))
    return out


def test_vectorised_rounding_is_the_per_group_largest_remainder() -> None:
    rng = np.random.default_rng(11)
    for trial in range(200):
        p = _random_problem(rng)
        G, k = p.cand.shape
        fin = rng.dirichlet(np.ones(k + 1), size=G)
        if trial % 2:  # coarse shares: many equal fractions, the tie-breaking must match too
            fin = np.round(fin * 4) / 4
        fin = fin[:, :k] * (p.cand >= 0)
        assert round_shares(p, fin, np.zeros(G)) == _largest_remainder(p, fin)
    # round_solution reads the same shares off the full layout.
    p = _random_problem(rng)
    ends = bucket_ends(p, 2)
    m = build_matrix(p, ends, 1.0, 0.15)
    x = rng.random(m.cols)
    G, k = p.cand.shape
    xs = x[: m.n_x].reshape(G, k, len(ends) + 1)
    assert round_solution(p, m, x, len(ends)) == round_shares(
        p, xs[:, :, :-1].sum(axis=2), xs[:, :, -1].sum(axis=1)
    )


def test_cached_request_ids_follow_adds_and_removes() -> None:
    idx = GroupIndex(window_s=5.0, max_size=64)
    reqs = [make_request(f"r{j}", deadline_s=9.0 - 0.1 * j) for j in range(4)]
    g = idx.add(reqs[0])
    assert g.ids == ("r0",) and g.ids is g.ids  # built once, then shared
    for r in reqs[1:]:
        idx.add(r)
    assert g.ids == ("r3", "r2", "r1", "r0") and g.request_ids == list(g.ids)
    idx.remove(g.group_id, reqs[2])
    assert g.ids == ("r3", "r1", "r0")
    ids = g.request_ids
    ids.append("x")  # a caller's list is its own
    assert g.ids == ("r3", "r1", "r0")
    assert math.isclose(g.deadline_s, 8.7)
