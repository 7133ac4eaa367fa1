"""The `qlm` router as a Triton Python-backend model (decoupled): the QLM core's plan, carried out.

execute() only validates and enqueues. One asyncio loop thread owns the QueueManager: it admits
requests, calls `plan(now)` on every event and on a tick, and executes the actions: a Pull streams
the request from its engine model over gRPC (engine responses go straight back through the client's
response sender), an Evict cancels that stream and queues the request again (it resumes with the
prompt plus the text already produced, so the client sees one continuous stream), a SwapModel
unloads and loads engine models through the engine server's model repository API.
Every accepted request ends with a complete response or an explicit error, with the FINAL flag.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from qlm_backend.contract import output_arrays
from qlm_backend.core.actions import (
    Action,
    Evict,
    KeepWarm,
    Pull,
    Rebalance,
    Reject,
    Release,
    SwapModel,
)
from qlm_backend.core.fleet import FleetConfig, load_fleet
from qlm_backend.core.manager import QueueManager
from qlm_backend.engine.hardware import MODELS
from qlm_backend.engine.tokens import count_prompt_tokens
from qlm_backend.router.admission import ROUTER_INPUTS, RouterRequest, parse_router_request
from qlm_backend.router.config import RouterConfig, load_router_config
from qlm_backend.router.dispatch import EngineError, EngineServer
from qlm_backend.triton.glue import (
    LoopThread,
    error_kind,
    make_response,
    model_config,
    read_inputs,
    send_error,
)
from qlm_backend.triton.repository import engine_model_name
from qlm_backend.triton.router_metrics import RouterMetrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclass
class _Req:
    rid: str
    sender: Any
    rr: RouterRequest
    arrival_wall: float
    text: list[str] = field(default_factory=list)
    tokens_done: int = 0
    gen: int = 0  # dispatch generation: a stale stream (evicted, failed) never touches the request
    stream: Any = None
    instance: str | None = None
    dispatched_wall: float | None = None
    first_token_wall: float | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)


class RouterModel:
    """TritonPythonModel of `qlm`: model.py does `from ... import RouterModel as TritonPythonModel`."""

    def initialize(self, args: dict[str, str]) -> None:
        self.logger = pb_utils.Logger
        self.name = args["model_name"]
        cfg = model_config(args)
        if not pb_utils.using_decoupled_model_transaction_policy(cfg):
            raise pb_utils.TritonModelException(f"{self.name}: the router model must be decoupled")
        model_dir = Path(args["model_repository"])
        self.cfg: RouterConfig = load_router_config(cfg, model_dir / args["model_version"])
        fleet_path = Path(self.cfg.fleet_path())
        if not fleet_path.is_absolute():
            fleet_path = model_dir.parent / fleet_path
        self.fleet: FleetConfig = load_fleet(fleet_path, strict=False)
        backends = self.fleet.extra.get("engine_backends") or {}
        if backends:
            self.cfg = RouterConfig.from_mapping(
                {
                    **{k: getattr(self.cfg, k) for k in RouterConfig.__dataclass_fields__},
                    "instance_backends": {**backends, **self.cfg.instance_backends},
                }
            )
        self.qm = QueueManager(self.fleet, self.cfg.policy, self.cfg.manager_config())
        self.models = {m: MODELS[m].max_context_tokens for m in self.fleet.models}
        self.classes = {c.name: c.ttft_slo_s for c in self.fleet.slo_classes}
        if self.cfg.default_slo_class not in self.classes:
            raise pb_utils.TritonModelException(
                f"router config key 'default_slo_class': unknown class {self.cfg.default_slo_class!r}"
            )
        self.metrics = RouterMetrics(self.name, [(m, c) for m in self.models for c in self.classes])
        self.reqs: dict[str, _Req] = {}
        self._ids = itertools.count(1)
        self._t0 = time.monotonic()
        self._closing = False
        self._servers: dict[str, EngineServer] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loading: dict[str, asyncio.Task[Any]] = {}
        self._cancel_cursor = 0
        self._wake: asyncio.Event | None = None
        self.loop = LoopThread(f"{self.name}-router")
        self._runner = self.loop.submit(self._run())
        self.logger.log_info(
            f"{self.name}: policy {self.cfg.policy}, {len(self.fleet.instances)} instances, "
            f"models {sorted(self.models)}, engines at {self.cfg.local_url()}, "
            f"repository API key {'set' if self.cfg.admin_key() else 'not set'}"
        )

    # --- Triton entry points ------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                rr = parse_router_request(
                    read_inputs(request, ROUTER_INPUTS),
                    request.parameters(),
                    models=self.models,
                    slo_classes=self.classes,
                    default_slo_class=self.cfg.default_slo_class,
                    count_tokens=count_prompt_tokens,
                    max_prompt_bytes=self.cfg.max_prompt_bytes,
                )
            except Exception as e:  # noqa: BLE001 - every bad request gets its error, at once
                send_error(sender, f"{self.name}: {e}", error_kind(e))
                continue
            # Stamped here, on receipt: the loop may run the admission later under load, and that
            # wait is part of the request's queueing (qlm_queue_s, its deadline, its TTFT).
            self.loop.call(self._admit, sender, rr, time.monotonic())
        return None

    def finalize(self) -> None:
        self._closing = True
        fut = self.loop.submit(self._shutdown())
        try:
            fut.result(timeout=15)
        except Exception as e:  # noqa: BLE001 - best effort on unload
            self.logger.log_warn(f"{self.name}: shutdown: {e!r}")
        self.loop.stop()

    # --- clock and servers --------------------------------------------------------------------
    def _now(self, wall: float | None = None) -> float:
        """Core time (of `wall`, default now): simulated seconds, so that deadlines and the
        engines' GPU timings agree."""
        return ((time.monotonic() if wall is None else wall) - self._t0) / self.cfg.time_scale

    def _server(self, instance_id: str) -> EngineServer:
        url = self.cfg.url_for(instance_id)
        srv = self._servers.get(url)
        if srv is None:
            srv = self._servers[url] = EngineServer(url, self.cfg.admin_headers())
        return srv

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- admission ----------------------------------------------------------------------------
    def _admit(self, sender: Any, rr: RouterRequest, received_wall: float) -> None:
        if self._closing:
            send_error(sender, f"{self.name}: the router is unloading", "unavailable")
            return
        rid = f"q{next(self._ids)}"
        now = self._now(received_wall)
        req = self.qm.make_request(
            rid,
            rr.model,
            rr.slo_class,
            now,
            rr.prompt_tokens,
            rr.params.sampling.max_tokens,
            ttft_slo_s=rr.ttft_slo_s,
            output_fixed=rr.params.sampling.output_fixed,
        )
        rej = self.qm.add_request(req, now)
        if rej is not None:
            self.metrics.outcome(rr.slo_class, "rejected")
            send_error(sender, f"{self.name}: request shed: {rej.reason}", "unavailable")
            return
        self.reqs[rid] = _Req(rid, sender, rr, received_wall)
        lag_ms = (time.monotonic() - received_wall) * 1000
        if lag_ms > 100:
            self.logger.log_warn(f"{self.name}: {rid} admitted {lag_ms:.0f} ms after receipt")
        self._wakeup()

    # --- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        self._wake = asyncio.Event()
        last_poll = last_metrics = 0.0
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.tick_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                wall = time.monotonic()
                if wall - last_poll >= self.cfg.cancel_poll_s:
                    last_poll = wall
                    self._poll_cancelled()
                for action in self.qm.plan(self._now()):
                    self._execute(action)
                self.metrics.planner(self.qm.decisions)
                if wall - last_metrics >= self.cfg.metrics_interval_s:
                    last_metrics = wall
                    self.metrics.queues(self.qm.queue_stats(self._now()))
            except Exception as e:  # noqa: BLE001 - the loop must survive; log and go on
                self.logger.log_error(f"{self.name}: planner step failed: {e!r}")

    def _execute(self, a: Action) -> None:
        self.logger.log_verbose(f"{self.name}: {a}")
        if isinstance(a, Pull):
            self.metrics.lso("pull", len(a.request_ids))
            for rid in a.request_ids:
                st = self.reqs.get(rid)
                if st is None:  # cancelled between plan and act: the core already forgot it
                    continue
                st.gen += 1
                st.instance = a.instance_id
                if st.dispatched_wall is None:
                    st.dispatched_wall = time.monotonic()
                # The Pull's priority is what the engine sees: the class priority for a policy that
                # schedules in the engine by priority (traits.engine_scheduling), else 0, exactly
                # as qlm-eval's engines see it.
                self._spawn(self._dispatch(st, a.instance_id, a.priority, st.gen))
        elif isinstance(a, Evict):
            self.metrics.lso("evict_swap" if a.resume == "swap" else "evict")
            st = self.reqs.get(a.request_id)
            if st is None:
                return
            st.gen += 1  # the running stream is now stale
            if st.stream is not None:
                st.stream.cancel()
                st.stream = None
            self.qm.on_evicted(a.request_id, st.tokens_done, self._now())
        elif isinstance(a, SwapModel):
            self.metrics.lso("swap_model_warm" if a.warm else "swap_model_cold")
            self._loading[a.instance_id] = self._spawn(self._swap(a))
        elif isinstance(a, Reject):
            st = self.reqs.pop(a.request_id, None)
            self.metrics.lso("reject")
            if st is not None:
                self.metrics.outcome(st.rr.slo_class, "rejected")
                send_error(st.sender, f"{self.name}: request shed: {a.reason}", "unavailable")
        elif isinstance(a, KeepWarm):
            self.metrics.lso("keep_warm")
        elif isinstance(a, Release):
            self.metrics.lso("release")
        elif isinstance(a, Rebalance):
            self.metrics.lso("rebalance")

    # --- dispatch -----------------------------------------------------------------------------
    def _engine_fields(self, st: _Req, priority: int) -> dict[str, Any]:
        p = st.rr.params
        sampling = p.sampling.as_vllm_dict()
        sampling["max_tokens"] = p.sampling.max_tokens - st.tokens_done
        sampling["min_tokens"] = max(0, p.sampling.min_tokens - st.tokens_done)
        fields: dict[str, Any] = {
            # A resumed request carries what it already produced; the engine continues from there.
            "text_input": p.prompt + "".join(st.text),
            "stream": True,
            "exclude_input_in_output": True,
            "sampling_parameters": json.dumps(sampling),
            "return_finish_reason": True,
            "return_num_output_tokens": True,
        }
        for flag in ("return_cumulative_logprob", "return_logprobs", "return_num_input_tokens"):
            if flag in p.returns:
                fields[flag] = True
        # Triton's vllm_backend has no `priority` input (its PR is unmerged): sending one is an error.
        if self.cfg.forward_priority and self.cfg.backend_for(st.instance or "") != "vllm":
            fields["priority"] = int(priority)
        return fields

    async def _dispatch(self, st: _Req, instance: str, priority: int, gen: int) -> None:
        if st.gen != gen or self.reqs.get(st.rid) is not st:
            # Cancelled or evicted between the Pull and this task's first step: there was no
            # stream to stop then, so none may be opened now (it would run to its end unseen).
            return
        engine = engine_model_name(st.rr.model, instance)
        stream = self._server(instance).stream(
            engine, self._engine_fields(st, priority), f"{st.rid}.{gen}"
        )
        st.stream = stream
        try:
            async for ch in stream.chunks():
                if st.gen != gen:
                    return
                st.text.append(ch.text)
                st.tokens_done += ch.num_output_tokens
                st.extras.update(ch.extras)
                if st.first_token_wall is None and ch.num_output_tokens > 0:
                    st.first_token_wall = time.monotonic()
                    self.qm.on_first_token(st.rid, self._now())
                final = ch.finish_reason is not None
                if st.rr.params.stream:
                    self._respond(st, ch.text, ch.num_output_tokens, ch.finish_reason, final)
                    if st.gen != gen:  # the send failed: the client is gone, already cancelled
                        return
                if final:
                    self._finish(st, ch.finish_reason)
                    return
        except EngineError as e:
            if st.gen != gen:
                return
            st.stream = None
            now = self._now()
            self.qm.on_tokens_done(st.rid, st.tokens_done, now)
            if e.unavailable:
                # The engine is gone (unloaded, crashed, its server down): queue the request again.
                self.logger.log_warn(f"{self.name}: {e}; re-queueing {st.rid}")
                self.qm.on_engine_failed(instance, now)
                self._spawn(self._recover(instance, st.rr.model))
            else:
                self.reqs.pop(st.rid, None)
                self.qm.on_cancelled(st.rid, now)
                self.metrics.outcome(st.rr.slo_class, "failed")
                send_error(st.sender, f"{self.name}: engine {engine}: {e}", "internal")
            self._wakeup()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug must not leave the client waiting
            self.logger.log_error(f"{self.name}: dispatch of {st.rid} failed: {e!r}")
            if self.reqs.pop(st.rid, None) is not None:
                self.qm.on_cancelled(st.rid, self._now())
                self.metrics.outcome(st.rr.slo_class, "failed")
                send_error(st.sender, f"{self.name}: internal error: {e}", "internal")
        finally:
            if st.gen != gen:
                # Left for a newer generation (evicted, cancelled): make sure this stream's engine
                # request stops, whoever left it (cancel() on an ended stream is a no-op).
                stream.cancel()

    def _respond(self, st: _Req, text: str, n_new: int, reason: str | None, final: bool) -> None:
        p = st.rr.params
        arrays = output_arrays(
            p.returns,
            text,
            reason,
            float(st.extras.get("cumulative_logprob", np.zeros(1)).reshape(-1)[0]),
            None,
            int(
                st.extras.get("num_input_tokens", np.asarray([st.rr.prompt_tokens])).reshape(-1)[0]
            ),
            n_new,
        )
        if "return_logprobs" in p.returns and "logprobs" in st.extras:
            arrays["logprobs"] = st.extras["logprobs"]
        if final:
            queue_s = (st.dispatched_wall or st.arrival_wall) - st.arrival_wall
            arrays["qlm_queue_s"] = np.asarray([queue_s], dtype=np.float64)
            arrays["qlm_instance"] = np.asarray([(st.instance or "").encode()], dtype=np.object_)
        try:
            st.sender.send(make_response(arrays), flags=FINAL if final else 0)
        except Exception as e:  # noqa: BLE001 - client gone: stop the engine's work too
            self.logger.log_warn(
                f"{self.name}: send to the client failed ({e!r}); cancelling {st.rid}"
            )
            self._cancel(st)

    def _finish(self, st: _Req, reason: str | None) -> None:
        self.reqs.pop(st.rid, None)
        st.stream = None
        now = self._now()
        self.qm.on_finished(st.rid, st.tokens_done, now)
        if not st.rr.params.stream:
            text = "".join(st.text)
            if st.rr.params.prepend_input:
                text = st.rr.params.prompt + text
            self._respond(st, text, st.tokens_done, reason, True)
        ttft_s = ((st.first_token_wall or time.monotonic()) - st.arrival_wall) / self.cfg.time_scale
        slo = st.rr.ttft_slo_s if st.rr.ttft_slo_s is not None else self.classes[st.rr.slo_class]
        self.metrics.outcome(st.rr.slo_class, "attained" if ttft_s <= slo else "missed")
        self._wakeup()

    # --- cancellation -------------------------------------------------------------------------
    def _cancel(self, st: _Req) -> None:
        if self.reqs.pop(st.rid, None) is None:
            return
        st.gen += 1
        if st.stream is not None:
            st.stream.cancel()  # reaches the engine's is_cancelled() within a step
            st.stream = None
        self.qm.on_cancelled(st.rid, self._now())
        self.metrics.outcome(st.rr.slo_class, "cancelled")

    def _poll_cancelled(self) -> None:
        # is_cancelled() is an IPC round trip: poll in-flight requests every time and queued ones in a
        # rolling window, so a deep queue does not turn every tick into thousands of IPCs.
        running = [s for s in self.reqs.values() if s.stream is not None]
        queued = [s for s in self.reqs.values() if s.stream is None]
        window = 64
        start = self._cancel_cursor % max(1, len(queued))
        self._cancel_cursor = start + window
        for st in running + queued[start : start + window]:
            if st.sender.is_cancelled():
                self._cancel(st)
                send_error(st.sender, "Request was cancelled", "cancelled")

    # --- model control ------------------------------------------------------------------------
    async def _swap(self, a: SwapModel) -> None:
        srv = self._server(a.instance_id)
        try:
            if a.from_model:
                await srv.unload(engine_model_name(a.from_model, a.instance_id))
            await asyncio.wait_for(
                # No override for real engines: it was sent to every backend (issue 15).
                srv.load(
                    engine_model_name(a.to_model, a.instance_id),
                    self.cfg.load_params(a.instance_id, a.warm),
                ),
                timeout=self.cfg.load_timeout_s,
            )
            self.qm.on_model_loaded(a.instance_id, a.to_model, self._now())
            self.logger.log_info(
                f"{self.name}: {a.instance_id}: {a.from_model} -> {a.to_model} ({'warm' if a.warm else 'cold'})"
            )
        except Exception as e:  # noqa: BLE001 - a failed load fails the instance; recovery retries
            self.logger.log_error(
                f"{self.name}: swap on {a.instance_id} to {a.to_model} failed: {e!r}"
            )
            self.qm.on_engine_failed(a.instance_id, self._now())
            self._spawn(self._recover(a.instance_id, a.to_model))
        finally:
            self._loading.pop(a.instance_id, None)
            self._wakeup()

    async def _recover(self, instance: str, model: str) -> None:
        """Bring a failed instance back with exponential backoff: reload its model (or find it ready)."""
        if instance in self._loading and self._loading[instance] is not asyncio.current_task():
            return
        self._loading[instance] = asyncio.current_task()  # type: ignore[assignment]
        delay = 0.5
        try:
            while not self._closing:
                await asyncio.sleep(delay)
                srv = self._server(instance)
                name = engine_model_name(model, instance)
                try:
                    if not await srv.is_ready(name):
                        await asyncio.wait_for(
                            srv.load(name, self.cfg.load_params(instance, warm=False)),
                            timeout=self.cfg.load_timeout_s,
                        )
                    self.qm.on_model_loaded(instance, model, self._now())
                    self.logger.log_info(f"{self.name}: instance {instance} recovered with {model}")
                    return
                except Exception as e:  # noqa: BLE001 - keep trying, slower
                    self.logger.log_warn(f"{self.name}: instance {instance} still failing: {e}")
                    delay = min(delay * 2, 30.0)
        finally:
            self._loading.pop(instance, None)
            self._wakeup()

    # --- shutdown -----------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        for st in list(self.reqs.values()):
            self._cancel(st)
            send_error(st.sender, f"{self.name}: the router is unloading", "unavailable")
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for srv in self._servers.values():
            try:
                await srv.close()
            except Exception:  # noqa: BLE001
                pass
