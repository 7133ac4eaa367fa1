"""LSO actions: what a plan asks the caller (router or simulator) to do, as plain frozen data.

Execute them in list order (evictions come before the pulls that reuse their slots). Contract:

- Pull: dispatch these queued requests to that instance's engine now (with `priority` where the
  engine schedules by priority). They are IN_FLIGHT on that instance from the moment the action is
  returned; the caller reports `on_first_token` / `on_finished` / `on_dispatch_failed`.
- Evict: stop this in-flight request on that instance (abort, or a priority/swap preemption where
  `resume == "swap"` and the engine keeps its KV cache in host memory). It leaves the in-flight set
  at once; the caller then reports `on_evicted(request_id, tokens_done, now)` and it is queued again.
- SwapModel: unload `from_model` (if any) and load `to_model` on that instance, from host memory when
  `warm`, from disk otherwise. Only emitted for an instance with nothing in flight; it takes no work
  until the caller reports `on_model_loaded`.
- KeepWarm / Release: keep the weights of `model` in host memory of that instance's host (vLLM sleep
  mode level 1), or free them. The warm set per host is bounded.
- Rebalance: a notice that the planner moved a queued group between virtual queues (load balancing);
  the requests are still in the router, the caller need not act (count it).
- Reject: admission refused the request (shedding); it never entered a queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ResumeMode = Literal["recompute", "swap"]


@dataclass(frozen=True)
class Pull:
    instance_id: str
    group_id: str
    request_ids: tuple[str, ...]
    priority: int = 0


@dataclass(frozen=True)
class Evict:
    request_id: str
    instance_id: str
    resume: ResumeMode = "recompute"
    reason: str = ""


@dataclass(frozen=True)
class SwapModel:
    instance_id: str
    from_model: str | None
    to_model: str
    warm: bool


@dataclass(frozen=True)
class KeepWarm:
    model: str
    instance_id: str


@dataclass(frozen=True)
class Release:
    model: str
    instance_id: str


@dataclass(frozen=True)
class Rebalance:
    group_id: str
    from_instance: str
    to_instance: str


@dataclass(frozen=True)
class Reject:
    request_id: str
    reason: str


Action = Pull | Evict | SwapModel | KeepWarm | Release | Rebalance | Reject

__all__ = [
    "Action",
    "Evict",
    "KeepWarm",
    "Pull",
    "Rebalance",
    "Reject",
    "Release",
    "ResumeMode",
    "SwapModel",
]
