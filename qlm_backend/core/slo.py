"""SLO classes: a time-to-first-token target, a weight in the planner's objective, and whether the
class may be shed at admission.

Defaults follow the QLM paper (interactive 20 s, batch-1 60 s, batch-2 3600 s TTFT). Weights make an
interactive violation cost more than a batch one; priority is the number a priority-scheduling engine
(vLLM `priority`) receives, lower runs first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SloClass:
    name: str
    ttft_slo_s: float
    weight: float = 1.0
    sheddable: bool = False
    priority: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("slo class name must be non-empty")
        if not self.ttft_slo_s > 0:
            raise ValueError(
                f"slo class {self.name!r}: ttft_slo_s must be > 0, got {self.ttft_slo_s}"
            )
        if not self.weight > 0:
            raise ValueError(f"slo class {self.name!r}: weight must be > 0, got {self.weight}")


DEFAULT_SLO_CLASSES: tuple[SloClass, ...] = (
    SloClass("interactive", ttft_slo_s=20.0, weight=10.0, sheddable=False, priority=0),
    SloClass("batch-1", ttft_slo_s=60.0, weight=2.0, sheddable=False, priority=1),
    SloClass("batch-2", ttft_slo_s=3600.0, weight=1.0, sheddable=True, priority=2),
)

_SLO_KEYS = {"name", "ttft_slo_s", "weight", "sheddable", "priority"}


def slo_class_from_dict(d: Mapping[str, Any], where: str = "slo_classes") -> SloClass:
    """Build one class from JSON; an unknown or missing key is named in the error."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    unknown = set(d) - _SLO_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_SLO_KEYS)}")
    for key in ("name", "ttft_slo_s"):
        if key not in d:
            raise ValueError(f"{where}: missing key {key!r}")
    try:
        return SloClass(
            name=str(d["name"]),
            ttft_slo_s=float(d["ttft_slo_s"]),
            weight=float(d.get("weight", 1.0)),
            sheddable=bool(d.get("sheddable", False)),
            priority=int(d.get("priority", 0)),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def index_classes(classes: Iterable[SloClass]) -> dict[str, SloClass]:
    out: dict[str, SloClass] = {}
    for c in classes:
        if c.name in out:
            raise ValueError(f"duplicate slo class {c.name!r}")
        out[c.name] = c
    if not out:
        raise ValueError("at least one slo class is required")
    return out


__all__ = ["DEFAULT_SLO_CLASSES", "SloClass", "index_classes", "slo_class_from_dict"]
