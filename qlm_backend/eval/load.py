"""Offered load: the fleet's estimated capacity for a workload, and the trace time-scaling to X x it.

Capacity is a fluid estimate from the same roofline the engines run (PerfModel), independent of the
policy under test: on instance i a request of model m costs, in instance-seconds, its own prefill
plus its share of decode steps at the batch the engine holds when busy (vLLM's 256-sequence cap or
as many average contexts as fit in the KV cache, whichever is smaller). The fleet's capacity is the
largest arrival rate lambda whose model mix the instances can serve when each splits its time
between the models it may run (a small LP: max lambda s.t. sum_i x[i,m] * rate[i,m] >= lambda *
share[m], sum_m x[i,m] <= 1). Model swap time is not in it: that is the schedulers' problem.
`--load X` then rescales arrival times so the window's mean arrival rate is X x that capacity.

The fluid estimate is a model of the engine, not the engine: the batch it really holds, chunked
prefill riding with decodes, KV pressure and, with several models, swaps move what the fleet
sustains away from it by a different factor on every workload (0.9x on wa and wc, 0.4x on wb's
swapping fleet, 1.03x on wd's long prompts). So the default is a *measured* capacity, which means
the same on every trace by construction: the highest arrival rate at which FCFS keeps its queue
bounded in this very simulator, on this very window. Load 1 is the edge of FCFS's stability, not
a load at which FCFS meets SLOs: with bursty arrivals or heavy-tailed prefills its waits there are
long (on wd, about a minute).

Bounded, precisely. Run FCFS on the window time-scaled to a mean rate of r. Take the requests in
arrival order (rejected or refused ones left out: they never queue) and split them into thirds of
equal count. W_k is the mean wait to the first token of third k (a request still waiting when the
run stops counts with the wait so far), t_k their mean arrival time. The queue is bounded at r iff

    W_3 - W_2 <= GROWTH_LIMIT x (t_3 - t_2)

i.e. from the middle third to the last, waits grow by at most 5% of the time that passed: the fleet
serves at least ~95% of the arrival rate there. A stable queue's waits do not trend (bursts make
them wander, not grow), an overloaded one's grow by (1 - capacity / r) per second of arrivals. The
first third is left out: the fleet starts empty (and, with several models, loads its first models).
Probe runs stop at the last arrival plus the arrival span (a heavily overloaded queue need not
drain to be recognised). Near the limit the verdict is noisy at the few-percent level on bursty
traces (a burst in the middle third raises W_2), so the search lands within about 5% of it, always
at the same rate for the same inputs; a short window reads a higher capacity than a long one (its
thirds leave a slow overload less time to show: +10% at 500 requests of wd).

The search (bisect_capacity) is geometric: the fluid estimate first, then steps of BRACKET_FACTOR
up or down until the answer flips, then bisection of the bracket down to REL_TOL; the capacity is
the highest rate found bounded. Every run is deterministic (the planner's budget counts work, not
wall time), so the measurement is too. It is cached in a JSON file keyed by the scenario's content,
the window's workload (trace content, window and seed), the definition's constants and a hash of
the simulator's source (core, engine, eval), so a changed simulator measures again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import pulp

from qlm_backend.core.fleet import FleetConfig
from qlm_backend.engine.perf import PerfModel
from qlm_backend.eval.scenario import Scenario, WorkloadRequest
from qlm_backend.eval.simulator import SimResult, SimSettings, simulate

ENGINE_MAX_NUM_SEQS = 256  # vLLM's default max_num_seqs, also what the simulator's engines use


@dataclass(frozen=True)
class Capacity:
    requests_per_s: float
    per_instance_rps: Mapping[str, Mapping[str, float]]  # instance -> model -> requests/s alone
    model_shares: Mapping[str, float]


def request_cost_s(perf: PerfModel, prompts: Sequence[int], outputs: Sequence[int]) -> float:
    """Mean instance-seconds per request of this (model, instance), at the busy batch size."""
    n = len(prompts)
    mean_prompt = sum(prompts) / n
    mean_out = sum(outputs) / n
    ctx = mean_prompt + mean_out / 2
    batch = max(
        1, min(ENGINE_MAX_NUM_SEQS, int(perf.kv_capacity_tokens // (mean_prompt + mean_out)))
    )
    decode = mean_out * perf.decode_step_s(batch, int(batch * ctx)) / batch
    # A prefill rides in one iteration with the running decodes; its cost beyond a decode step.
    base = perf.decode_step_s(1, 0)
    prefill = sum(max(0.0, perf.prefill_s(p) - base) for p in prompts) / n
    return decode + prefill


def estimate_capacity(fleet: FleetConfig, workload: Sequence[WorkloadRequest]) -> Capacity:
    by_model: dict[str, list[WorkloadRequest]] = {}
    for w in workload:
        by_model.setdefault(w.model, []).append(w)
    shares = {m: len(v) / len(workload) for m, v in by_model.items()}
    rates: dict[str, dict[str, float]] = {}
    for inst in fleet.instances:
        rates[inst.instance_id] = {}
        for m in inst.models_allowed:
            if m not in by_model:
                continue
            try:
                perf = PerfModel.from_names(m, inst.gpu, inst.tp)
            except ValueError:
                continue  # does not fit on this instance
            ws = by_model[m]
            cost = request_cost_s(
                perf, [w.prompt_tokens for w in ws], [w.output_tokens for w in ws]
            )
            rates[inst.instance_id][m] = 1.0 / cost
    prob = pulp.LpProblem("capacity", pulp.LpMaximize)
    lam = pulp.LpVariable("lam", lowBound=0)
    x = {
        (i, m): pulp.LpVariable(f"x_{k}_{j}", lowBound=0)
        for k, (i, ms) in enumerate(rates.items())
        for j, m in enumerate(ms)
    }
    prob += lam
    for m, s in shares.items():
        served = [x[i, m] * rates[i][m] for i in rates if m in rates[i]]
        if not served:
            raise ValueError(f"no instance of the fleet can run model {m}")
        prob += pulp.lpSum(served) >= lam * s
    for i, ms in rates.items():
        if ms:
            prob += pulp.lpSum(x[i, m] for m in ms) <= 1
    # threads=1: HiGHS fixes its thread scheduler at the first solve of the process, and the
    # core's planner LP asks for one thread; a first solve with the default would break it.
    prob.solve(pulp.HiGHS(msg=False, threads=1))
    value = pulp.value(lam)
    if value is None or value <= 0:
        raise ValueError("capacity estimate failed (the LP found no positive rate)")
    return Capacity(float(value), rates, shares)


def scale_to_load(
    workload: Sequence[WorkloadRequest], capacity_rps: float, load: float
) -> tuple[list[WorkloadRequest], float]:
    """Rescale arrivals so the mean rate is `load` x capacity; returns (workload, time factor)."""
    if load <= 0:
        raise ValueError(f"load must be > 0, got {load}")
    if len(workload) < 2:
        return list(workload), 1.0
    span = workload[-1].arrival_s - workload[0].arrival_s
    # The rate over n arrivals is (n - 1) / span; the target span gives (n - 1) / (load x capacity).
    target_span = (len(workload) - 1) / (load * capacity_rps)
    factor = target_span / span if span > 0 else 1.0
    t0 = workload[0].arrival_s
    return [replace(w, arrival_s=(w.arrival_s - t0) * factor) for w in workload], factor


# ---------------------------------------------------------------------------- measured capacity

GROWTH_LIMIT = 0.05  # waits may grow by 5% of elapsed time from the middle third to the last
BRACKET_FACTOR = 1.5
REL_TOL = 0.03  # the bisection stops when the bracket is within 3%
MAX_BRACKET_STEPS = 12  # 1.5^12 ~ 130x either way from the fluid estimate
MIN_REQUESTS = 30  # thirds of fewer than 10 requests say nothing about a trend
MEASURE_VERSION = 1  # bump when the definition changes: old cache entries then miss
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


class CapacityError(ValueError):
    pass


@dataclass(frozen=True)
class Probe:
    """One FCFS run at a mean arrival rate, and the verdict."""

    rate_rps: float
    bounded: bool
    wait_middle_s: float
    wait_last_s: float
    allowed_growth_s: float
    wall_s: float


@dataclass(frozen=True)
class MeasuredCapacity:
    requests_per_s: float
    probes: tuple[Probe, ...]
    wall_s: float  # of the measurement (when cached: of the measurement that filled the cache)
    cached: bool = False


@dataclass(frozen=True)
class OfferedCapacity:
    """The capacity `--load` multiplies, and where it came from."""

    basis: Literal["measured", "fluid"]
    requests_per_s: float
    fluid_rps: float
    measured: MeasuredCapacity | None = None

    def to_json(self) -> dict[str, Any]:
        m = self.measured
        return {
            "basis": self.basis,
            "requests_per_s": round(self.requests_per_s, 4),
            "fluid_rps": round(self.fluid_rps, 4),
            "measured_rps": round(m.requests_per_s, 4) if m is not None else None,
            "measured_over_fluid": round(m.requests_per_s / self.fluid_rps, 4)
            if m is not None
            else None,
            "measure_runs": len(m.probes) if m is not None else None,
            "measure_wall_s": round(m.wall_s, 2) if m is not None else None,
            "measure_cached": m.cached if m is not None else None,
            "definition": "highest rate at which FCFS waits grow by <= "
            f"{GROWTH_LIMIT:.0%} of elapsed time from the middle third of the window to the last",
        }

    def describe(self) -> str:
        """One line for the table's head: the capacity `--load` multiplies, and the other one."""
        m = self.measured
        if m is None:
            meas = "measured: not in the cache (--capacity measured measures it)"
        else:
            how = "cached" if m.cached else f"{m.wall_s:.1f} s"
            meas = (
                f"measured {m.requests_per_s:.3f} req/s (FCFS queue bound, {len(m.probes)} runs, "
                f"{how}; {m.requests_per_s / self.fluid_rps:.2f} x fluid)"
            )
        fluid = f"fluid {self.fluid_rps:.3f} req/s (roofline LP)"
        parts = (meas, fluid) if self.basis == "measured" else (fluid, meas)
        return f"capacity for --load: {parts[0]}  |  other: {parts[1]}"


