"""The simulated engine plus the two things an evicted request needs that SimEngine has no API for.

QLM's eviction takes a request out of the engine and queues it again in the router; with KV swap
(GPU-CPU state swapping, docs/triton-vllm-facts.md section 13) its KV cache waits in host memory and comes back over
PCIe when the request is pulled again on the same instance, instead of re-running the prefill of
prompt + tokens already produced. SimEngine models that path only for its own preemptions, so this
subclass adds, with the same costs SimEngine charges there (PerfModel.kv_swap_s):

- `charge_s(seconds)`: a KV swap-out copy (eviction with resume="swap") stalls the next iteration;
- `add_swapped(req, generated, now)`: admit a request whose KV is in host memory; admission copies
  it back (kv_swap_s of its context) and decoding continues at token `generated`, no prefill.

Everything else (batching, KV blocks, preemption, timing) is SimEngine's, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlm_backend.engine.sim import EngineRequest, SimEngine


@dataclass
class ResumableEngine(SimEngine):
    def __post_init__(self) -> None:
        super().__post_init__()
        self._pending_stall_s = 0.0

    def charge_s(self, seconds: float, now: float) -> None:
        """Add `seconds` to the iteration in progress (the copy contends with it) or the next."""
        if seconds <= 0:
            return
        cur = self._current
        if cur is not None:
            cur.end_s += seconds
            self.stats.busy_s += seconds
        elif self._waiting or self._running:
            self._pending_stall_s += seconds
        # An idle engine with nothing to run: the copy overlaps idle time and delays nothing.

    def add_swapped(self, req: EngineRequest, generated: int, now: float) -> None:
        """Admit a request whose first `generated` output tokens' KV is in host memory."""
        self.add(req, now)
        seq = self._waiting[-1]  # add() appends the new sequence
        assert seq.req is req
        seq.generated = generated
        seq.swapped = True  # SimEngine charges kv_swap_s(computed) when it is admitted
        # The host copy holds every token's KV but the last one sampled (its decode comes next).
        seq.computed = max(0, req.prompt_tokens + generated - 1)

    def _start_iteration(self, now: float) -> None:
        super()._start_iteration(now)
        if self._pending_stall_s and self._current is not None:
            self._current.end_s += self._pending_stall_s
            self.stats.busy_s += self._pending_stall_s
            self._pending_stall_s = 0.0


__all__ = ["ResumableEngine"]
