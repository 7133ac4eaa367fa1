"""Tunables of the queue manager, planner and LSOs, with the reason for each default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

BUDGET_CLOCKS: tuple[str, ...] = ("wall", "work")
EVICT_VICTIMS: tuple[str, ...] = ("lower", "same", "any")


@dataclass(frozen=True)
class OutputPrior:
    """Prior output-length distribution for a (model, class) before anything is observed."""

    mean_tokens: float = 256.0
    std_tokens: float = 256.0


@dataclass(frozen=True)
class ManagerConfig:
    # --- grouping -------------------------------------------------------------------------
    # Requests whose deadlines fall in the same window share a group; 5 s keeps interactive groups
    # tight (20 s SLO) while a burst of batch work still collapses into few groups.
    group_window_s: float = 5.0
    # Groups split past this size so one group can be spread over several instances ...
    group_max_size: int = 64
    # ... or past this smaller one while fewer than `group_small_below_queued` requests are queued:
    # finer parts cost the planner little on a short queue and let the plan and each instance's
    # order treat a burst's requests apart (docs/scheduling.md, "Finer groups on a short queue").
    group_small_size: int = 16
    group_small_below_queued: int = 400
    # --- replanning -----------------------------------------------------------------------
    replan_interval_s: float = 1.0  # timer: full replan at least this often while work is queued
    arrival_batch: int = 32  # full replan once this many arrivals are unplanned ...
    arrival_batch_s: float = 0.05  # ... or the oldest unplanned arrival is this old
    # --- planner --------------------------------------------------------------------------
    plan_budget_s: float = (
        0.050  # wall budget for the LP path (docs/triton-vllm-facts.md section 10)
    )
    # What the budget counts. "wall": the planner's measured compute time (the router: a decision
    # must not hold the loop). "work": only the LP time model's prediction from the problem's size,
    # and the solver is never cut by the clock, so a simulation decides the same on a busy machine
    # as on an idle one (the evaluation simulator uses it); wall time is still measured and reported.
    plan_budget_clock: Literal["wall", "work"] = "wall"
    candidates_per_group: int = 4  # prune each group to its k best instances
    lp_max_cols: int = 40_000  # above this the LP is not tried (too big for the budget)
    # Up to this many columns the LP is formulated in PuLP (readable), above with highspy's matrix
    # API: PuLP's build costs ~20 us per column here, too much for a 50 ms budget beyond ~200.
    pulp_max_cols: int = 200
    # LP time model used to skip an LP that cannot finish inside the budget (an LP that runs out of
    # budget costs its time AND the fallback after it): s_per_nonzero x nnz x (1 + nnz / knee), build
    # and solve, set for the high quantile rather than the median. Measured on a shared 2-core
    # machine (2026-11-25, the qlm-bench planner grid, 15 runs each): 11.6k nonzeros (10k queued x
    # 256 instances) 25-32 ms p50, 60 ms max (model: 57 ms); 3.0-3.5k nonzeros (100 and 1k queued)
    # 3-7 ms p50, 4-16 ms max (model: 8-10 ms). The old linear 6e-7 s/nnz predicted 10 ms for the
    # 11.6k LP, so it was tried and overran the budget. Since the reduced LP
    # (core/policies/qlm/lp_compact.py; no presolve, primal simplex from a feasible start),
    # 2026-12-02, same machine with another process busy, 10 plans each: 11.6k nonzeros 17.9 ms p50 / 18.4 ms p99 (model: 34 ms, so with
    # the per-group reserve the LP now decides at 10k x 256); 3.2k 3.9 / 4.9 ms (model: 5.5 ms);
    # 100k queued x 256 (~100k nonzeros) 120 ms (model: 1.6 s: the heuristic decides).
    lp_s_per_nonzero: float = 1.2e-6
    lp_nnz_knee: float = 8_000.0
    # What the planner still does per group after the LP (rounding, ordering and forecasting each
    # queue), reserved from the budget before trying the LP.
    plan_s_per_group: float = 5e-5
    time_buckets: int = 4  # finite time buckets per instance in the assignment LP
    # The LP decides (in "auto" mode) only when some group has a model-swap choice among its
    # candidates. Without one the assignment is load balancing over instances already running the
    # group's model, which the heuristic does greedily with the exact accumulated load while the LP
    # sees a few time buckets; measured with qlm-eval at load 2 (seeds 0 and 1), heuristic vs LP
    # alone: wa 0.919/0.890 vs 0.849/0.861, wc 0.886/0.892 vs 0.856/0.864; with swaps (wb) the LP
    # was better: 0.954/0.857 vs 0.922/0.844.
    lp_only_with_swaps: bool = True
    # Where the LP decided, the heuristic's plan is also ordered and forecast, and replaces the LP's
    # when the estimator expects at least this many fewer weighted violations from it (a guard
    # against a poor LP solve: coarse buckets, rounding).
    lp_replace_margin: float = 1.0
    # Where hopeless work (deadline already missed, or certain to be) goes in a queue: behind the
    # groups that can still meet their deadline, but ahead of those whose deadline is more than
    # this far away (batch work with hours of slack), in deadline order among themselves: a missed
    # SLO costs the same whenever it is served, but users expect bounded lateness, and waiting
    # behind every far-deadline request gave interactive requests a TTFT p99 near 300 s in
    # qlm-eval wa. inf: hopeless work last (pure SLO attainment).
    hopeless_before_slack_s: float = 300.0
    # Hysteresis on moving a queued group between instances (the fallback planner): it stays
    # where the last plan put it unless another instance would finish it this share sooner. Off:
    # 0.2 won on the development set (-0.0003 to +0.0040 per cell) but not on the test set (wb-conv
    # +0.012 at load 2, wa-conv -0.012 at load 3, wa-code -0.007 at load 2; docs/scheduling.md).
    rebalance_hysteresis: float = 0.0
    # --- estimator ------------------------------------------------------------------------
    ewma_alpha: float = 0.05  # weight of one observation in the online statistics
    default_prior: OutputPrior = field(default_factory=OutputPrior)
    priors: Mapping[tuple[str, str], OutputPrior] = field(default_factory=dict)  # (model, class)
    # Relative floor on the first-token time's standard deviation: the CLT sum shrinks the spread of
    # long queues, but throughput itself is only known to ~10%.
    rel_std_floor: float = 0.10
    # Online recalibration on top of the EWMA statistics (core/recalibration.py): the concurrency
    # an instance was seen to run promptly is a floor on the batch the estimator assumes, per
    # (model, GPU, TP). False: the estimator learns only its EWMAs (qlm-bench calibration compares).
    recalibrate: bool = True
    # --- LSOs -----------------------------------------------------------------------------
    evict_p_threshold: float = 0.5  # evict for a queued request whose P(meet) falls below this ...
    evict_gain_min: float = 0.2  # ... only if eviction raises its P(meet) by at least this
    evict_cooldown_s: float = 2.0  # per instance: no new eviction within this time (anti-thrash)
    # QLM's own cooldown (None: evict_cooldown_s, which the baselines use), set apart so tuning
    # QLM's eviction rate does not change a baseline's. Longer than theirs because the per-request
    # cap (max_evictions_per_request) binds under overload: once the running requests have used
    # their evictions none can make room, so spending them more slowly keeps some for later
    # bursts. qlm-eval load 2, 2 s -> 5 s, seeds 0-5: better in all 12 (scenario, seed) cells of
    # wa and wc, means wa 0.908 -> 0.932, wc 0.870 -> 0.927. (shepherd at 3 s instead of its
    # 2 s, seeds 0-3: wa 0.878 -> 0.926, wc 0.862 -> 0.874: the baselines' rate is a knob too.)
    qlm_evict_cooldown_s: float | None = 5.0
    max_evictions_per_request: int = 2
    # Work bound on pulls (policies with traits.pull_bound "work"): the prompt seconds an engine may
    # hold not yet prefilled, as a share of the tightest class's TTFT SLO (a request pulled now
    # waits at most about that long for the prefills ahead of it), and the KV tokens it may hold
    # (prompt + expected output of everything in flight) as a multiple of its KV cache. Chosen on
    # the development set (docs/scheduling.md; seeds 0-1, loads 1.5 and 2, measured capacity):
    # with victims of lower classes only, mean weighted attainment 0.965 without the caps, 0.978
    # with these (wd load 2: 0.902 -> 0.933; code trace load 2: 0.950 -> 0.991).
    pull_prefill_backlog_share: float = 0.1
    pull_kv_overcommit: float = 1.0
    # Which running requests may be evicted for a queued group at risk: "lower" only those of a
    # lower class; "same" the beneficiary's class or lower; "any" every request whose first token
    # is out (its TTFT SLO is already met), lower classes first. "lower": an eviction resumes by
    # recompute (vLLM v1), and evicting one's own class in an overload of that class only reorders
    # it and burns a prefill. Development set (docs/scheduling.md), mean weighted attainment:
    # any 0.912, same 0.934, lower 0.965 (with the work caps: 0.978; vLLM priority 0.945). "any"
    # won when evictions resumed by KV swap (qlm-eval load 2, 2026-11: wa 0.867 -> 0.919).
    evict_victims: str = "lower"
    # Whether an eviction may resume by KV swap (the engine keeps the KV cache in host memory). An
    # executor that carries out every Evict as an abort (the KV is gone) sets False, so every Evict
    # says resume="recompute" and its accounting matches what really happens.
    kv_swap_resume: bool = True
    # A swap away from a model with queued work happens only if the plan that swaps beats the one
    # that keeps the incumbent by this many weighted violations (hysteresis, docs/triton-vllm-facts.md section 12:
    # 5 models on 3 slots thrashed 692 times without it).
    swap_hysteresis: float = 1.0
    min_resident_s: float = 10.0  # a freshly loaded model stays at least this long if it has work
    # Another model's block whose head has waited this share of its TTFT SLO is due: the incumbent's
    # later work goes behind it, so a busy model cannot hold a shared instance forever
    # (policies/qlm/ordering.py _time_slice). inf: never (the incumbent keeps the instance while it
    # has work, unless a swap beats it by the hysteresis).
    swap_due_share: float = 0.5
    warm_slots_per_host: int = 2
    # Plans cost a model load at the mean of the loads measured on that (model, GPU, TP, warm/cold)
    # (SwapModel to on_model_loaded) once one was seen, instead of the datasheet figure (perf.load_s):
    # a real engine's load is dominated by its start-up (a vLLM engine on the CPU fleet: tens of
    # seconds, docs/engines.md), which no datasheet gives.
    measured_load_costs: bool = True
    shed_p_threshold: float = 0.02  # reject a sheddable request whose best P(meet) is below this
    # Time constant of the per-(model, class) arrival rates that admission reserves capacity for:
    # long enough to smooth Poisson noise at a few requests/s, short enough to see a burst.
    arrival_rate_tau_s: float = 30.0
    # Most of an instance admission may count as taken by higher classes (their arrival rate x
    # work): beyond it, lower-class work would be predicted to wait forever.
    reserve_max_share: float = 0.9
    # How far ahead those rates are extrapolated: a burst is not assumed to last for an hour.
    reserve_horizon_s: float = 60.0
    decisions_kept: int = 1000  # decision records kept for inspection

    def __post_init__(self) -> None:
        if self.evict_victims not in EVICT_VICTIMS:
            raise ValueError(
                f"evict_victims: must be one of {EVICT_VICTIMS}, got {self.evict_victims!r}"
            )
        if self.plan_budget_clock not in BUDGET_CLOCKS:
            raise ValueError(
                f"plan_budget_clock: must be one of {BUDGET_CLOCKS}, got {self.plan_budget_clock!r}"
            )
        if not 0.0 <= self.rebalance_hysteresis < 1.0:
            raise ValueError(
                f"rebalance_hysteresis: must be in [0, 1), got {self.rebalance_hysteresis!r}"
            )

    def with_(self, **kw: Any) -> ManagerConfig:
        return replace(self, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ManagerConfig:
        known = {f.name for f in fields(cls)} - {"priors", "default_prior"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"manager config: unknown key(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**dict(d))


__all__ = ["ManagerConfig", "OutputPrior"]
