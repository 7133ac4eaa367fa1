"""RWT (request waiting time) estimator: when will a group at position k of a virtual queue get its
first token, and with what probability does that meet its deadline?

Model (QLM paper, section on the RWT estimator, made concrete for continuous batching):
- An instance running model m keeps up to B requests in its engine (B = the pull bound, capped by the
  engine's sequence limit and by how many average contexts fit in its KV cache). One decode step at
  batch B takes `step_s` (PerfModel roofline x a learnt correction), so an output token costs the
  instance `step_s / B` seconds and a request with O output tokens costs `O * step_s / B`, plus the
  part of its prefill iteration that stalls the batch.
- A queued request starts when a slot frees: with k requests ahead (in flight or queued before it)
  and k >= B, after the work ahead W minus what the other B-1 slots still hold at that moment
  (SlotClock). What they hold comes from the requests AHEAD, not from the one waiting: an in-flight
  request holds its own remaining work, draining at one token per step, so it frees its slot at
  remaining tokens x step (all B slots stay busy until the first of them ends); a queued request
  that started in the meantime holds a renewal residual, w(1+cv^2)/2 of its own work w. Its first
  token follows one prefill later.
- O is random: per (model, class) a mean and variance (EWMA-learnt from observed outputs, starting
  from configured priors). W is a sum over many requests, so by the Central Limit Theorem it is
  near-normal with the summed mean and variance; P(meet) = Phi((deadline - t_ft) / sigma).
- A model change on the queue drains the instance and adds the load time (warm from host memory, or
  cold from disk: PerfModel.load_s).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlm_backend.core.config import ManagerConfig
from qlm_backend.core.fleet import InstanceSpec
from qlm_backend.core.recalibration import Recalibrator
from qlm_backend.core.request import RequestState
from qlm_backend.core.slo import SloClass
from qlm_backend.engine.perf import PerfModel

if TYPE_CHECKING:
    from qlm_backend.core.instances import InstanceState
    from qlm_backend.core.plan import PlanContext, QueueEntry

ENGINE_MAX_SEQS = 256  # vLLM's default max_num_seqs: the batch bound of an unbounded (push) policy
DEFAULT_PROMPT_TOKENS = 512.0
RESUME_HIT_DECAY = 0.95  # per resumed request: the hit share follows the last ~20 resumes
_SQRT2 = math.sqrt(2.0)


def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / _SQRT2))


class Ewma:
    """Exponentially weighted mean and variance, seeded with a prior."""

    __slots__ = ("mean", "var", "n")

    def __init__(self, mean: float, var: float) -> None:
        self.mean, self.var, self.n = mean, var, 0

    def update(self, x: float, alpha: float) -> None:
        diff = x - self.mean
        incr = alpha * diff
        self.mean += incr
        self.var = (1.0 - alpha) * (self.var + diff * incr)
        self.n += 1


@dataclass(frozen=True)
class ServiceProfile:
    """How an instance serves one model, at the batch size it is expected to run."""

    model: str
    batch: int
    step_s: float  # one decode step at `batch` (learnt correction applied)
    prefill_first_s: float  # from slot to first token: half a step in progress + own prefill
    prefill_stall_s: float  # instance time one prefill takes from the running batch
    load_warm_s: float
    load_cold_s: float

    @property
    def token_cost_s(self) -> float:
        """Instance-seconds per output token (a step serves `batch` tokens)."""
        return self.step_s / self.batch


@dataclass(frozen=True)
class GroupForecast:
    group_id: str
    n: int
    start_mean_s: float  # absolute time its first request gets a slot
    first_token_mean_s: float  # absolute time of its first request's first token
    last_first_token_mean_s: float  # ... of its last request's
    std_s: float
    p_meet: float  # mean over its requests of P(first token by deadline)
    expected_violations: float  # weighted: weight x n x (1 - p_meet)
    swap_before: bool  # a model swap precedes it on this queue


class SlotClock:
    """When the q-th queued request of one model segment of a virtual queue gets a slot.

    The instance runs B requests at once and serves one instance-second of work per second, shared
    by its B slots. Work conservation: a request starts at the time t where the work ahead of it,
    W, minus what the B-1 other slots still hold at t, has been served, i.e. t = W - H(t).
    H(t) comes from the population ahead of the request:
    - in-flight request i (remaining r_i instance-seconds, i.e. B r_i seconds of its slot) still
      holds r_i - t/B until it ends at B r_i (its remaining length is taken at its mean: the slot is
      busy until then, which is what makes a queue behind long-running work wait);
    - the other slots hold the latest queued requests that started, each with its renewal residual
      rho = w(1+cv^2)/2 (a random phase: queued requests start when others happen to end).
    t + H(t) - W increases with t (slope 1 - a/B > 0 between in-flight ends, jumps up at them), so
    the root is found by walking the in-flight ends in order. Without in-flight work this is
    t = W - (B-1) rho, the renewal form, with rho of the requests just ahead.
    """

    __slots__ = ("b", "_ends", "_suffix", "_cum_n", "_cum_rho", "_rho")

    def __init__(self, batch: int, inflight_remaining: Sequence[float] = ()) -> None:
        self.b = max(1, batch)
        r = sorted(inflight_remaining)
        self._ends = [self.b * x for x in r]  # seconds from the segment start each slot frees
        suffix = [0.0] * (len(r) + 1)
        for i in range(len(r) - 1, -1, -1):
            suffix[i] = suffix[i + 1] + r[i]
        self._suffix = suffix  # work still held by in-flight requests i.. at t = 0
        self._cum_n: list[int] = [0]  # queued requests before each block
        self._cum_rho: list[float] = [0.0]  # summed residuals before each block
        self._rho: list[float] = []  # residual per request of each block

    @property
    def in_flight(self) -> int:
        return len(self._ends)

    def push(self, n: int, residual: float) -> None:
        """Append n queued requests (one queue entry) with this residual each."""
        self._cum_n.append(self._cum_n[-1] + n)
        self._cum_rho.append(self._cum_rho[-1] + n * residual)
        self._rho.append(residual)

    def _prefix(self, x: int) -> float:
        """Summed residuals of the first x queued requests."""
        if x <= 0:
            return 0.0
        j = bisect.bisect_right(self._cum_n, x) - 1
        if j >= len(self._rho):
            return self._cum_rho[-1]
        return self._cum_rho[j] + (x - self._cum_n[j]) * self._rho[j]

    def _held(self, q: int, m: int) -> float:
        """Residuals of the m queued requests just before queued position q."""
        return self._prefix(q) - self._prefix(q - m) if m > 0 else 0.0

    def start(self, q: int, work_ahead: float) -> float:
        """Seconds from the segment start until queued position q (0 = first) gets a slot, with
        `work_ahead` instance-seconds (in flight + queued before it) ahead of it."""
        b, ends, nf = self.b, self._ends, len(self._ends)
        if nf + q < b:
            return 0.0  # a slot is free now
        # Fast path: the root lies after every in-flight request has ended.
        t0 = ends[-1] if ends else 0.0
        held = self._held(q, min(q, b - 1))
        if t0 + held < work_ahead:
            return work_ahead - held
        # Piece p: in-flight requests p.. still run (a = nf - p of them); only pieces where at most
        # b - 1 of them run can see this request start.
        for p in range(max(0, nf - (b - 1)), nf + 1):
            a = nf - p
            lo = ends[p - 1] if p > 0 else 0.0
            hi = ends[p] if p < nf else math.inf
            base = self._suffix[p] + self._held(q, min(q, b - 1 - a))
            slope = 1.0 - a / b
            if lo * slope + base >= work_ahead:
                return lo  # it starts as the slot ending this piece's left edge frees
            t = (work_ahead - base) / slope
            if t <= hi:
                return t
        return max(0.0, work_ahead - held)  # pragma: no cover - the last piece is unbounded


class ArrivalRate:
    """Arrivals per second, exponentially decayed with time constant tau_s (no clock: `now`)."""

    __slots__ = ("tau_s", "rate", "last_s")

    def __init__(self, tau_s: float) -> None:
        self.tau_s, self.rate, self.last_s = tau_s, 0.0, -math.inf

    def at(self, now: float) -> float:
        if self.last_s == -math.inf:
            return 0.0
        return self.rate * math.exp(-max(0.0, now - self.last_s) / self.tau_s)

    def add(self, now: float) -> None:
        self.rate = self.at(now) + 1.0 / self.tau_s
        self.last_s = max(now, self.last_s)


class RwtEstimator:
    def __init__(self, classes: Mapping[str, SloClass], config: ManagerConfig) -> None:
        self.classes = classes
        self.config = config
        self._arrivals: dict[tuple[str, str], ArrivalRate] = {}
        self._out: dict[tuple[str, str], Ewma] = {}
        self._prompt: dict[str, Ewma] = {}
        self._corr: dict[tuple[str, str, int], Ewma] = {}  # observed / predicted decode step
        self._perf: dict[tuple[str, str, int], PerfModel | None] = {}
        self._profiles: dict[tuple[str, str, int, int], ServiceProfile] = {}
        self.recal = Recalibrator(config.ewma_alpha, enabled=config.recalibrate)
        # Measured model loads, (model, gpu, tp, warm) -> (count, mean seconds): once a load was
        # seen, plans cost a load at its mean instead of the datasheet figure (perf.load_s).
        self._loads: dict[tuple[str, str, int, bool], tuple[int, float]] = {}
        # instance -> (decayed cached tokens, decayed context tokens) of resumed requests
        self._resume_hits: dict[str, tuple[float, float]] = {}

    # ------------------------------------------------------------------ statistics
    def output_stats(self, model: str, slo_class: str) -> tuple[float, float]:
        e = self._out.get((model, slo_class))
        if e is None:
            p = self.config.priors.get((model, slo_class), self.config.default_prior)
            return p.mean_tokens, p.std_tokens**2
        return e.mean, e.var

    def observe_output(self, model: str, slo_class: str, tokens: int) -> None:
        key = (model, slo_class)
        e = self._out.get(key)
        if e is None:
            m, v = self.output_stats(model, slo_class)
            e = self._out[key] = Ewma(m, v)
        e.update(float(tokens), self.config.ewma_alpha)
        self._invalidate(model)

    def observe_arrival(self, model: str, slo_class: str, now: float) -> None:
        key = (model, slo_class)
        r = self._arrivals.get(key)
        if r is None:
            r = self._arrivals[key] = ArrivalRate(self.config.arrival_rate_tau_s)
        r.add(now)

    def arrival_rate(self, model: str, slo_class: str, now: float) -> float:
        """Recent arrivals per second of a (model, class)."""
        r = self._arrivals.get((model, slo_class))
        return r.at(now) if r is not None else 0.0

    def prompt_mean(self, model: str) -> float:
        e = self._prompt.get(model)
        return e.mean if e is not None else DEFAULT_PROMPT_TOKENS

    def observe_prompt(self, model: str, tokens: int) -> None:
        e = self._prompt.get(model)
        if e is None:
            self._prompt[model] = e = Ewma(float(tokens), 0.0)
        else:
            e.update(float(tokens), self.config.ewma_alpha)
        # Prompt drift changes profiles only slowly; refresh them every 64 observations.
        if e.n % 64 == 0:
            self._invalidate(model)

    def observe_step(
        self, model: str, spec: InstanceSpec, step_s: float, batch: int, context_tokens: int
    ) -> None:
        """An observed decode step time at a batch size: learns the roofline's correction."""
        perf = self.perf(model, spec)
        if perf is None or step_s <= 0 or batch <= 0:
            return
        predicted = perf.decode_step_s(batch, context_tokens)
        key = (model, spec.gpu, spec.tp)
        e = self._corr.setdefault(key, Ewma(1.0, 0.0))
        e.update(step_s / predicted, self.config.ewma_alpha)
        self._invalidate(model)

    def observe_finished(
        self, st: RequestState, output_tokens: int, inst: InstanceState, now: float
    ) -> None:
        """A finished request teaches the output length of its (model, class) and, from its
        token cadence, the decode step time at the batch its instance ran."""
        r = st.req
        self._recalibrate_first_token(st, inst)  # first: it reads the profile the planner used
        if not r.output_fixed:  # a length the caller fixed says nothing of the class's lengths
            self.observe_output(r.model, r.slo_class, output_tokens)
        if st.first_token_s is None or st.evictions or output_tokens < 8:
            return
        step = (now - st.first_token_s) / (output_tokens - 1)
        batch = max(1, len(inst.in_flight) + 1)
        ctx = int(batch * (self.prompt_mean(r.model) + output_tokens / 2))
        self.observe_step(r.model, inst.spec, step, batch, ctx)

    # ------------------------------------------------------------------ recalibration
    def _recalibrate_first_token(self, st: RequestState, inst: InstanceState) -> None:
        """A request that ran once: its pull-to-first-token delay against the profile's, and how
        many requests its instance held (core/recalibration.py)."""
        if not self.recal.enabled or st.evictions:
            return
        if st.dispatched_s is None or st.first_token_s is None:
            return
        spec, model = inst.spec, st.req.model
        # Only a profile already cached: computing one here would fill the cache at a moment the
        # planner did not, and a profile depends on when it is computed (the prompt mean drifts).
        prof = self._profiles.get((model, spec.gpu, spec.tp, spec.max_in_flight))
        if prof is None:
            return
        delay = st.first_token_s - st.dispatched_s
        held = len(inst.in_flight) + 1  # it has left the in-flight set already
        key = (model, spec.gpu, spec.tp)
        if self.recal.observe_first_token(key, delay, prof.prefill_first_s, held):
            self._invalidate(model)

    def _invalidate(self, model: str) -> None:
        for k in [k for k in self._profiles if k[0] == model]:
            del self._profiles[k]

    # ------------------------------------------------------------------ service model
    def perf(self, model: str, spec: InstanceSpec) -> PerfModel | None:
        key = (model, spec.gpu, spec.tp)
        if key not in self._perf:
            try:
                self._perf[key] = PerfModel.from_names(model, spec.gpu, spec.tp)
            except ValueError:
                self._perf[key] = None  # does not fit: the instance cannot serve this model
        return self._perf[key]

    def can_serve(self, model: str, spec: InstanceSpec) -> bool:
        return model in spec.models_allowed and self.perf(model, spec) is not None

    def profile(self, model: str, spec: InstanceSpec, bound: int | None = None) -> ServiceProfile:
        bound = spec.max_in_flight if bound is None else bound
        key = (model, spec.gpu, spec.tp, bound)
        prof = self._profiles.get(key)
        if prof is not None:
            return prof
        perf = self.perf(model, spec)
        if perf is None:
            raise ValueError(f"model {model} does not fit on instance {spec.instance_id}")
        prompt = self.prompt_mean(model)
        outs = [self.output_stats(m, c)[0] for (m, c) in self._out if m == model]
        out = sum(outs) / len(outs) if outs else self.config.default_prior.mean_tokens
        # The batch a busy instance runs: the pull bound, the engine's sequence cap, and how many
        # average full contexts its KV cache holds (beyond that vLLM preempts).
        kv_fit = max(1, int(perf.kv_capacity_tokens // max(1.0, prompt + out)))
        # Full contexts are a pessimistic count: a concurrency seen running promptly is a floor.
        kv_fit = self.recal.kv_fit((model, spec.gpu, spec.tp), kv_fit)
        batch = max(1, min(bound, ENGINE_MAX_SEQS, kv_fit))
        corr = self._corr.get((model, spec.gpu, spec.tp))
        c = corr.mean if corr is not None else 1.0
        step = perf.decode_step_s(batch, int(batch * (prompt + out / 2))) * c
        pre = perf.prefill_s(int(prompt)) * c
        # A prefill rides in one iteration with the decodes: what it adds beyond a decode step.
        stall = max(0.0, pre - perf.decode_step_s(1, 0) * c)
        prof = ServiceProfile(
            model=model,
            batch=batch,
            step_s=step,
            prefill_first_s=0.5 * step + pre,
            prefill_stall_s=stall,
            load_warm_s=perf.load_s(warm=True),
            load_cold_s=perf.load_s(warm=False),
        )
        self._profiles[key] = prof
        return prof

    def request_work(
        self, st: RequestState, prof: ServiceProfile, *, oracle: bool = False
    ) -> tuple[float, float]:
        """Instance-seconds (mean, variance) a queued request will take, resumption included."""
        r = st.req
        if oracle and r.true_output_tokens is not None:
            mean_o, var_o = float(max(1, r.true_output_tokens - st.tokens_done)), 0.0
        elif r.output_fixed:
            mean_o, var_o = float(max(1, r.max_tokens - st.tokens_done)), 0.0
        else:
            m, v = self.output_stats(r.model, r.slo_class)
            mean_o = min(float(r.max_tokens), max(1.0, m - st.tokens_done, 0.25 * m))
            var_o = v
        c = prof.token_cost_s
        return mean_o * c + prof.prefill_stall_s, var_o * c * c

    def group_work(
        self, model: str, slo_class: str, n: int, prof: ServiceProfile
    ) -> tuple[float, float]:
        """(mean, variance) of the instance-seconds of n fresh requests of a (model, class)."""
        m, v = self.output_stats(model, slo_class)
        c = prof.token_cost_s
        return n * (m * c + prof.prefill_stall_s), n * v * c * c

    def inflight_remaining(
        self,
        inst: InstanceState,
        requests: Mapping[str, RequestState],
        prof: ServiceProfile,
        now: float,
        *,
        oracle: bool = False,
    ) -> tuple[list[float], float]:
        """Instance-seconds still owed to each in-flight request (means), and their summed variance."""
        out: list[float] = []
        v = 0.0
        c = prof.token_cost_s
        for rid in inst.in_flight:
            st = requests[rid]
            r = st.req
            done = float(st.tokens_done)
            if st.first_token_s is not None and prof.step_s > 0:
                done = max(done, (now - st.first_token_s) / prof.step_s)
            if oracle and r.true_output_tokens is not None:
                rem, var_o = max(1.0, r.true_output_tokens - done), 0.0
            elif r.output_fixed:
                rem, var_o = max(1.0, r.max_tokens - done), 0.0
            else:
                m, var_o = self.output_stats(r.model, r.slo_class)
                # Memory of a long-tailed length: past the mean, a quarter of the mean is left.
                rem = min(max(1.0, r.max_tokens - done), max(m - done, 0.25 * m))
            out.append(rem * c + (prof.prefill_stall_s if st.first_token_s is None else 0.0))
            v += var_o * c * c
        return out, v

    def inflight_backlog(
        self,
        inst: InstanceState,
        requests: Mapping[str, RequestState],
        prof: ServiceProfile,
        now: float,
        *,
        oracle: bool = False,
    ) -> tuple[int, float, float]:
        """(count, mean, variance) of the instance-seconds still owed to in-flight requests."""
        rem, v = self.inflight_remaining(inst, requests, prof, now, oracle=oracle)
        return len(rem), sum(rem), v

    def first_slot_s(
        self,
        inst: InstanceState,
        requests: Mapping[str, RequestState],
        now: float,
        *,
        oracle: bool = False,
        bound: int | None = None,
    ) -> float:
        """Seconds from now until the instance can start one more request of the model it runs or
        loads (the same slot model as forecast_queue; inf when unhealthy)."""
        if not inst.healthy:
            return math.inf
        if inst.loading is not None:
            return max(0.0, inst.ready_s - now)
        if inst.model is None or not inst.in_flight:
            return 0.0
        prof = self.profile(inst.model, inst.spec, bound)
        rem, _ = self.inflight_remaining(inst, requests, prof, now, oracle=oracle)
        return SlotClock(prof.batch, rem).start(0, sum(rem))

    def load_s(self, model: str, spec: InstanceSpec, warm: bool) -> float:
        """What a load of `model` on this kind of instance costs: the mean of the loads measured
        so far (observe_load), else the datasheet figure (the roofline's perf.load_s)."""
        seen = self._loads.get((model, spec.gpu, spec.tp, warm))
        if seen is not None:
            return seen[1]
        p = self.profile(model, spec)
        return p.load_warm_s if warm else p.load_cold_s

    def observe_load(self, model: str, spec: InstanceSpec, warm: bool, seconds: float) -> None:
        """A load of `model` took `seconds` (from its SwapModel to the model serving)."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            return
        key = (model, spec.gpu, spec.tp, warm)
        n, mean = self._loads.get(key, (0, 0.0))
        self._loads[key] = (n + 1, mean + (seconds - mean) / (n + 1))

    def measured_loads(self) -> dict[tuple[str, str, int, bool], tuple[int, float]]:
        """(model, gpu, tp, warm) -> (loads seen, mean seconds)."""
        return dict(self._loads)

    def observe_resume(self, instance_id: str, cached_tokens: int, context_tokens: int) -> None:
        """A resumed request found `cached_tokens` of its `context_tokens` in the engine's prefix
        cache. Token-weighted and decaying (RESUME_HIT_DECAY per resume), so a change of load
        shows within tens of resumes."""
        if context_tokens <= 0:
            return
        c, t = self._resume_hits.get(instance_id, (0.0, 0.0))
        d = RESUME_HIT_DECAY
        self._resume_hits[instance_id] = (
            d * c + min(cached_tokens, context_tokens),
            d * t + context_tokens,
        )

    def resume_hit_share(self, instance_id: str) -> float:
        """Share of a resumed request's context its engine still caches; 0 until one is seen
        (the charge of a whole re-prefill, docs/scheduling.md)."""
        c, t = self._resume_hits.get(instance_id, (0.0, 0.0))
        return c / t if t > 0 else 0.0

    # ------------------------------------------------------------------ queue forecast
    def forecast_queue(
        self,
        inst: InstanceState,
        entries: Sequence[QueueEntry],
        ctx: PlanContext,
        now: float,
        *,
        oracle: bool = False,
        bound: int | None = None,
    ) -> list[GroupForecast]:
        """Forecast every entry of an instance's virtual queue, in order."""
        spec = inst.spec
        out: list[GroupForecast] = []
        if not inst.healthy:
            for e in entries:
                g = ctx.groups.groups.get(e.group_id)
                w = ctx.classes[g.slo_class].weight if g is not None else 1.0
                n = len(e.request_ids)
                out.append(
                    GroupForecast(
                        e.group_id, n, math.inf, math.inf, math.inf, 0.0, 0.0, w * n, False
                    )
                )
            return out
        cursor = now
        seg_model = inst.model
        k_ahead, work, var = 0, 0.0, 0.0
        clock: SlotClock | None = None  # slot model of the current model segment
        if inst.loading is not None:
            seg_model = inst.loading
            cursor = max(now, inst.ready_s)
        elif inst.model is not None:
            prof = self.profile(inst.model, spec, bound)
            rem, var = self.inflight_remaining(inst, ctx.requests, prof, now, oracle=oracle)
            k_ahead, work = len(rem), sum(rem)
            clock = SlotClock(prof.batch, rem)
        floor = self.config.rel_std_floor
        for e in entries:
            rids = e.request_ids
            n = len(rids)
            if n == 0:
                continue
            st0 = ctx.requests[rids[0]]
            model, cls = st0.req.model, ctx.classes[st0.req.slo_class]
            swap = model != seg_model
            if swap:
                warm = ctx.warm.is_warm(spec.host, model)
                cursor += work + self.load_s(model, spec, warm)
                work, k_ahead, seg_model = 0.0, 0, model
                clock = None
            prof = self.profile(model, spec, bound)
            if clock is None:
                clock = SlotClock(prof.batch)
            # Fast path: fresh requests of one (model, class) share one work distribution; only
            # resumed requests, fixed output lengths (and the oracle's known lengths) need a
            # per-request sum.
            works: list[tuple[float, float]] | None = None
            resumed = ctx.resumed
            if (
                oracle
                or (resumed is None and any(ctx.requests[r].tokens_done for r in rids))
                or (resumed and not resumed.isdisjoint(rids))
                or st0.req.output_fixed  # an entry is one group: all fixed or none
            ):
                works = [self.request_work(ctx.requests[r], prof, oracle=oracle) for r in rids]
                w_mean = sum(x[0] for x in works) / n
                w_var = sum(x[1] for x in works) / n
            else:
                w_mean, w_var = self.group_work(model, cls.name, 1, prof)
            cv2 = w_var / (w_mean * w_mean) if w_mean > 0 else 0.0
            # This entry's requests hold slots for the ones behind them (and for its own later ones).
            q0 = k_ahead - clock.in_flight
            clock.push(n, 0.5 * w_mean * (1.0 + cv2))
            probe = sorted({0, (n - 1) // 2, n - 1})
            ps: list[float] = []
            fts: list[float] = []
            std0 = 0.0
            for j in probe:
                if works is None:
                    cum_w, cum_v = j * w_mean, j * w_var
                else:
                    cum_w = sum(x[0] for x in works[:j])
                    cum_v = sum(x[1] for x in works[:j])
                start = cursor + clock.start(q0 + j, work + cum_w)
                ft = start + prof.prefill_first_s
                std = math.sqrt(var + cum_v + (floor * (ft - now)) ** 2 + 1e-9)
                dl = ctx.requests[rids[j]].req.deadline_s
                ps.append(normal_cdf((dl - ft) / std))
                fts.append(ft)
                if j == 0:
                    std0 = std
            p = (ps[0] + 4 * ps[1] + ps[2]) / 6 if len(ps) == 3 else sum(ps) / len(ps)
            start0 = fts[0] - prof.prefill_first_s
            out.append(
                GroupForecast(
                    e.group_id,
                    n,
                    start0,
                    fts[0],
                    fts[-1],
                    std0,
                    p,
                    cls.weight * n * (1.0 - p),
                    swap,
                )
            )
            work += n * w_mean
            var += n * w_var
            k_ahead += n
        return out


__all__ = [
    "ArrivalRate",
    "Ewma",
    "GroupForecast",
    "RwtEstimator",
    "ServiceProfile",
    "SlotClock",
    "normal_cdf",
]
