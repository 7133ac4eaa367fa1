"""The request as the queue manager sees it, and its lifecycle state inside the manager."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """One generation request.

    `deadline_s` is the absolute time by which the first token must arrive (arrival + the class's
    TTFT SLO, or a per-request override). `true_output_tokens` is the real output length where the
    caller knows it (trace replay); only the oracle policy reads it, every other policy plans with the
    estimator's learnt distribution. `output_fixed` says the output is exactly `max_tokens` long
    because the caller told the engine so (vLLM's ignore_eos, or min_tokens = max_tokens, without
    stop strings): that is not a forecast but the request itself, so every policy plans with it.
    """

    request_id: str
    model: str
    slo_class: str
    arrival_s: float
    deadline_s: float
    prompt_tokens: int
    max_tokens: int
    true_output_tokens: int | None = None
    output_fixed: bool = False

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0:
            raise ValueError(f"request {self.request_id}: prompt_tokens must be >= 0")
        if self.max_tokens <= 0:
            raise ValueError(f"request {self.request_id}: max_tokens must be > 0")
        if self.deadline_s < self.arrival_s:
            raise ValueError(f"request {self.request_id}: deadline_s before arrival_s")

    @property
    def ttft_slo_s(self) -> float:
        return self.deadline_s - self.arrival_s


class Status(enum.Enum):
    """Where a request is. Exactly one at any time; a plan moves QUEUED -> IN_FLIGHT (Pull) or
    IN_FLIGHT -> EVICTING (Evict); events move it on."""

    QUEUED = "queued"  # in a request group, waiting in the router
    IN_FLIGHT = "in_flight"  # dispatched to an instance's engine by a Pull
    EVICTING = "evicting"  # an Evict was emitted; re-queued by on_evicted
    DONE = "done"  # finished, cancelled or rejected: forgotten after the event


@dataclass
class RequestState:
    """Mutable bookkeeping for one admitted request (manager-internal; exposed read-only)."""

    req: Request
    status: Status = Status.QUEUED
    instance_id: str | None = None  # where it is in flight (or was evicted from)
    group_id: str | None = None  # its group while QUEUED
    tokens_done: int = 0  # output tokens produced before the last eviction
    kv_instance: str | None = None  # instance holding its swapped-out KV cache, if any
    dispatched_s: float | None = None
    first_token_s: float | None = None
    evictions: int = 0
    last_evicted_s: float = float("-inf")
    priority: int = 0


__all__ = ["Request", "RequestState", "Status"]
