"""Which SLO class an OpenAI request gets, and its deadline.

In order, the first that is present decides:
1. the header `x-slo-class`: a class of the fleet, by name;
2. OpenAI's `service_tier` field, through the `service_tier` table (tier -> class);
3. vLLM's `priority` field (an integer, lower is more urgent), through the `priority` table
   (threshold -> class: the class of the largest threshold <= the priority; a priority below every
   threshold gets the smallest threshold's class);
4. none of them: no class is sent, and the router applies its `default_slo_class`.
The header `x-ttft-slo-s` (seconds > 0) replaces the class's time-to-first-token deadline.

Defaults (the paper's classes):  service_tier auto, default, priority -> interactive; flex ->
batch-1.  priority <= 0 -> interactive, 1 -> batch-1, >= 2 -> batch-2. A JSON file with the same
two tables (`{"service_tier": {...}, "priority": {"0": ..., "1": ...}}`) replaces a table as a
whole; `--service-tier TIER=CLASS` and `--priority-class N=CLASS` flags then add or change entries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlm_backend.openai_front.errors import bad_request

CLASS_HEADER = "x-slo-class"
TTFT_HEADER = "x-ttft-slo-s"
DEFAULT_SERVICE_TIERS: Mapping[str, str] = {
    "auto": "interactive",
    "default": "interactive",
    "priority": "interactive",
    "flex": "batch-1",
}
DEFAULT_PRIORITIES: tuple[tuple[int, str], ...] = (
    (0, "interactive"),
    (1, "batch-1"),
    (2, "batch-2"),
)


class SloConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SloMapping:
    service_tier: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SERVICE_TIERS))
    priority: tuple[tuple[int, str], ...] = DEFAULT_PRIORITIES  # ascending thresholds

    def class_for_priority(self, p: int) -> str:
        chosen = self.priority[0][1]
        for threshold, cls in self.priority:
            if p >= threshold:
                chosen = cls
        return chosen

    def check(self, known: Iterable[str]) -> None:
        """Every class the tables name must be a class of the fleet (checked at start)."""
        known = set(known)
        targets = [(f"service_tier.{t}", c) for t, c in self.service_tier.items()]
        targets += [(f"priority.{p}", c) for p, c in self.priority]
        for where, cls in targets:
            if cls not in known:
                raise SloConfigError(
                    f"SLO mapping {where}: unknown class {cls!r}; classes: {', '.join(sorted(known))}"
                )

    def as_json(self) -> dict[str, Any]:
        return {
            "service_tier": dict(self.service_tier),
            "priority": {str(p): c for p, c in self.priority},
        }


def _priority_table(raw: Mapping[Any, Any], where: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            raise SloConfigError(f"{where}: priority threshold {k!r} is not an integer") from None
    return out


def _pairs(flags: Sequence[str], where: str) -> list[tuple[str, str]]:
    out = []
    for f in flags:
        key, sep, cls = f.partition("=")
        if not sep or not key or not cls:
            raise SloConfigError(f"{where}: expected KEY=CLASS, got {f!r}")
        out.append((key.strip(), cls.strip()))
    return out


def load_slo_mapping(
    path: Path | None = None,
    tier_flags: Sequence[str] = (),
    priority_flags: Sequence[str] = (),
) -> SloMapping:
    tiers = dict(DEFAULT_SERVICE_TIERS)
    prios = dict(DEFAULT_PRIORITIES)
    if path is not None:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SloConfigError(f"SLO mapping file {path}: {e}") from None
        if not isinstance(raw, dict) or set(raw) - {"service_tier", "priority"}:
            raise SloConfigError(
                f"SLO mapping file {path}: expected an object with 'service_tier' and/or 'priority'"
            )
        for key in ("service_tier", "priority"):
            if key in raw and not isinstance(raw[key], dict):
                raise SloConfigError(f"SLO mapping file {path}: {key!r} must be an object")
        if "service_tier" in raw:
            tiers = {str(k): str(v) for k, v in raw["service_tier"].items()}
        if "priority" in raw:
            prios = _priority_table(raw["priority"], str(path))
    tiers.update(_pairs(tier_flags, "--service-tier"))
    prios.update(
        _priority_table(dict(_pairs(priority_flags, "--priority-class")), "--priority-class")
    )
    if not prios:
        raise SloConfigError("SLO mapping: the priority table must not be empty")
    return SloMapping(tiers, tuple(sorted(prios.items())))


@dataclass(frozen=True)
class SloChoice:
    slo_class: str | None  # None: the router's default class
    ttft_slo_s: float | None
    source: str  # x-slo-class, service_tier, priority or default


def _ttft(headers: Mapping[str, str]) -> float | None:
    raw = headers.get(TTFT_HEADER)
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v <= 0:
        raise bad_request(TTFT_HEADER, f"header {TTFT_HEADER} must be seconds > 0, got {raw!r}")
    return v


def resolve_slo(
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    mapping: SloMapping,
    classes: Iterable[str],
) -> SloChoice:
    """`headers` with lower-case names; `classes`: the fleet's class names."""
    ttft = _ttft(headers)
    named = headers.get(CLASS_HEADER)
    if named is not None:
        known = sorted(classes)
        if named not in known:
            raise bad_request(
                CLASS_HEADER,
                f"header {CLASS_HEADER}: unknown SLO class {named!r}; classes: {', '.join(known)}",
            )
        return SloChoice(named, ttft, CLASS_HEADER)
    tier = body.get("service_tier")
    if tier is not None:
        if not isinstance(tier, str) or tier not in mapping.service_tier:
            tiers = ", ".join(sorted(mapping.service_tier))
            raise bad_request("service_tier", f"unknown service_tier {tier!r}; accepted: {tiers}")
        return SloChoice(mapping.service_tier[tier], ttft, "service_tier")
    prio = body.get("priority")
    if prio is not None:
        if isinstance(prio, bool) or not isinstance(prio, int):
            raise bad_request("priority", f"priority must be an integer, got {prio!r}")
        return SloChoice(mapping.class_for_priority(prio), ttft, "priority")
    return SloChoice(None, ttft, "default")
