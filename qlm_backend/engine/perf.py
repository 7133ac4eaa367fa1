"""Roofline performance model of one vLLM engine: a model on a GPU (or a tensor-parallel GPU set).

Pure arithmetic over hardware.py's constants. The simulated engine (sim.py), the RWT estimator and
the evaluation simulator all take their timings from here, so the router's predictions and the
engine's behaviour come from one model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlm_backend.engine import hardware as hw


@dataclass(frozen=True)
class Efficiency:
    """Efficiency factors; defaults are hardware.py's sourced values, a measured profile overrides."""

    decode_bandwidth: float = hw.DECODE_BANDWIDTH_EFFICIENCY
    prefill_mfu: float = hw.PREFILL_MFU
    decode_mfu: float = hw.DECODE_MFU
    step_overhead_s: float = hw.STEP_OVERHEAD_S
    # Per-request latency outside the engine (server frontend, gRPC, the model's stub): added to
    # when each token is delivered, so it shifts a request's stream without changing the engine's
    # schedule. 0 for the GPU profiles (their sourced figures are engine-side); a measured profile
    # that is compared end to end through a server sets it.
    request_overhead_s: float = 0.0


@dataclass(frozen=True)
class PerfModel:
    model: hw.ModelSpec
    gpu: hw.GpuSpec
    tp: int = 1
    eff: Efficiency = field(default_factory=Efficiency)
    gpu_memory_utilization: float = hw.GPU_MEMORY_UTILIZATION

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.kv_capacity_tokens < hw.KV_BLOCK_TOKENS:
            need = required_tp(self.model, self.gpu)
            raise ValueError(
                f"model {self.model.name} does not fit on {self.tp} x {self.gpu.name} "
                f"(weights {self.model.weight_bytes / hw.GB:.1f} GB, KV room for "
                f"{self.kv_capacity_tokens} tokens); use tp >= {need}"
            )

    @classmethod
    def from_names(cls, model: str, gpu: str, tp: int | None = None) -> PerfModel:
        m, g = hw.get_model(model), hw.get_gpu(gpu)
        return cls(m, g, tp if tp is not None else required_tp(m, g))

    # --- memory -------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return self.model.weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    @property
    def kv_capacity_tokens(self) -> int:
        usable = self.tp * (
            self.gpu.memory_bytes * self.gpu_memory_utilization - hw.ACTIVATION_RESERVE_BYTES
        )
        free = usable - self.weight_bytes
        return max(0, int(free // self.kv_bytes_per_token))

    @property
    def kv_capacity_blocks(self) -> int:
        return self.kv_capacity_tokens // hw.KV_BLOCK_TOKENS

    # --- step times ---------------------------------------------------------------------------
    def _tp_overhead_s(self) -> float:
        return 0.0 if self.tp == 1 else hw.TP_ALLREDUCE_S_PER_LAYER * self.model.num_layers

    def decode_step_s(self, batch_size: int, context_tokens: int) -> float:
        """One decode iteration for `batch_size` sequences holding `context_tokens` KV in total."""
        if batch_size <= 0:
            return 0.0
        bytes_moved = (self.weight_bytes + context_tokens * self.kv_bytes_per_token) / self.tp
        t_mem = bytes_moved / (self.gpu.hbm_bytes_per_s * self.eff.decode_bandwidth)
        flops = 2.0 * self.model.params * batch_size / self.tp
        t_compute = flops / (self.gpu.peak_flops * self.eff.decode_mfu)
        return max(t_mem, t_compute) + self.eff.step_overhead_s + self._tp_overhead_s()

    def prefill_flops(self, prompt_tokens: int) -> float:
        m = self.model
        dense = 2.0 * m.params * prompt_tokens
        # Causal attention scores and weighted sum: 2 matmuls x 2 FLOP x n^2/2 x hidden per layer.
        attention = 2.0 * m.num_layers * prompt_tokens * prompt_tokens * m.num_heads * m.head_dim
        return dense + attention

    def prefill_s(self, prompt_tokens: int) -> float:
        """A prefill iteration of `prompt_tokens` tokens (one prompt or several batched)."""
        if prompt_tokens <= 0:
            return 0.0
        t_compute = self.prefill_flops(prompt_tokens) / (
            self.tp * self.gpu.peak_flops * self.eff.prefill_mfu
        )
        t_mem = self.weight_bytes / self.tp / (self.gpu.hbm_bytes_per_s * self.eff.decode_bandwidth)
        return max(t_compute, t_mem) + self.eff.step_overhead_s + self._tp_overhead_s()

    def iteration_s(self, prefill_tokens: int, decode_batch: int, context_tokens: int) -> float:
        """A mixed iteration (vLLM v1 batches new prompts with running decodes in one step)."""
        if prefill_tokens <= 0:
            return self.decode_step_s(decode_batch, context_tokens)
        pre = self.prefill_s(prefill_tokens)
        if decode_batch <= 0:
            return pre
        # The decode tokens ride along the prefill's weight pass; only their KV reads add time.
        kv_read = context_tokens * self.kv_bytes_per_token / self.tp
        extra = kv_read / (self.gpu.hbm_bytes_per_s * self.eff.decode_bandwidth)
        return pre + extra

    def decode_tokens_per_s(self, batch_size: int, avg_context_tokens: int) -> float:
        step = self.decode_step_s(batch_size, batch_size * avg_context_tokens)
        return batch_size / step if step > 0 else 0.0

    # --- data movement ------------------------------------------------------------------------
    def kv_swap_s(self, tokens: int) -> float:
        """Copy `tokens` of KV cache between GPU and host memory (one direction)."""
        return tokens * self.kv_bytes_per_token / self.tp / self.gpu.pcie_bytes_per_s

    def load_s(self, warm: bool) -> float:
        """Bring the model up on this instance: warm from host memory, or cold from disk."""
        if warm:
            return hw.WARM_WAKE_FIXED_S + self.weight_bytes / self.tp / self.gpu.pcie_bytes_per_s
        return hw.ENGINE_START_S + self.weight_bytes / hw.DISK_READ_BYTES_PER_S


def required_tp(model: hw.ModelSpec, gpu: hw.GpuSpec) -> int:
    """Smallest power-of-two tensor-parallel degree leaving KV room for a full context x 4."""
    tp = 1
    while tp <= 16:
        usable = tp * (gpu.memory_bytes * hw.GPU_MEMORY_UTILIZATION - hw.ACTIVATION_RESERVE_BYTES)
        kv_tokens = (usable - model.weight_bytes) / model.kv_bytes_per_token
        if kv_tokens >= 4 * model.max_context_tokens:
            return tp
        tp *= 2
    raise ValueError(f"model {model.name} does not fit on 16 x {gpu.name}")


def tokens_per_s_table(models: list[str], gpus: list[str], batches: tuple[int, ...] = (1, 64)):
    """(model, gpu, tp, batch, step_ms, tok_s) rows for docs and closing notes."""
    rows = []
    for m in models:
        for g in gpus:
            try:
                p = PerfModel.from_names(m, g)
            except ValueError:
                continue
            for b in batches:
                step = p.decode_step_s(b, b * 512)
                rows.append((m, g, p.tp, b, step * 1e3, b / step))
    return rows


__all__ = ["Efficiency", "PerfModel", "required_tp", "tokens_per_s_table"]


# --- measured CPU profile (see hardware.py's "measured CPU profile") -----------------------------
# The tiny model on 2 CPU cores: the decode-fitted FLOP rate is already folded into the "peak", so
# the decode factors are 1; prefill runs faster than that rate, the fixed per-step cost and the
# per-request cost outside the engine are measured (hardware.py, with how).
CPU_TINY_EFFICIENCY = Efficiency(
    decode_bandwidth=1.0,
    prefill_mfu=hw.CPU_TINY_PREFILL_MFU,
    decode_mfu=1.0,
    step_overhead_s=hw.CPU_TINY_STEP_OVERHEAD_S,
    request_overhead_s=hw.CPU_TINY_REQUEST_OVERHEAD_S,
)
