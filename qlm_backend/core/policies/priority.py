"""priority: vLLM's priority scheduling behind a load balancer. Requests go to engines at once
with their class priority (lower first); the engine (scheduling_policy="priority") orders and
preempts by it, FCFS within a priority. Model swaps as in fcfs, head chosen by priority."""

from __future__ import annotations

from typing import Literal

from qlm_backend.core.policies.fcfs import PushPolicy
from qlm_backend.core.request import RequestState


class PriorityPolicy(PushPolicy):
    name = "priority"

    def engine_scheduling(self) -> Literal["fcfs", "priority"]:
        return "priority"

    def order_key(self, st: RequestState) -> tuple[float, ...]:
        return (float(st.priority), st.req.arrival_s)


__all__ = ["PriorityPolicy"]
