"""Configuration of one simulated engine, from config.pbtxt parameters and/or an engine.json file.

Every key is validated at load; an unknown key or a bad value fails the model load with a message
that names the key, so a typo in a fleet never silently runs with a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from qlm_backend.engine import hardware as hw
from qlm_backend.engine.perf import PerfModel
from qlm_backend.engine.sim import PREEMPTION_MODES, SCHEDULING_POLICIES, Preemption, Scheduling
from qlm_backend.settings import coerce, read_settings

LoadMode = Literal["none", "warm", "cold"]
LOAD_MODES: tuple[LoadMode, ...] = ("none", "warm", "cold")
CONFIG_FILE = "engine.json"


class EngineConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"engine config key {key!r}: {message}")
        self.key = key


@dataclass(frozen=True)
class EngineConfig:
    model: str
    gpu: str
    tp: int = 0  # 0: the smallest degree that fits (perf.required_tp)
    # Wall seconds per simulated second: 1.0 runs at GPU speed, 0.1 ten times faster (tests).
    time_scale: float = 1.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # vLLM's scheduling_policy. "priority" (vLLM's default is fcfs) because the router forwards the
    # priority its policy wants the engine to use: the class priority for qlm / priority /
    # flow-control, 0 for the others, which under priority scheduling is plain FCFS. So every
    # router policy runs its engines as qlm-eval does.
    scheduling: Scheduling = "priority"
    preemption: Preemption = "recompute"
    # How initialize() spends the model load: none (already up), warm (host memory), cold (disk).
    load_mode: LoadMode = "none"
    # Mean output length when a request does not set ignore_eos (geometric draw, seeded per request).
    mean_output_tokens: int = 128
    instance: str = ""  # the fleet instance (GPU or GPU set) this engine runs on
    # `stream` of a request that sends none: false, as Triton's vllm_backend (one response with the
    # whole text); true only for clients written against older QLM engines.
    default_stream: bool = False

    def perf(self) -> PerfModel:
        return PerfModel.from_names(self.model, self.gpu, self.tp or None)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> EngineConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise EngineConfigError(unknown[0], f"unknown key; known: {', '.join(sorted(known))}")
        for req in ("model", "gpu"):
            if req not in raw or raw[req] in (None, ""):
                raise EngineConfigError(req, "is required")
        vals = {
            name: coerce(name, value, known[name].default, EngineConfigError)
            for name, value in raw.items()
        }
        cfg = cls(**vals)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.model not in hw.MODELS:
            raise EngineConfigError(
                "model", f"unknown model {self.model!r}; known: {', '.join(sorted(hw.MODELS))}"
            )
        if self.gpu not in hw.GPUS:
            raise EngineConfigError(
                "gpu", f"unknown gpu {self.gpu!r}; known: {', '.join(sorted(hw.GPUS))}"
            )
        if self.tp < 0:
            raise EngineConfigError("tp", f"must be >= 0, got {self.tp}")
        if not self.time_scale > 0:
            raise EngineConfigError("time_scale", f"must be > 0, got {self.time_scale}")
        for key in ("max_num_seqs", "max_num_batched_tokens", "mean_output_tokens"):
            if getattr(self, key) < 1:
                raise EngineConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.scheduling not in SCHEDULING_POLICIES:
            raise EngineConfigError(
                "scheduling", f"must be one of {SCHEDULING_POLICIES}, got {self.scheduling!r}"
            )
        if self.preemption not in PREEMPTION_MODES:
            raise EngineConfigError(
                "preemption", f"must be one of {PREEMPTION_MODES}, got {self.preemption!r}"
            )
        if self.load_mode not in LOAD_MODES:
            raise EngineConfigError(
                "load_mode", f"must be one of {LOAD_MODES}, got {self.load_mode!r}"
            )
        try:
            self.perf()
        except ValueError as e:
            raise EngineConfigError("tp" if self.tp else "gpu", str(e)) from None


def load_engine_config(model_config: Mapping[str, Any], model_dir: Path | None) -> EngineConfig:
    """Merge engine.json (next to model.py) with config.pbtxt parameters; parameters win."""
    return EngineConfig.from_mapping(
        read_settings(model_config, model_dir, CONFIG_FILE, EngineConfigError)
    )