def queue_growth(res: SimResult) -> tuple[float, float, float]:
    """(W_2, W_3, t_3 - t_2) of the module docstring's definition."""
    recs = sorted(
        (r for r in res.records if r.outcome not in ("rejected", "refused")),
        key=lambda r: (r.req.arrival_s, r.req.request_id),
    )
    k = len(recs) // 3
    if k == 0:
        return 0.0, 0.0, 0.0

    def waits(rs: Sequence[Any]) -> float:
        return sum(
            (r.first_token_s if r.first_token_s is not None else res.end_s) - r.req.arrival_s
            for r in rs
        ) / len(rs)

    def arrivals(rs: Sequence[Any]) -> float:
        return sum(r.req.arrival_s for r in rs) / len(rs)

    middle, last = recs[k : 2 * k], recs[2 * k :]
    return waits(middle), waits(last), arrivals(last) - arrivals(middle)


def probe_fcfs(fleet: FleetConfig, workload: Sequence[WorkloadRequest], rate_rps: float) -> Probe:
    """Run FCFS on the workload time-scaled to `rate_rps`; is its queue bounded?"""
    t0 = time.perf_counter()
    scaled, _ = scale_to_load(workload, rate_rps, 1.0)
    span = scaled[-1].arrival_s - scaled[0].arrival_s
    horizon = scaled[-1].arrival_s + max(span, 1.0)
    res = simulate(fleet, scaled, SimSettings("fcfs", label="capacity", horizon_s=horizon))
    w_mid, w_last, dt = queue_growth(res)
    allowed = GROWTH_LIMIT * dt
    return Probe(
        rate_rps, w_last - w_mid <= allowed, w_mid, w_last, allowed, time.perf_counter() - t0
    )


