"""Router configuration: `router.json` next to the router's model.py, and config.pbtxt parameters.

Keys (all optional but the policy has a default too):
  policy               any registered core policy (qlm, fcfs, edf, priority, shepherd,
                       flow-control, qlm-true-lengths)
  fleet                fleet file, relative to the model repository root (default fleet.json);
                       $QLM_FLEET (set by `qlm-serve --fleet`) overrides it. The fleet file may
                       carry `engine_backends: {instance_id: backend}` beside its instances.
  time_scale           wall seconds per simulated second; must match the engines' time_scale
  default_slo_class    class of a request that names none
  default_model        logical model of a request that names none ("" = `model` is required);
                       lets vllm_backend clients, which send no `model`, call `qlm` unchanged.
                       The fleet file's `default_model` applies when this key is not set.
  engine_url           gRPC address of the server running local engines ("" = this server)
  instance_servers     {instance_id: "grpc://host:port"} for instances on other Triton servers
  tick_s               planner tick, wall seconds
  cancel_poll_s        how often queued/running requests are checked for client cancellation
  metrics_interval_s   how often gauges are pushed to Triton's metrics endpoint
  forward_priority     pass the class priority to engines (vLLM priority scheduling)
  load_timeout_s       a model load that takes longer fails the instance
  max_prompt_bytes     request size cap on text_input
  max_pending_requests bound on the requests the router holds: queued in it, or waiting or running
                       in an engine (policies other than qlm push their queue into the engines). A
                       request arriving at the bound is refused at once (UNAVAILABLE, "queue is
                       full"), counted, and nobody pending is disturbed
  request_timeout_s    wall seconds after receipt by which a request must have finished; one that
                       has not (queued, or in an engine that does not answer) ends with an explicit
                       error and its engine stream is stopped. Must exceed every class's TTFT SLO
                       (checked at load, against the fleet)
  admin_key_env        environment variable holding the model-repository key (restricted API)
  admin_header         header of that key (gRPC metadata `triton-grpc-protocol-<admin_header>`)
  engine_backend       what the engine models are: "sim" (simulated; loads carry a config override
                       with the warm/cold load mode), "qlm-vllm" (our real vLLM engine model: plain
                       loads, takes `priority`), "vllm" (Triton's vllm_backend: plain loads, no
                       `priority` input)
  instance_backends    {instance_id: backend} overrides of engine_backend (mixed fleets)
  manager              overrides of the core's ManagerConfig fields
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from qlm_backend.core.config import ManagerConfig
from qlm_backend.core.fleet import FleetConfig
from qlm_backend.core.policies import validate_policy_name
from qlm_backend.router.stream_driver import WarmMode
from qlm_backend.settings import coerce, read_settings

CONFIG_FILE = "router.json"
ENGINE_BACKENDS = ("sim", "qlm-vllm", "vllm")
GRPC_URL_ENV = "QLM_GRPC_URL"  # set by qlm-serve / TritonServer: this server's own gRPC address
FLEET_ENV = "QLM_FLEET"  # set by `qlm-serve --fleet FILE`: overrides the `fleet` key


class RouterConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"router config key {key!r}: {message}")
        self.key = key


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "qlm"
    fleet: str = "fleet.json"
    time_scale: float = 1.0
    default_slo_class: str = "interactive"
    default_model: str = ""
    engine_url: str = ""
    instance_servers: Mapping[str, str] = field(default_factory=dict)
    tick_s: float = 0.02
    cancel_poll_s: float = 0.1
    metrics_interval_s: float = 0.5
    forward_priority: bool = True
    load_timeout_s: float = 600.0
    max_prompt_bytes: int = 1 << 20
    # Above the 2,860 concurrent streams the 10x overload bench holds (docs/reliability.md), yet a
    # bound on memory (a queued request keeps its prompt) and on the planner's work per tick.
    max_pending_requests: int = 10_000
    # Twice the longest shipped class SLO (batch-2: first token within 3600 s), so no request the
    # planner may legitimately hold back is cut; only one nothing serves ends this way.
    request_timeout_s: float = 7200.0
    admin_key_env: str = "QLM_ADMIN_KEY"
    admin_header: str = "qlm-admin-key"
    engine_backend: str = "sim"
    instance_backends: Mapping[str, str] = field(default_factory=dict)
    manager: Mapping[str, Any] = field(default_factory=dict)

    def fleet_path(self) -> str:
        return os.environ.get(FLEET_ENV) or self.fleet

    def local_url(self) -> str:
        return self.engine_url or os.environ.get(GRPC_URL_ENV, "127.0.0.1:8001")

    def admin_key(self) -> str | None:
        return os.environ.get(self.admin_key_env) or None

    def admin_headers(self) -> dict[str, str] | None:
        key = self.admin_key()
        return {f"triton-grpc-protocol-{self.admin_header}": key} if key else None

    def backend_for(self, instance_id: str) -> str:
        return self.instance_backends.get(instance_id, self.engine_backend)

    def load_params(self, instance_id: str, warm: bool) -> dict[str, str] | None:
        """What a load of this instance's engine carries: simulated engines take the load mode in
        a config override; real engines (vllm, qlm-vllm) load as configured, with no override (it
        would replace their config; their warm start is the engine's own business)."""
        if self.backend_for(instance_id) != "sim":
            return None
        return {"load_mode": "warm" if warm else "cold"}

    def warm_mode(self, instance_id: str, warm_start: bool) -> WarmMode:
        """How this instance's engine starts warm: simulated engines by a load in warm mode, our
        vLLM engine by sleep and wake, Triton's stock vllm_backend not at all (docs/engines.md).
        An instance the fleet marks `warm_start: false` is always cold."""
        if not warm_start:
            return "none"
        modes: dict[str, WarmMode] = {"sim": "load", "qlm-vllm": "sleep"}
        return modes.get(self.backend_for(instance_id), "none")

    def queue_refusal(self, pending: int) -> str | None:
        """Why a request arriving while the router holds `pending` requests (accepted, not ended)
        is refused; None: it is not. Refused at the bound, so the router never holds more."""
        if pending < self.max_pending_requests:
            return None
        return (
            f"request refused: the router's queue is full ({pending} requests pending, queued "
            f"or in engines; max_pending_requests is {self.max_pending_requests})"
        )

    def check_timeout(self, slo_classes: Mapping[str, float]) -> None:
        """The wall deadline must leave every class its first-token SLO (simulated seconds, so
        x time_scale in wall seconds): a shorter one would cut requests the planner rightly holds
        back (batch classes wait by design) before their own deadline."""
        if not slo_classes:
            return
        name, slo_s = max(slo_classes.items(), key=lambda kv: kv[1])
        if self.request_timeout_s <= slo_s * self.time_scale:
            raise RouterConfigError(
                "request_timeout_s",
                f"{self.request_timeout_s:g} s must exceed the TTFT SLO of every class; class "
                f"{name!r} has {slo_s * self.time_scale:g} wall seconds",
            )

    def url_for(self, instance_id: str) -> str:
        url = self.instance_servers.get(instance_id)
        if not url:
            return self.local_url()
        return url.removeprefix("grpc://")

    def planning_fleet(self, fleet: FleetConfig) -> FleetConfig:
        """The fleet as the planner must see it: an instance whose engine cannot start a model warm
        (`warm_mode` "none": Triton's stock vllm_backend, or the fleet's `warm_start: false`) is
        planned with warm_start false, so no swap there is priced warm and nothing is kept warm
        for it; the others are as the fleet says."""
        specs = tuple(
            replace(i, warm_start=False)
            if i.warm_start and self.warm_mode(i.instance_id, i.warm_start) == "none"
            else i
            for i in fleet.instances
        )
        return replace(fleet, instances=specs)

    def manager_config(self, fleet: FleetConfig | None = None) -> ManagerConfig:
        """The core's settings: `manager` over the fleet's (its `warm_slots_per_host`)."""
        known = {f.name for f in fields(ManagerConfig)}
        bad = sorted(set(self.manager) - known)
        if bad:
            raise RouterConfigError(
                f"manager.{bad[0]}", f"unknown key; known: {', '.join(sorted(known))}"
            )
        # The router carries out every Evict as an engine abort and resumes with prompt + text
        # (a recompute): Triton's engines expose no KV swap-out, so the plan says so too.
        base: dict[str, Any] = {"kv_swap_resume": False}
        if fleet is not None:
            base["warm_slots_per_host"] = fleet.warm_slots_per_host
        overrides = {**base, **dict(self.manager)}
        try:
            return ManagerConfig(**overrides)
        except (TypeError, ValueError) as e:
            raise RouterConfigError("manager", str(e)) from None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RouterConfig:
        known = {f.name: f for f in fields(cls)}
        bad = sorted(set(raw) - set(known))
        if bad:
            raise RouterConfigError(bad[0], f"unknown key; known: {', '.join(sorted(known))}")
        vals: dict[str, Any] = {}
        for key, value in raw.items():
            default = getattr(cls(), key)
            vals[key] = coerce(key, value, default, RouterConfigError)
        cfg = cls(**vals)
        try:
            validate_policy_name(cfg.policy)
        except ValueError as e:
            raise RouterConfigError("policy", str(e)) from None
        for key in (
            "time_scale",
            "tick_s",
            "cancel_poll_s",
            "metrics_interval_s",
            "load_timeout_s",
        ):
            if not getattr(cfg, key) > 0:
                raise RouterConfigError(key, f"must be > 0, got {getattr(cfg, key)}")
        if not (0 < cfg.request_timeout_s < math.inf):
            raise RouterConfigError(
                "request_timeout_s",
                f"must be a finite number of seconds > 0, got {cfg.request_timeout_s}",
            )
        for key in ("max_prompt_bytes", "max_pending_requests"):
            if getattr(cfg, key) < 1:
                raise RouterConfigError(key, f"must be >= 1, got {getattr(cfg, key)}")
        for iid, url in cfg.instance_servers.items():
            if not isinstance(url, str) or not url.startswith("grpc://"):
                raise RouterConfigError(
                    f"instance_servers.{iid}", f"must be 'grpc://host:port', got {url!r}"
                )
        for where, backend in [("engine_backend", cfg.engine_backend)] + [
            (f"instance_backends.{i}", b) for i, b in cfg.instance_backends.items()
        ]:
            if backend not in ENGINE_BACKENDS:
                raise RouterConfigError(
                    where, f"must be one of {', '.join(ENGINE_BACKENDS)}, got {backend!r}"
                )
        cfg.manager_config()
        return cfg


def load_router_config(model_config: Mapping[str, Any], version_dir: Path) -> RouterConfig:
    """router.json next to model.py, overridden by config.pbtxt parameters."""
    return RouterConfig.from_mapping(
        read_settings(model_config, version_dir, CONFIG_FILE, RouterConfigError)
    )
