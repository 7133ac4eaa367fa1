"""Per-instance serving state: which model runs (or is loading), what is in flight, and the
warm (host-memory) set of its host. A virtual queue is the planned order of groups for an instance;
the manager stores it next to this state."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from qlm_backend.core.fleet import InstanceSpec


@dataclass
class InstanceState:
    spec: InstanceSpec
    model: str | None = None  # model running (ready to take work); None while loading or empty
    loading: str | None = None  # model being loaded by an emitted SwapModel
    loaded_s: float = float("-inf")  # when `model` became ready (or the load started)
    ready_s: float = float("-inf")  # expected end of a load in progress
    loading_warm: bool = False  # whether the SwapModel of the load in progress said warm
    healthy: bool = True
    in_flight: set[str] = field(default_factory=set)
    last_evict_s: float = float("-inf")

    @property
    def instance_id(self) -> str:
        return self.spec.instance_id

    @property
    def usable(self) -> bool:
        """Can take new work now (has a ready model, is not loading, is healthy)."""
        return self.healthy and self.loading is None and self.model is not None

    @property
    def room(self) -> int:
        return max(0, self.spec.max_in_flight - len(self.in_flight))


class WarmSet:
    """Models kept in host memory per host, least recently used first, bounded by `slots`.

    The model running on an instance is not counted (it lives in GPU memory); a model swapped out
    stays warm if a slot is free or an older warm model is released for it.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._hosts: dict[
            str, OrderedDict[str, str]
        ] = {}  # host -> model -> instance that warmed it

    def models(self, host: str) -> list[str]:
        return list(self._hosts.get(host, {}))

    def is_warm(self, host: str, model: str) -> bool:
        return model in self._hosts.get(host, {})

    def touch(self, host: str, model: str, instance_id: str) -> list[tuple[str, str]]:
        """Mark `model` warm on `host`; returns (model, instance_id) pairs evicted to make room."""
        if self.slots <= 0:
            return []
        h = self._hosts.setdefault(host, OrderedDict())
        h[model] = instance_id
        h.move_to_end(model)
        out = []
        while len(h) > self.slots:
            m, iid = h.popitem(last=False)
            out.append((m, iid))
        return out

    def discard(self, host: str, model: str) -> None:
        self._hosts.get(host, OrderedDict()).pop(model, None)


__all__ = ["InstanceState", "WarmSet"]
