"""Request groups: queued requests of one model and SLO class whose deadlines fall in one window.

The planner decides per group, not per request, which keeps the LP small (docs/triton-vllm-facts.md section 11). A
group holds only QUEUED requests, kept in deadline order; it splits into a new part when it grows past
`max_size`, so one burst can be spread over several instances, or past `small_size` while fewer
than `small_below` requests are queued in all: finer parts where the planner can afford them (parts
of 16 at any length made the planner's LP path at 10k queued x 256 instances 20 ms at p99 instead
of 13, its fallback at 100k 180 ms instead of 33; docs/scheduling.md). A part opened small keeps
filling up to `max_size` once the queue is longer. Group ids are stable while the group
lives: `model/class/window/part`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from qlm_backend.core.request import Request


@dataclass
class RequestGroup:
    group_id: str
    model: str
    slo_class: str
    window: int  # floor(deadline_s / window_s)
    # Requests whose length the caller fixed (Request.output_fixed) group apart: the estimator
    # sums their known lengths instead of the class's distribution.
    output_fixed: bool = False
    # (deadline_s, arrival_s, request_id) sorted: EDF inside the group, FCFS on ties.
    _keys: list[tuple[float, float, str]] = field(default_factory=list)
    prompt_tokens_sum: int = 0
    _prompt: dict[str, int] = field(default_factory=dict)
    # The ids in _keys order, built on first use after a change: a plan reads every group's ids
    # (at 100k queued, rebuilding them per plan was a fifth of a fallback decision).
    _ids: tuple[str, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def ids(self) -> tuple[str, ...]:
        """request_ids as a tuple, shared between calls until the group changes."""
        ids = self._ids
        if ids is None:
            ids = self._ids = tuple([k[2] for k in self._keys])
        return ids

    @property
    def request_ids(self) -> list[str]:
        return list(self.ids)

    @property
    def deadline_s(self) -> float:
        """Earliest deadline in the group (what the planner must meet first)."""
        return self._keys[0][0] if self._keys else math.inf

    @property
    def last_deadline_s(self) -> float:
        return self._keys[-1][0] if self._keys else math.inf

    @property
    def first_arrival_s(self) -> float:
        return min((k[1] for k in self._keys), default=math.inf)

    @property
    def mean_prompt_tokens(self) -> float:
        return self.prompt_tokens_sum / len(self._keys) if self._keys else 0.0

    def add(self, req: Request) -> None:
        bisect.insort(self._keys, (req.deadline_s, req.arrival_s, req.request_id))
        self._ids = None
        self._prompt[req.request_id] = req.prompt_tokens
        self.prompt_tokens_sum += req.prompt_tokens

    def remove(self, req: Request) -> None:
        key = (req.deadline_s, req.arrival_s, req.request_id)
        i = bisect.bisect_left(self._keys, key)
        if i >= len(self._keys) or self._keys[i] != key:
            raise KeyError(req.request_id)
        del self._keys[i]
        self._ids = None
        self.prompt_tokens_sum -= self._prompt.pop(req.request_id)


class GroupIndex:
    """All live groups, keyed by id; finds or opens the group a request belongs to."""

    def __init__(
        self, window_s: float, max_size: int, *, small_size: int | None = None, small_below: int = 0
    ) -> None:
        if window_s <= 0:
            raise ValueError("group window must be > 0")
        if max_size < 1:
            raise ValueError("group max size must be >= 1")
        if small_size is not None and small_size < 1:
            raise ValueError("group small size must be >= 1")
        self.window_s = window_s
        self.max_size = max_size
        self.small_size = max_size if small_size is None else small_size
        self.small_below = small_below
        self.queued = 0  # requests in all groups
        self.groups: dict[str, RequestGroup] = {}
        # (model, class, window) -> ids of its parts, oldest first; the last part takes new requests.
        self._parts: dict[tuple[str, str, int, bool], list[str]] = {}
        self._next_part: dict[tuple[str, str, int, bool], int] = {}

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[RequestGroup]:
        return iter(self.groups.values())

    def add(self, req: Request) -> RequestGroup:
        window = math.floor(req.deadline_s / self.window_s)
        key = (req.model, req.slo_class, window, req.output_fixed)
        parts = self._parts.setdefault(key, [])
        limit = self.small_size if self.queued < self.small_below else self.max_size
        if parts and len(self.groups[parts[-1]]) < limit:
            g = self.groups[parts[-1]]
        else:
            n = self._next_part.get(key, 0)
            self._next_part[key] = n + 1
            fixed = "f" if req.output_fixed else ""
            gid = f"{req.model}/{req.slo_class}/{window}{fixed}/{n}"
            g = RequestGroup(gid, req.model, req.slo_class, window, req.output_fixed)
            self.groups[gid] = g
            parts.append(gid)
        g.add(req)
        self.queued += 1
        return g

    def remove(self, group_id: str, req: Request) -> None:
        g = self.groups[group_id]
        g.remove(req)
        self.queued -= 1
        if not len(g):
            del self.groups[group_id]
            key = (g.model, g.slo_class, g.window, g.output_fixed)
            parts = self._parts[key]
            parts.remove(group_id)
            if not parts:
                del self._parts[key]
                # Keep _next_part so a reopened window never reuses an id seen by a caller.


__all__ = ["GroupIndex", "RequestGroup"]
