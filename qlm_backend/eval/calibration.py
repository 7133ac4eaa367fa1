"""How wrong is the estimator? Its forecasts at decision points against what then happened.

At two decision points of each request the RWT estimator's forecast is recorded (ForecastRecorder,
installed as QueueManager.plan_observer): when the request is first planned (placed on some
instance's virtual queue) and when it is pulled into an engine. A forecast says when its first
token will come (absolute virtual time, mean and spread), where it stands (queued requests ahead of
it on that instance), and P(first token by its deadline). After the run each forecast is scored
against the truth (`score`), and the pure functions below summarise:

- the Brier score of P(meet), mean of (p - y)^2 over forecasts, y = 1 if the SLO was met, with the
  Brier score of the constant predictor at the observed base rate, r(1 - r), for reference (a
  forecaster that knows nothing about individual requests but the overall rate scores that);
- a reliability table: P(meet) in 10 equal bins, per bin the count, the mean prediction and the
  observed frequency (a calibrated forecaster has them equal);
- the error of the predicted first-token time, predicted - actual (positive: the estimator was
  pessimistic), by queue-position bucket: median and p90 of |error| and of the signed error, and
  the median |error| relative to the true wait from the forecast (comparable across loads).

Percentiles are numpy's default (linear interpolation between order statistics). Requests that
never got a first token (shed, refused, unfinished) count as misses for P(meet) and are left out
of the time errors (there is no actual time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from qlm_backend.stats import percentile

if TYPE_CHECKING:
    from qlm_backend.core.actions import Action
    from qlm_backend.core.plan import Plan, PlanContext

PointKind = Literal["planned", "pulled"]
POINT_KINDS: tuple[PointKind, ...] = ("planned", "pulled")
# Queue-position buckets (inclusive bounds; None: no upper bound): the head, the next few that
# wait for one slot, a batch's worth, a few batches, deep queues.
POSITION_BUCKETS: tuple[tuple[int, int | None], ...] = (
    (0, 0),
    (1, 3),
    (4, 15),
    (16, 63),
    (64, None),
)
RELIABILITY_BINS = 10


@dataclass(frozen=True)
class ForecastPoint:
    request_id: str
    kind: PointKind
    time_s: float  # when the forecast was made (virtual)
    instance_id: str
    position: int  # queued requests ahead of it on that instance's virtual queue
    first_token_s: float  # predicted mean first-token time, absolute (virtual)
    std_s: float
    p_meet: float


@dataclass(frozen=True)
class Truth:
    request_id: str
    deadline_s: float
    first_token_s: float | None  # None: it never got one

    @property
    def met(self) -> bool:
        return self.first_token_s is not None and self.first_token_s <= self.deadline_s + 1e-9


@dataclass(frozen=True)
class Scored:
    point: ForecastPoint
    truth: Truth

    @property
    def met(self) -> bool:
        return self.truth.met

    @property
    def error_s(self) -> float | None:
        """Predicted - actual first-token time; None when there was no first token."""
        ft = self.truth.first_token_s
        return None if ft is None else self.point.first_token_s - ft

    @property
    def true_wait_s(self) -> float | None:
        """Actual first-token time minus the forecast's time: what the forecast had to predict."""
        ft = self.truth.first_token_s
        return None if ft is None else ft - self.point.time_s


@dataclass(frozen=True)
class ReliabilityBin:
    lo: float
    hi: float
    count: int
    mean_predicted: float | None  # None: empty bin
    observed: float | None


@dataclass(frozen=True)
class PositionError:
    label: str
    count: int
    abs_p50_s: float | None
    abs_p90_s: float | None
    signed_p50_s: float | None
    signed_p90_s: float | None
    rel_abs_p50: float | None  # median |error| / true wait


# ---------------------------------------------------------------------------------- pure scoring
def brier(probs: Sequence[float], outcomes: Sequence[bool]) -> float | None:
    """Mean squared difference between P(meet) and the outcome (1 met, 0 missed)."""
    if len(probs) != len(outcomes):
        raise ValueError(f"{len(probs)} probabilities for {len(outcomes)} outcomes")
    if not probs:
        return None
    return float(np.mean([(p - float(y)) ** 2 for p, y in zip(probs, outcomes, strict=True)]))


