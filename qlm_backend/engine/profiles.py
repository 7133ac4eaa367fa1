"""Measured efficiency profiles: the roofline's Efficiency factors fitted on a real engine.

One JSON file per device under engine/profiles/ (`<gpu>.json`), written by `qlm-bench calibrate`
with the date, the machine and the replays it was fitted on. PerfModel.from_names uses a device's
profile where one exists; the GPU types have none and run on hardware.py's sourced defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from functools import cache
from pathlib import Path
from typing import Any

from qlm_backend.engine.perf import Efficiency

PROFILE_DIR = Path(__file__).with_name("profiles")


def profile_path(gpu: str) -> Path:
    return PROFILE_DIR / f"{gpu}.json"


def parse_efficiency(raw: dict[str, Any], where: str = "profile") -> Efficiency:
    known = {f.name for f in fields(Efficiency)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown efficiency key {unknown[0]!r}; known: {sorted(known)}")
    for k, v in raw.items():
        if v is not None and not (isinstance(v, int | float) and v >= 0):
            raise ValueError(f"{where}: efficiency key {k!r} must be a number >= 0, got {v!r}")
    return Efficiency(**raw)


@cache
def efficiency_for(gpu: str) -> Efficiency:
    """The device's measured profile, or the sourced GPU defaults."""
    path = profile_path(gpu)
    if not path.is_file():
        return Efficiency()
    doc = json.loads(path.read_text())
    return parse_efficiency(doc["efficiency"], str(path))


def write_profile(
    gpu: str, eff: Efficiency, meta: dict[str, Any], path: Path | None = None
) -> Path:
    path = path or profile_path(gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"gpu": gpu, **meta, "efficiency": asdict(eff)}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    efficiency_for.cache_clear()
    return path