def bisect_capacity(
    bounded: Callable[[float], bool],
    start_rps: float,
    *,
    factor: float = BRACKET_FACTOR,
    rel_tol: float = REL_TOL,
    max_steps: int = MAX_BRACKET_STEPS,
) -> float:
    """The highest rate found with `bounded(rate)` true, within `rel_tol` of where it turns false:
    steps of `factor` from `start_rps` until the answer flips, then geometric bisection."""
    if not (start_rps > 0 and math.isfinite(start_rps)):
        raise CapacityError(f"the search needs a start rate > 0, got {start_rps!r}")
    lo: float | None = None
    hi: float | None = None
    rate = start_rps
    if bounded(rate):
        lo = rate
        for _ in range(max_steps):
            rate *= factor
            if not bounded(rate):
                hi = rate
                break
            lo = rate
    else:
        hi = rate
        for _ in range(max_steps):
            rate /= factor
            if bounded(rate):
                lo = rate
                break
            hi = rate
    if lo is None:
        raise CapacityError(
            f"FCFS's queue grows even at {rate:.4g} req/s ({factor:g}^{max_steps} below the "
            f"start {start_rps:.4g}): no measured capacity"
        )
    if hi is None:
        raise CapacityError(
            f"FCFS's queue stays bounded up to {rate:.4g} req/s ({factor:g}^{max_steps} above the "
            f"start {start_rps:.4g}): no measured capacity"
        )
    while hi / lo > 1.0 + rel_tol:
        mid = math.sqrt(lo * hi)
        if bounded(mid):
            lo = mid
        else:
            hi = mid
    return lo


def measure_capacity(
    fleet: FleetConfig,
    workload: Sequence[WorkloadRequest],
    start_rps: float,
    on_probe: Callable[[Probe], None] | None = None,
) -> MeasuredCapacity:
    """The highest rate at which FCFS keeps its queue bounded (module docstring)."""
    if len(workload) < MIN_REQUESTS:
        raise CapacityError(
            f"the window holds {len(workload)} requests; a measured capacity needs at least "
            f"{MIN_REQUESTS} (or use the fluid estimate)"
        )
    t0 = time.perf_counter()
    probes: list[Probe] = []

    def bounded(rate: float) -> bool:
        p = probe_fcfs(fleet, workload, rate)
        probes.append(p)
        if on_probe is not None:
            on_probe(p)
        return p.bounded

    rate = bisect_capacity(bounded, start_rps)
    return MeasuredCapacity(rate, tuple(probes), time.perf_counter() - t0)


