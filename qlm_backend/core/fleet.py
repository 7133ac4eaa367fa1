"""Fleet configuration: the serving instances (an engine on one GPU or a tensor-parallel GPU set),
the models each may run, hosts with their warm-start slots, and the SLO classes.

The only module of the core that does I/O (`load_fleet` reads one JSON file). Every error names the
offending key; an unknown GPU or model names the value and lists the known ones.

JSON shape::

    {
      "slo_classes": [{"name": "interactive", "ttft_slo_s": 20, "weight": 10,
                       "sheddable": false, "priority": 0}, ...],          # optional
      "warm_slots_per_host": 2,                                           # optional
      "instances": [
        {"instance_id": "a10", "count": 4, "gpu": "A10", "tp": 1,
         "models_allowed": ["mistral-7b", "llama-3-8b"], "initial_model": "mistral-7b",
         "max_in_flight": 32, "host": "node-0", "warm_start": true}
      ]
    }

`count` > 1 expands to instance ids `a10-0` ... `a10-3`; `tp` defaults to the smallest degree the
model set fits on; `host` defaults to the instance id (one host per instance). `warm_start` (default
true) says whether the instance's engine can start a model from host memory: false for engines
whose swap is always an unload and a cold load (Triton's stock vllm_backend: no sleep and wake),
so the plan never counts on a warm start there (no KeepWarm, every swap cold).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlm_backend.core.slo import DEFAULT_SLO_CLASSES, SloClass, index_classes, slo_class_from_dict
from qlm_backend.engine import hardware as hw
from qlm_backend.engine.perf import required_tp


@dataclass(frozen=True)
class InstanceSpec:
    """One serving instance. `max_in_flight` bounds how many requests the router keeps in its engine
    at once (late binding: the rest wait in the router's virtual queue)."""

    instance_id: str
    gpu: str
    tp: int
    models_allowed: tuple[str, ...]
    initial_model: str | None = None
    max_in_flight: int = 32
    host: str = ""
    warm_start: bool = True  # whether a swap may start the model from host memory (see above)

    def __post_init__(self) -> None:
        if not self.models_allowed:
            raise ValueError(f"instance {self.instance_id}: models_allowed must not be empty")
        if self.initial_model is not None and self.initial_model not in self.models_allowed:
            raise ValueError(
                f"instance {self.instance_id}: initial_model {self.initial_model!r} "
                f"not in models_allowed {list(self.models_allowed)}"
            )
        if self.max_in_flight < 1:
            raise ValueError(f"instance {self.instance_id}: max_in_flight must be >= 1")
        if self.tp < 1:
            raise ValueError(f"instance {self.instance_id}: tp must be >= 1")
        if not self.host:
            object.__setattr__(self, "host", self.instance_id)


@dataclass(frozen=True)
class FleetConfig:
    instances: tuple[InstanceSpec, ...]
    slo_classes: tuple[SloClass, ...] = DEFAULT_SLO_CLASSES
    warm_slots_per_host: int = 2
    extra: Mapping[str, Any] = field(
        default_factory=dict
    )  # unknown-to-core sections kept for others

    def __post_init__(self) -> None:
        if not self.instances:
            raise ValueError("fleet: at least one instance is required")
        ids = [i.instance_id for i in self.instances]
        dup = sorted({x for x in ids if ids.count(x) > 1})
        if dup:
            raise ValueError(f"fleet: duplicate instance_id(s) {dup}")
        index_classes(self.slo_classes)
        if self.warm_slots_per_host < 0:
            raise ValueError("fleet: warm_slots_per_host must be >= 0")

    @property
    def models(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for inst in self.instances:
            for m in inst.models_allowed:
                seen.setdefault(m, None)
        return tuple(seen)


_INSTANCE_KEYS = {
    "instance_id",
    "count",
    "gpu",
    "tp",
    "models_allowed",
    "initial_model",
    "max_in_flight",
    "host",
    "warm_start",
}
_TOP_KEYS = {"instances", "slo_classes", "warm_slots_per_host", "default_model"}


def _check_gpu(name: Any, where: str) -> str:
    if name not in hw.GPUS:
        raise ValueError(f"{where}.gpu: unknown gpu {name!r}; known: {', '.join(sorted(hw.GPUS))}")
    return str(name)


def _check_model(name: Any, where: str) -> str:
    if name not in hw.MODELS:
        raise ValueError(f"{where}: unknown model {name!r}; known: {', '.join(sorted(hw.MODELS))}")
    return str(name)


def _instances_from(d: Mapping[str, Any], where: str) -> list[InstanceSpec]:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    unknown = set(d) - _INSTANCE_KEYS
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_INSTANCE_KEYS)}"
        )
    for key in ("instance_id", "gpu", "models_allowed"):
        if key not in d:
            raise ValueError(f"{where}: missing key {key!r}")
    gpu = _check_gpu(d["gpu"], where)
    models = d["models_allowed"]
    if isinstance(models, str) or not isinstance(models, Sequence) or not models:
        raise ValueError(f"{where}.models_allowed: expected a non-empty list of model names")
    models_t = tuple(_check_model(m, f"{where}.models_allowed") for m in models)
    initial = d.get("initial_model")
    if initial is not None:
        _check_model(initial, f"{where}.initial_model")
    tp_raw = d.get("tp")
    if tp_raw is None:
        # The instance must hold the largest model it may run.
        tp = max(required_tp(hw.MODELS[m], hw.GPUS[gpu]) for m in models_t)
    else:
        if not isinstance(tp_raw, int) or isinstance(tp_raw, bool) or tp_raw < 1:
            raise ValueError(f"{where}.tp: expected an integer >= 1, got {tp_raw!r}")
        tp = tp_raw
    count = d.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{where}.count: expected an integer >= 1, got {count!r}")
    mif = d.get("max_in_flight", 32)
    if not isinstance(mif, int) or isinstance(mif, bool) or mif < 1:
        raise ValueError(f"{where}.max_in_flight: expected an integer >= 1, got {mif!r}")
    base = str(d["instance_id"])
    host = d.get("host")
    warm_start = d.get("warm_start", True)
    if not isinstance(warm_start, bool):
        raise ValueError(f"{where}.warm_start: expected true or false, got {warm_start!r}")
    out = []
    for k in range(count):
        iid = base if count == 1 else f"{base}-{k}"
        out.append(
            InstanceSpec(
                instance_id=iid,
                gpu=gpu,
                tp=tp,
                models_allowed=models_t,
                initial_model=initial,
                max_in_flight=mif,
                host=str(host) if host is not None else iid,
                warm_start=warm_start,
            )
        )
    return out


