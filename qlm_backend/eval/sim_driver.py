"""The executor's virtual-time driver: one simulated engine (ResumableEngine) per instance.

The simulator's loop asks `next_event_s()` when something happens next here and calls
`advance(now)`, which reports to the executor what happened up to `now`: loads that completed
(`on_loaded`) and every token the engines produced (a one-token `Chunk`, stamped with its exact
virtual time; the last one carries the finish reason).

What a request's resume looks like in the engine: prompt + tokens already produced, under the
request id it had before, so the engine's prefix cache serves what it still holds of it; with
`kv_swap` (a host KV swap tier, off by default as in vLLM v1 and the deployed router) a request
evicted with resume "swap" keeps its KV in host memory and is copied back when pulled again on the
same instance. A swap takes PerfModel.load_s(warm) during which the instance serves nothing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from qlm_backend.core.fleet import FleetConfig, InstanceSpec
from qlm_backend.engine.perf import PerfModel
from qlm_backend.engine.sim import EngineRequest
from qlm_backend.eval.resumable import ResumableEngine
from qlm_backend.eval.scenario import WorkloadRequest
from qlm_backend.router.executor import Executor
from qlm_backend.router.flight import Chunk, Flight, StopKind


@dataclass(frozen=True)
class Segment:
    instance_id: str
    model: str | None
    start_s: float
    end_s: float
    kind: Literal["serve", "load-warm", "load-cold"]


@dataclass
class _Inst:
    spec: InstanceSpec
    engine: ResumableEngine | None
    model: str | None
    seg_start_s: float = 0.0
    loading: str | None = None
    ready_s: float = math.inf
    load_kind: Literal["load-warm", "load-cold"] = "load-cold"
    swapping: bool = False  # the load under way is a swap (not a recovery)
    busy_s: float = 0.0  # of engines already replaced


class SimDriver:
    def __init__(
        self,
        fleet: FleetConfig,
        make_engine: Callable[[InstanceSpec, str], ResumableEngine],
        *,
        kv_swap: bool = False,
    ) -> None:
        self.make_engine, self.kv_swap = make_engine, kv_swap
        self.insts: dict[str, _Inst] = {}
        for spec in fleet.instances:
            m = spec.initial_model
            self.insts[spec.instance_id] = _Inst(spec, make_engine(spec, m) if m else None, m)
        self.segments: list[Segment] = []
        self.counters: Counter[str] = Counter()
        self.ex: Executor | None = None
        self._live: dict[str, str] = {}  # request id in an engine -> its stream id
        self._kv_at: dict[str, str] = {}  # request id -> instance whose host holds its KV
        self._cached: dict[str, int] = {}  # resumed request id -> cached tokens, until its token
        self._perf: dict[tuple[str, str, int], PerfModel] = {}

    def bind(self, ex: Executor) -> None:
        self.ex = ex

    def start(self, now: float) -> None:
        for inst in self.insts.values():
            inst.seg_start_s = now

    # ------------------------------------------------------------------ the Driver protocol
    def open(self, flight: Flight, instance_id: str, priority: int, now: float) -> None:
        assert self.ex is not None
        inst = self.insts[instance_id]
        eng = inst.engine
        assert eng is not None, (
            f"{instance_id}: the executor pulled onto an instance with no engine"
        )
        w: WorkloadRequest = flight.payload
        rid, done = flight.rid, flight.tokens_done
        try:
            if done and self.kv_swap and self._kv_at.get(rid) == instance_id:
                er = EngineRequest(
                    rid, w.prompt_tokens, w.max_tokens, w.output_tokens, priority, w.arrival_s
                )
                eng.add_swapped(er, done, now)
                self.counters["kv_swap_in"] += 1
            else:
                er = EngineRequest(
                    rid,
                    w.prompt_tokens + done,
                    w.max_tokens - done,
                    w.output_tokens - done,
                    priority,
                    w.arrival_s,
                )
                if done:
                    self.counters["resume_recompute"] += 1
                    # What the prefix cache still holds of it as it goes back in (the hit
                    # realised at admission may be smaller if it waits in the engine), told to
                    # the executor with the first token, as a real engine reports it.
                    self._cached[rid] = eng.cached_tokens(rid)
                eng.add(er, now)
        except ValueError as e:
            # The engine cannot hold it (prompt over its KV cache): it can never run there.
            self.counters["refused"] += 1
            self.ex.on_stream_error(flight.stream_id, str(e), False, now, kind="invalid")
            return
        self._kv_at.pop(rid, None)
        self._live[rid] = flight.stream_id

    def stop(self, flight: Flight, stream_id: str, kind: StopKind, now: float) -> None:
        inst = self.insts[flight.instance or ""]
        rid = flight.rid
        self._cached.pop(rid, None)
        if self._live.get(rid) == stream_id:
            del self._live[rid]
        if inst.engine is None or not inst.engine.abort(rid, now):
            self.counters["stop_not_in_engine"] += 1
        if kind == "evict-swap" and self.kv_swap and inst.engine is not None:
            perf = inst.engine.perf
            inst.engine.charge_s(perf.kv_swap_s(flight.prompt_tokens + flight.tokens_done), now)
            self._kv_at[rid] = inst.spec.instance_id
            self.counters["kv_swap_out"] += 1
        elif kind != "cancel":
            self.counters["evictions_recompute"] += 1

    def swap(
        self,
        instance_id: str,
        from_model: str | None,
        to_model: str,
        warm: bool,
        keep_from: bool,
        now: float,
    ) -> None:
        self._load(instance_id, to_model, warm, now)
        self.insts[instance_id].swapping = True

    def release(self, instance_id: str, model: str, now: float) -> None:
        pass  # the host's warm set is the executor's: nothing of it lives in a simulated engine

    def _load(self, instance_id: str, to_model: str, warm: bool, now: float) -> None:
        inst = self.insts[instance_id]
        if inst.engine is not None:
            inst.busy_s += inst.engine.stats.busy_s
            self.segments.append(Segment(instance_id, inst.model, inst.seg_start_s, now, "serve"))
        cost = self.perf(to_model, inst.spec).load_s(warm)
        inst.engine, inst.model = None, None
        inst.loading, inst.ready_s = to_model, now + cost
        inst.seg_start_s = now
        inst.load_kind = "load-warm" if warm else "load-cold"

    def recover(self, instance_id: str, model: str, now: float) -> None:
        # Simulated engines do not fail; a recovery is a cold load.
        self._load(instance_id, model, False, now)
        self.insts[instance_id].swapping = False

    # ------------------------------------------------------------------ time
    def perf(self, model: str, spec: InstanceSpec) -> PerfModel:
        key = (model, spec.gpu, spec.tp)
        p = self._perf.get(key)
        if p is None:
            p = self._perf[key] = PerfModel.from_names(model, spec.gpu, spec.tp)
        return p

    def next_event_s(self) -> float:
        t = math.inf
        for inst in self.insts.values():
            if inst.engine is not None:
                e = inst.engine.next_event_s()
                if e is not None and e < t:
                    t = e
            if inst.ready_s < t:
                t = inst.ready_s
        return t

    def busy(self) -> bool:
        return any(
            i.loading is not None or (i.engine is not None and i.engine.next_event_s())
            for i in self.insts.values()
        )

    def advance(self, now: float) -> bool:
        """Report loads done and tokens produced up to `now`; True if the planner should run."""
        ex = self.ex
        assert ex is not None
        progressed = False
        for iid, inst in self.insts.items():
            if inst.loading is None or inst.ready_s > now:
                continue
            model = inst.loading
            self.segments.append(
                Segment(iid, model, inst.seg_start_s, inst.ready_s, inst.load_kind)
            )
            inst.engine = self.make_engine(inst.spec, model)
            inst.model, inst.loading = model, None
            inst.seg_start_s, inst.ready_s = now, math.inf
            warm = (inst.load_kind == "load-warm") if inst.swapping else None
            progressed |= ex.on_loaded(iid, model, now, warm=warm)
        for inst in self.insts.values():
            eng = inst.engine
            if eng is None:
                continue
            t = eng.next_event_s()
            if t is None or t > now:
                continue
            for ev in eng.advance(now):
                sid = self._live.get(ev.request_id)
                if sid is None:
                    continue
                reason = (ev.finish_reason or "length") if ev.finished else None
                if ev.finished:
                    del self._live[ev.request_id]
                cached = self._cached.pop(ev.request_id, None)
                ch = Chunk("", 1, reason, scheduled_s=ev.scheduled_s, cached_tokens=cached)
                progressed |= ex.on_chunk(sid, ch, ev.time_s)
        return progressed

    def finish(self, end_s: float) -> float:
        """Close the timeline at `end_s`; returns engine busy time x GPUs."""
        for inst in self.insts.values():
            if inst.engine is not None:
                inst.busy_s += inst.engine.stats.busy_s
                self.segments.append(
                    Segment(inst.spec.instance_id, inst.model, inst.seg_start_s, end_s, "serve")
                )
            elif inst.loading is not None:
                self.segments.append(
                    Segment(
                        inst.spec.instance_id,
                        inst.loading,
                        inst.seg_start_s,
                        end_s,
                        inst.load_kind,
                    )
                )
        return sum(i.busy_s * i.spec.tp for i in self.insts.values())


__all__ = ["Segment", "SimDriver"]