@lru_cache(maxsize=1)
def simulator_fingerprint() -> str:
    """A hash of every source file the simulation's outcome depends on (core, engine, eval)."""
    h = hashlib.sha256()
    for sub in ("core", "engine", "eval"):
        base = _PACKAGE_DIR / sub
        for f in sorted(p for p in base.rglob("*") if p.suffix in (".py", ".json") and p.is_file()):
            h.update(f.relative_to(_PACKAGE_DIR).as_posix().encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def workload_sha256(workload: Sequence[WorkloadRequest]) -> str:
    h = hashlib.sha256()
    for w in workload:
        h.update(repr(tuple(asdict(w).values())).encode() + b"\n")
    return h.hexdigest()


def capacity_cache_key(
    sc: Scenario,
    workload: Sequence[WorkloadRequest],
    *,
    seed: int,
    window: tuple[int | None, float | None],
) -> str:
    """Everything the measured capacity depends on. The workload is the windowed trace as the
    scenario assigned it (trace content, window, seed); seed and window are also named on their
    own so an entry is readable; the scenario's content covers the fleet."""
    payload = {
        "definition": [MEASURE_VERSION, GROWTH_LIMIT, BRACKET_FACTOR, REL_TOL, MAX_BRACKET_STEPS],
        "simulator": simulator_fingerprint(),
        "scenario": sc.content_sha256,
        "workload": workload_sha256(workload),
        "seed": seed,
        "window": list(window),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qlm" / "capacity.json"


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; a missing, unreadable or malformed file is an empty cache."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(doc, dict)
        or doc.get("version") != 1
        or not isinstance(doc.get("entries"), dict)
    ):
        return {}
    return doc["entries"]


def _entry_rate(entry: Any) -> float | None:
    if not isinstance(entry, dict):
        return None
    r = entry.get("requests_per_s")
    if isinstance(r, bool) or not isinstance(r, int | float) or not (r > 0 and math.isfinite(r)):
        return None
    return float(r)


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    entries = _read_cache(path)
    entries[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write and rename: a reader (another qlm-eval) never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=".capacity-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_measured_capacity(
    sc: Scenario,
    workload: Sequence[WorkloadRequest],
    *,
    seed: int,
    window: tuple[int | None, float | None],
    start_rps: float,
    cache_path: Path | None,
    on_probe: Callable[[Probe], None] | None = None,
    lookup_only: bool = False,
    trace_path: str = "",
) -> MeasuredCapacity | None:
    """measure_capacity through the cache at `cache_path` (None: no cache). With `lookup_only`,
    a miss gives None instead of a measurement. A cache that cannot be written is skipped."""
    key = capacity_cache_key(sc, workload, seed=seed, window=window)
    if cache_path is not None:
        entry = _read_cache(cache_path).get(key)
        rate = _entry_rate(entry)
        if rate is not None:
            assert isinstance(entry, dict)
            wall = entry.get("wall_s")
            runs = entry.get("runs")
            probes = (
                tuple(Probe(**p) for p in runs)
                if isinstance(runs, list) and _probes_ok(runs)
                else ()
            )
            return MeasuredCapacity(
                rate,
                probes,
                float(wall) if isinstance(wall, int | float) else 0.0,
                cached=True,
            )
    if lookup_only:
        return None
    m = measure_capacity(sc.fleet, workload, start_rps, on_probe)
    if cache_path is not None:
        try:
            _write_cache(
                cache_path,
                key,
                {
                    "requests_per_s": m.requests_per_s,
                    "wall_s": round(m.wall_s, 3),
                    "runs": [asdict(p) for p in m.probes],
                    "scenario": sc.name,
                    "trace": trace_path,
                    "seed": seed,
                    "window": list(window),
                    "requests": len(workload),
                    "fluid_rps": start_rps,
                },
            )
        except OSError:
            pass  # a read-only home: measure again next time
    return m


def _probes_ok(runs: Any) -> bool:
    fields = set(Probe.__dataclass_fields__)
    return isinstance(runs, list) and all(isinstance(p, dict) and set(p) == fields for p in runs)


__all__ = [
    "BRACKET_FACTOR",
    "GROWTH_LIMIT",
    "REL_TOL",
    "Capacity",
    "CapacityError",
    "MeasuredCapacity",
    "OfferedCapacity",
    "Probe",
    "bisect_capacity",
    "cached_measured_capacity",
    "capacity_cache_key",
    "default_cache_path",
    "estimate_capacity",
    "measure_capacity",
    "probe_fcfs",
    "queue_growth",
    "request_cost_s",
    "scale_to_load",
    "simulator_fingerprint",
]
