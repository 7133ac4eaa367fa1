"""Engines that differ from what the core believes: a world the estimator was not calibrated for.

The estimator takes its service times from PerfModel.from_names, like the simulated engines; to
measure how it copes when the real engine is slower or faster than its profile (a driver, a kernel,
a noisy neighbour), the simulator can give its engines a `StepScaledPerf` instead, which the core
never sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qlm_backend.engine.perf import PerfModel


@dataclass(frozen=True)
class StepScaledPerf(PerfModel):
    """A PerfModel whose every engine iteration (decode, prefill, mixed) takes `step_time_scale`
    times as long. Data movement (KV swap over PCIe) and model loads are left as they are: the
    knob is about compute, not about the bus or the disk."""

    step_time_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.step_time_scale > 0:
            raise ValueError(f"step_time_scale must be > 0, got {self.step_time_scale}")

    @classmethod
    def of(cls, perf: PerfModel, step_time_scale: float) -> StepScaledPerf:
        return cls(
            perf.model,
            perf.gpu,
            perf.tp,
            perf.eff,
            perf.gpu_memory_utilization,
            step_time_scale=step_time_scale,
        )

    def step_s(
        self,
        decode_seqs: int,
        decode_context_tokens: int,
        chunks: Sequence[tuple[int, int]] = (),
    ) -> float:
        return super().step_s(decode_seqs, decode_context_tokens, chunks) * self.step_time_scale


def engine_perf(perf: PerfModel, step_time_scale: float) -> PerfModel:
    """The engine's PerfModel: `perf` itself at scale 1 (bit-identical runs), scaled otherwise."""
    return perf if step_time_scale == 1.0 else StepScaledPerf.of(perf, step_time_scale)


__all__ = ["StepScaledPerf", "engine_perf"]
