"""Roofline performance model of one vLLM engine: a model on a GPU (or a tensor-parallel GPU set).

Pure arithmetic over hardware.py's constants. The simulated engine (sim.py), the RWT estimator and
the evaluation simulator all take their timings from here, so the router's predictions and the
engine's behaviour come from one model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qlm_backend.engine import hardware as hw


@dataclass(frozen=True)
class Efficiency:
    """Efficiency factors; defaults are hardware.py's sourced values, a measured profile overrides.

    The step structure (PerfModel.step_s) is the same for every device; these say how close a
    device comes to its datasheet on each part of a step, plus the costs a device pays per step,
    per sequence and per request.
    """

    decode_bandwidth: float = hw.DECODE_BANDWIDTH_EFFICIENCY  # streaming the weights
    prefill_mfu: float = hw.PREFILL_MFU  # linear layers over prompt tokens
    decode_mfu: float = hw.DECODE_MFU  # linear layers over decode tokens
    step_overhead_s: float = hw.STEP_OVERHEAD_S
    # Reading the KV cache in attention, as a share of HBM bandwidth (None: decode_bandwidth).
    kv_bandwidth: float | None = None
    # Attention score/value FLOPs of prompt chunks, as a share of peak (None: prefill_mfu).
    attention_mfu: float | None = None
    # How sharply the linear layers turn from bandwidth- to compute-bound: the two times combine
    # as a p-norm (p = inf would be the plain roofline max; measured GEMMs bend well before it).
    roofline_sharpness: float = hw.ROOFLINE_SHARPNESS
    # Per sequence in a step (sampling, the scheduler's and runner's Python bookkeeping): 0 on the
    # GPU profiles (their sourced figures fold it into the bandwidth factor); a CPU engine pays it.
    seq_overhead_s: float = 0.0
    # Per-request latency outside the engine before it is scheduled (server frontend, gRPC,
    # tokenizing, the model's stub): the request enters the engine's queue this much after it
    # arrived. 0 for the GPU profiles (their sourced figures are engine-side).
    request_overhead_s: float = 0.0

    @property
    def kv_bw(self) -> float:
        return self.decode_bandwidth if self.kv_bandwidth is None else self.kv_bandwidth

    @property
    def attn_mfu(self) -> float:
        return self.prefill_mfu if self.attention_mfu is None else self.attention_mfu


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
        """The model on that GPU with the GPU's measured profile where one exists
        (engine/profiles/), else the sourced defaults."""
        from qlm_backend.engine.profiles import efficiency_for

        m, g = hw.get_model(model), hw.get_gpu(gpu)
        return cls(m, g, tp if tp is not None else required_tp(m, g), efficiency_for(gpu))

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
    def _tp_overhead_s(self, tokens: int) -> float:
        if self.tp == 1:
            return 0.0
        m, g = self.model, self.gpu
        link = g.link_bytes_per_s or g.pcie_bytes_per_s
        ring = tokens * m.hidden_size * m.dtype_bytes * 2 * (self.tp - 1) / self.tp / link
        return 2 * m.num_layers * (hw.TP_ALLREDUCE_LATENCY_S + ring)

    def step_s(
        self,
        decode_seqs: int,
        decode_context_tokens: int,
        chunks: Sequence[tuple[int, int]] = (),
    ) -> float:
        """One engine iteration (vLLM v1: one forward pass over a flat batch of tokens).

        `decode_seqs` sequences decode one token each over `decode_context_tokens` of KV in total;
        `chunks` are prompt chunks (tokens, tokens already in the KV cache before the chunk), as
        chunked prefill schedules them under max_num_batched_tokens. The parts:
        - linear layers: the weights are read once per step and every token costs 2 x params
          FLOPs; bandwidth- and compute-bound times combine as a p-norm (the roofline's knee);
        - attention: decodes and chunks read the KV already cached; a chunk's scores against
          itself and what precedes it are FLOPs (quadratic in the prompt);
        - fixed costs: per step, per scheduled sequence, and the tensor-parallel all-reduces.
        So a decode that shares its step with a chunk waits for the chunk's tokens: the
        interference grows with the chunk.
        """
        chunk_tokens = sum(c for c, _ in chunks)
        tokens = decode_seqs + chunk_tokens
        if tokens <= 0:
            return 0.0
        e, m, g, tp = self.eff, self.model, self.gpu, self.tp
        mfu = (decode_seqs * e.decode_mfu + chunk_tokens * e.prefill_mfu) / tokens
        t_weights = self.weight_bytes / tp / (g.hbm_bytes_per_s * e.decode_bandwidth)
        seqs = decode_seqs + len(chunks)
        flops = 2.0 * (m.layer_params * tokens + m.head_params * seqs)
        t_flops = flops / tp / (g.peak_flops * mfu)
        p = e.roofline_sharpness
        t_linear = (t_weights**p + t_flops**p) ** (1.0 / p)
        kv_tokens = decode_context_tokens + sum(o for _, o in chunks)
        t_kv = kv_tokens * self.kv_bytes_per_token / tp / (g.hbm_bytes_per_s * e.kv_bw)
        attn = sum(self.attention_flops(c, o) for c, o in chunks)
        t_attn = attn / tp / (g.peak_flops * e.attn_mfu)
        fixed = e.step_overhead_s + e.seq_overhead_s * seqs + self._tp_overhead_s(tokens)
        return t_linear + t_kv + t_attn + fixed

    def attention_flops(self, chunk_tokens: int, offset_tokens: int) -> float:
        """Causal attention of a chunk against the cache and itself: QK^T and AV, 2 FLOP a MAC."""
        m = self.model
        pairs = chunk_tokens * (offset_tokens + (chunk_tokens + 1) / 2)
        return 4.0 * m.num_layers * m.num_heads * m.head_dim * pairs

    def decode_step_s(self, batch_size: int, context_tokens: int) -> float:
        """One decode iteration for `batch_size` sequences holding `context_tokens` KV in total."""
        if batch_size <= 0:
            return 0.0
        return self.step_s(batch_size, context_tokens)

    def prefill_flops(self, prompt_tokens: int) -> float:
        m = self.model
        linear = 2.0 * (m.layer_params * prompt_tokens + m.head_params)
        return linear + self.attention_flops(prompt_tokens, 0)

    def prefill_s(self, prompt_tokens: int) -> float:
        """A prefill-only iteration of one whole prompt of `prompt_tokens` tokens."""
        if prompt_tokens <= 0:
            return 0.0
        return self.step_s(0, 0, ((prompt_tokens, 0),))

    def iteration_s(self, prefill_tokens: int, decode_batch: int, context_tokens: int) -> float:
        """A mixed iteration: one prompt chunk of `prefill_tokens` beside `decode_batch` decodes."""
        chunks = ((prefill_tokens, 0),) if prefill_tokens > 0 else ()
        return self.step_s(decode_batch, context_tokens, chunks)

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