def parse_fleet(data: Mapping[str, Any], *, strict: bool = True) -> FleetConfig:
    """Validate a fleet dict (parsed JSON). With strict=False unknown top-level keys are kept in
    `extra` (other layers put their own sections in the same file)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"fleet: expected a JSON object, got {type(data).__name__}")
    unknown = set(data) - _TOP_KEYS
    if unknown and strict:
        raise ValueError(f"fleet: unknown key(s) {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    if "instances" not in data:
        raise ValueError("fleet: missing key 'instances'")
    raw = data["instances"]
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise ValueError("fleet.instances: expected a list")
    instances: list[InstanceSpec] = []
    for k, d in enumerate(raw):
        instances.extend(_instances_from(d, f"fleet.instances[{k}]"))
    classes = DEFAULT_SLO_CLASSES
    if "slo_classes" in data:
        rc = data["slo_classes"]
        if not isinstance(rc, Sequence) or isinstance(rc, str):
            raise ValueError("fleet.slo_classes: expected a list")
        classes = tuple(slo_class_from_dict(c, f"fleet.slo_classes[{k}]") for k, c in enumerate(rc))
    warm = data.get("warm_slots_per_host", 2)
    if not isinstance(warm, int) or isinstance(warm, bool) or warm < 0:
        raise ValueError(f"fleet.warm_slots_per_host: expected an integer >= 0, got {warm!r}")
    extra = {k: data[k] for k in unknown}
    if "default_model" in data:
        # The model a router serves a request that names none with (kept beside other sections).
        dm = data["default_model"]
        served = sorted({m for i in instances for m in i.models_allowed})
        if dm not in served:
            raise ValueError(f"fleet.default_model: {dm!r} is not served; served: {served}")
        extra["default_model"] = dm
    return FleetConfig(tuple(instances), classes, warm, extra)


def load_fleet(path: str | Path, *, strict: bool = True) -> FleetConfig:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON: {e}") from None
    try:
        return parse_fleet(data, strict=strict)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


__all__ = ["FleetConfig", "InstanceSpec", "load_fleet", "parse_fleet"]