def base_rate_brier(outcomes: Sequence[bool]) -> float | None:
    """Brier score of always predicting the observed base rate r: r (1 - r)."""
    if not outcomes:
        return None
    r = sum(1 for y in outcomes if y) / len(outcomes)
    return r * (1.0 - r)


def reliability(
    probs: Sequence[float], outcomes: Sequence[bool], bins: int = RELIABILITY_BINS
) -> list[ReliabilityBin]:
    """P(meet) in `bins` equal bins [k/bins, (k+1)/bins); 1.0 goes into the last one."""
    if len(probs) != len(outcomes):
        raise ValueError(f"{len(probs)} probabilities for {len(outcomes)} outcomes")
    ps: list[list[float]] = [[] for _ in range(bins)]
    ys: list[list[float]] = [[] for _ in range(bins)]
    for p, y in zip(probs, outcomes, strict=True):
        k = min(bins - 1, max(0, int(p * bins)))
        ps[k].append(p)
        ys[k].append(float(y))
    out = []
    for k in range(bins):
        n = len(ps[k])
        out.append(
            ReliabilityBin(
                k / bins,
                (k + 1) / bins,
                n,
                float(np.mean(ps[k])) if n else None,
                float(np.mean(ys[k])) if n else None,
            )
        )
    return out


def bucket_label(lo: int, hi: int | None) -> str:
    if hi is None:
        return f"{lo}+"
    return str(lo) if lo == hi else f"{lo}-{hi}"


def position_errors(
    positions: Sequence[int],
    errors_s: Sequence[float],
    true_waits_s: Sequence[float] | None = None,
    buckets: Sequence[tuple[int, int | None]] = POSITION_BUCKETS,
) -> list[PositionError]:
    """Error of the predicted first-token time (predicted - actual) by queue-position bucket."""
    if len(positions) != len(errors_s):
        raise ValueError(f"{len(positions)} positions for {len(errors_s)} errors")
    waits = true_waits_s if true_waits_s is not None else [float("nan")] * len(errors_s)
    out = []
    for lo, hi in buckets:
        sel = [
            (e, w)
            for pos, e, w in zip(positions, errors_s, waits, strict=True)
            if pos >= lo and (hi is None or pos <= hi)
        ]
        signed = [e for e, _ in sel]
        absolute = [abs(e) for e in signed]
        # A wait under a millisecond would blow the ratio up: it says nothing relative.
        rel = [abs(e) / w for e, w in sel if w == w and w > 1e-3]
        out.append(
            PositionError(
                bucket_label(lo, hi),
                len(sel),
                percentile(absolute, 50),
                percentile(absolute, 90),
                percentile(signed, 50),
                percentile(signed, 90),
                percentile(rel, 50),
            )
        )
    return out


def score(points: Iterable[ForecastPoint], truths: Mapping[str, Truth]) -> list[Scored]:
    """Join every forecast with its request's truth (forecasts of unknown requests are dropped)."""
    return [Scored(p, truths[p.request_id]) for p in points if p.request_id in truths]


def thirds(scored: Sequence[Scored]) -> tuple[list[Scored], list[Scored], list[Scored]]:
    """Split by the time the forecast was made: first, middle and last third of the forecasts."""
    s = sorted(scored, key=lambda x: (x.point.time_s, x.point.request_id))
    n = len(s)
    a, b = n // 3, n - n // 3
    return s[:a], s[a:b], s[b:]


def summarize(scored: Sequence[Scored]) -> dict[str, Any]:
    """Brier (and the base rate's), reliability and position errors of one set of forecasts."""
    probs = [x.point.p_meet for x in scored]
    ys = [x.met for x in scored]
    # A forecast of never (an unhealthy instance's queue) has no time error to speak of.
    timed = [x for x in scored if x.error_s is not None and math.isfinite(x.error_s)]
    errs = [x.error_s for x in timed if x.error_s is not None]
    waits = [x.true_wait_s for x in timed if x.true_wait_s is not None]
    return {
        "forecasts": len(scored),
        "met_share": (sum(ys) / len(ys)) if ys else None,
        "brier": brier(probs, ys),
        "brier_base_rate": base_rate_brier(ys),
        "abs_err_p50_s": percentile([abs(e) for e in errs], 50),
        "signed_err_mean_s": float(np.mean(errs)) if errs else None,
        "rel_abs_err_p50": percentile(
            [abs(e) / w for e, w in zip(errs, waits, strict=True) if w > 1e-3], 50
        ),
        "reliability": [b.__dict__ for b in reliability(probs, ys)],
        "positions": [
            p.__dict__ for p in position_errors([x.point.position for x in timed], errs, waits)
        ],
    }


