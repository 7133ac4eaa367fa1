"""The `qlm` router as a Triton Python-backend model (decoupled): decode, validate, hand over, send.

One asyncio loop thread owns the core and the executor (router/executor.py, also run by qlm-eval),
which acts through the stream driver over Triton gRPC; responses leave from the relay's thread
(router/relay.py). Every accepted request ends with a complete response or an explicit error.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from qlm_backend.contract import ROUTER_INPUT_NAMES
from qlm_backend.core.fleet import load_fleet
from qlm_backend.core.manager import QueueManager
from qlm_backend.engine.hardware import MODELS
from qlm_backend.engine.tokens import count_prompt_tokens
from qlm_backend.router.config import RouterConfig, load_router_config
from qlm_backend.router.dispatch import EngineServer
from qlm_backend.router.executor import Executor
from qlm_backend.router.flight import Flight
from qlm_backend.router.relay import Relay
from qlm_backend.router.request import RouterRequest, parse_router_request
from qlm_backend.router.stream_driver import StreamDriver, engine_fields
from qlm_backend.triton.glue import LoopThread, error_kind, model_config, read_inputs, send_error
from qlm_backend.triton.repository import engine_config_dict, engine_model_name
from qlm_backend.triton.router_metrics import RouterMetrics
from qlm_backend.triton.router_sink import TritonSink


class RouterModel:
    """TritonPythonModel of `qlm`: model.py does `from ... import RouterModel as TritonPythonModel`."""

    def initialize(self, args: dict[str, str]) -> None:
        self.logger = pb_utils.Logger
        self.name = name = args["model_name"]
        cfg = model_config(args)
        if not pb_utils.using_decoupled_model_transaction_policy(cfg):
            raise pb_utils.TritonModelException(f"{name}: the router model must be decoupled")
        model_dir = Path(args["model_repository"])
        self.cfg = load_router_config(cfg, model_dir / args["model_version"])
        # Relative to the repository root (an absolute path stays as it is: pathlib's `/`).
        fleet = load_fleet(model_dir.parent / self.cfg.fleet_path(), strict=False)
        # The fleet file may carry the engines' backends and the model of a request naming none.
        backends = {**fleet.extra.get("engine_backends", {}), **self.cfg.instance_backends}
        default_model = self.cfg.default_model or str(fleet.extra.get("default_model", ""))
        merged = {"instance_backends": backends, "default_model": default_model}
        self.cfg = RouterConfig.from_mapping({**self.cfg.__dict__, **merged})
        self.models = {m: MODELS[m].max_context_tokens for m in fleet.models}
        self.classes = {c.name: c.ttft_slo_s for c in fleet.slo_classes}
        for key, value, known in (
            ("default_model", self.cfg.default_model, ["", *self.models]),
            ("default_slo_class", self.cfg.default_slo_class, list(self.classes)),
        ):
            if value not in known:
                raise pb_utils.TritonModelException(
                    f"router config key {key!r}: {value!r} is not one of {sorted(known)}"
                )
        self.cfg.check_timeout(self.classes)
        # Planned as the engines can swap (stock vllm_backend: cold only), with the fleet's warm slots.
        fleet = self.cfg.planning_fleet(fleet)
        self.qm = QueueManager(fleet, self.cfg.policy, self.cfg.manager_config(fleet))
        self.metrics = RouterMetrics(name, [(m, c) for m in self.models for c in self.classes])
        self._servers: dict[str, EngineServer] = {}
        self._ids, self._t0, self._closing = itertools.count(1), time.monotonic(), False
        self._wake: asyncio.Event | None = None
        specs = {i.instance_id: i for i in fleet.instances}
        self.driver = StreamDriver(
            lambda iid: self._server(self.cfg.url_for(iid)),
            engine_model_name,
            self._engine_fields,
            self._load_override,
            self._now,
            warm_mode=lambda iid: self.cfg.warm_mode(iid, specs[iid].warm_start),
            load_timeout_s=self.cfg.load_timeout_s,
            log=self._log,
            on_probe=self.metrics.probe,
        )
        self.ex = Executor(
            self.qm, self.driver, fleet.instances,
            on_outcome=self.metrics.ended,
            on_lso=self.metrics.lso, wake=self._wakeup, log=self._log,
            on_resume=self.metrics.resume,
            request_timeout_s=self.cfg.request_timeout_s / self.cfg.time_scale,  # core seconds
            timeout_message=f"{name}: request timed out: not finished "
            f"{self.cfg.request_timeout_s:g} s after receipt (request_timeout_s)",
        )  # fmt: skip
        self.driver.bind(self.ex)
        self.loop = LoopThread(f"{name}-router")
        self.relay = Relay(self.loop.loop.call_soon_threadsafe, f"{name}-relay")
        self._runner = self.loop.submit(self._run())
        self.logger.log_info(
            f"{name}: policy {self.cfg.policy}, {len(fleet.instances)} instances, models "
            f"{sorted(self.models)}, engines at {self.cfg.local_url()}, repository API key "
            f"{'set' if self.cfg.admin_key() else 'not set'}"
        )

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                rr = parse_router_request(
                    read_inputs(request, ROUTER_INPUT_NAMES), request.parameters(),
                    models=self.models, slo_classes=self.classes,
                    default_slo_class=self.cfg.default_slo_class,
                    count_tokens=count_prompt_tokens, max_prompt_bytes=self.cfg.max_prompt_bytes,
                    default_model=self.cfg.default_model,
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - every bad request gets its error, at once
                send_error(sender, f"{self.name}: {e}", error_kind(e))
                continue
            # Stamped on receipt: the loop may admit it later under load, and that wait is part of
            # the request's queueing (qlm_queue_s, its deadline, its TTFT).
            self.loop.call(self._admit, sender, rr, time.monotonic())

    def finalize(self) -> None:
        self._closing = True
        try:
            self.loop.submit(self._shutdown()).result(timeout=15)
        except Exception as e:  # noqa: BLE001 - best effort on unload
            self.logger.log_warn(f"{self.name}: shutdown: {e!r}")
        self.relay.close()  # after the shutdown's errors were queued: they are delivered
        self.loop.stop()

    def _now(self, wall: float | None = None) -> float:
        """Core time: simulated seconds, so that deadlines and the engines' GPU timings agree."""
        return ((time.monotonic() if wall is None else wall) - self._t0) / self.cfg.time_scale

    def _log(self, level: str, message: str) -> None:
        log = {"error": self.logger.log_error, "warn": self.logger.log_warn}
        log.get(level, self.logger.log_info)(f"{self.name}: {message}")

    def _server(self, url: str) -> EngineServer:
        if url not in self._servers:
            self._servers[url] = EngineServer(url, self.cfg.admin_headers(), self.cfg.admin_key())
        return self._servers[url]

    def _engine_fields(self, f: Flight, instance: str, priority: int) -> dict[str, Any]:
        # Triton's vllm_backend has no `priority` input (its PR is unmerged) and no
        # num_cached_tokens output: sending either is an error there.
        ours = self.cfg.backend_for(instance) != "vllm"
        send = self.cfg.forward_priority and ours
        return engine_fields(
            f.payload.params, "".join(f.text), f.tokens_done, priority if send else None, ours
        )

    def _load_override(self, engine: str, instance: str, warm: bool) -> dict[str, Any] | None:
        params = self.cfg.load_params(instance, warm)  # None for real engines (vllm, qlm-vllm)
        return None if params is None else engine_config_dict(engine, params)

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _admit(self, sender: Any, rr: RouterRequest, received_wall: float) -> None:
        if self._closing:
            send_error(sender, f"{self.name}: the router is unloading", "unavailable")
            return
        if refusal := self.cfg.queue_refusal(len(self.ex.flights)):
            # Refused before it touches the core: the pending requests are not disturbed.
            send_error(sender, f"{self.name}: {refusal}", "unavailable")
            self.metrics.refused(rr.slo_class, "queue_full")
            return
        rid, now = f"q{next(self._ids)}", self._now(received_wall)
        sp = rr.params.sampling
        req = self.qm.make_request(
            rid, rr.model, rr.slo_class, now, rr.prompt_tokens, sp.max_tokens,
            ttft_slo_s=rr.ttft_slo_s, output_fixed=sp.output_fixed,
        )  # fmt: skip
        # Responses leave from the relay's thread (a send is a round trip to the server process);
        # per-token logprobs are never joined.
        gone = lambda: self.ex.cancel(rid, self._now(), None)  # noqa: E731 - client left
        inner = TritonSink(sender, rr, self.cfg.time_scale)
        join = "return_logprobs" not in rr.params.returns
        sink = self.relay.sink(inner, gone, join, heartbeat_s=rr.heartbeat_s)
        flight = Flight(
            rid, rr.model, rr.slo_class, now, req.deadline_s, rr.prompt_tokens, sp.max_tokens,
            stream=rr.params.stream, payload=rr, sink=sink,
        )  # fmt: skip
        self.ex.admit(flight, req, now)
        if (lag_ms := (time.monotonic() - received_wall) * 1000) > 100:
            self.logger.log_warn(f"{self.name}: {rid} admitted {lag_ms:.0f} ms after receipt")

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
                    self.ex.poll_cancelled(self._now())
                    self.relay.keepalive(self.ex.flights.values())
                self.ex.step(self._now())
                self.metrics.planner(self.qm.decisions)
                if wall - last_metrics >= self.cfg.metrics_interval_s:
                    last_metrics = wall
                    self.metrics.queues(self.qm.queue_stats(self._now()))
            except Exception as e:  # noqa: BLE001 - the loop must survive; log and go on
                self.logger.log_error(f"{self.name}: planner step failed: {e!r}")

    async def _shutdown(self) -> None:
        self.ex.shutdown(self._now(), f"{self.name}: the router is unloading")
        await self.driver.close()
        for srv in self._servers.values():
            try:
                await srv.close()
            except Exception:  # noqa: BLE001 - best effort on unload
                pass