# ---------------------------------------------------------------------------------- recording
class ForecastRecorder:
    """QueueManager.plan_observer that records, per request, the estimator's forecast when it is
    first planned and when it is first pulled (before its first token).

    The planner forecasts groups; a request's own forecast is the same model with every request of
    the queue as its own entry (forecast_queue then probes each request at its position), on the
    plan's queues, with what the plan's actions make of the instances: its evictions out of the
    in-flight sets (a request pulled into a victim's slot is not forecast to wait for it), its pulls
    still at the head of the queues they come from. Only the prefix of a queue up to the deepest
    request to record is forecast (the forecast is sequential).
    """

    def __init__(self, bound: int | None = None) -> None:
        self.bound = bound  # the batch bound the policy forecasts with (None: the instance's)
        self.points: list[ForecastPoint] = []
        self._planned: set[str] = set()
        self._pulled: set[str] = set()

    def __call__(self, plan: Plan, ctx: PlanContext, actions: list[Action], now: float) -> None:
        # Forecasting fills the estimator's profile cache at moments the planner would not have,
        # and a cached profile depends on when it was computed (the prompt mean drifts between
        # refreshes): the cache is put back so that recording leaves the run exactly as it was.
        profiles = ctx.estimator._profiles
        saved = dict(profiles)
        try:
            self._record(plan, ctx, actions, now)
        finally:
            profiles.clear()
            profiles.update(saved)

    def _record(self, plan: Plan, ctx: PlanContext, actions: list[Action], now: float) -> None:
        from qlm_backend.core.actions import Evict, Pull
        from qlm_backend.core.plan import QueueEntry
        from qlm_backend.core.request import Status

        pulls = {
            rid: a.instance_id for a in actions if isinstance(a, Pull) for rid in a.request_ids
        }
        evicted = {a.request_id for a in actions if isinstance(a, Evict)}
        for iid, entries in plan.queues.items():
            flat = [
                (e.group_id, rid) for e in entries for rid in e.request_ids if rid in ctx.requests
            ]
            want: dict[int, list[PointKind]] = {}
            for pos, (_, rid) in enumerate(flat):
                st = ctx.requests[rid]
                if st.status is not Status.QUEUED:
                    continue
                kinds: list[PointKind] = []
                if rid not in self._planned:
                    kinds.append("planned")
                if pulls.get(rid) == iid and rid not in self._pulled and st.first_token_s is None:
                    kinds.append("pulled")
                if kinds:
                    want[pos] = kinds
            if not want:
                continue
            depth = max(want) + 1
            split = [QueueEntry(gid, (rid,)) for gid, rid in flat[:depth]]
            inst = ctx.instances[iid]
            if not evicted.isdisjoint(inst.in_flight):  # a copy: the manager's state stays as is
                inst = replace(inst, in_flight=inst.in_flight - evicted)
            fc = ctx.estimator.forecast_queue(inst, split, ctx, now, bound=self.bound)
            for pos, kinds in want.items():
                rid, f = flat[pos][1], fc[pos]
                for kind in kinds:
                    (self._planned if kind == "planned" else self._pulled).add(rid)
                    self.points.append(
                        ForecastPoint(
                            rid, kind, now, iid, pos, f.first_token_mean_s, f.std_s, f.p_meet
                        )
                    )


__all__ = [
    "POINT_KINDS",
    "POSITION_BUCKETS",
    "ForecastPoint",
    "ForecastRecorder",
    "PositionError",
    "ReliabilityBin",
    "Scored",
    "Truth",
    "base_rate_brier",
    "brier",
    "bucket_label",
    "position_errors",
    "reliability",
    "score",
    "summarize",
    "thirds",
]
