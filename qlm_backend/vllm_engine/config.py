"""Engine arguments of a real vLLM engine model: `1/model.json`, as Triton's vllm_backend reads it.

The file maps to vLLM's AsyncEngineArgs. The keys this project relies on are checked here with a
message that names the key (the model load fails at once, not at the first request); any other key
must be an AsyncEngineArgs field, checked by the model at load against the installed vLLM.
Pure Python (no vLLM import), so the main venv can validate a repository too.
"""

from __future__ import annotations

import json
import os
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
    # KV cache size on CPU in bytes (vLLM's own key; replaces the VLLM_CPU_KVCACHE_SPACE env var).
    kv_cache_memory_bytes: int = 256 * MiB
    max_model_len: int = 2048
    dtype: str = "float32"
    scheduling_policy: str = "priority"
    distributed_executor_backend: str = "uni"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for vllm's AsyncEngineArgs."""
        return {
            **self.extra,
            "model": self.model,
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_memory_bytes": self.kv_cache_memory_bytes,
            "max_model_len": self.max_model_len,
            "dtype": self.dtype,
            "scheduling_policy": self.scheduling_policy,
            "distributed_executor_backend": self.distributed_executor_backend,
        }


def parse_engine_args(
    raw: Mapping[str, Any], base_dir: Path, allowed_extra: frozenset[str] | None = None
) -> VllmEngineArgs:
    """Validate model.json's content. Relative `model` paths resolve against `base_dir` (the file's
    directory) after expanding environment variables, so a repository can be moved as a whole.
    `allowed_extra`: the installed AsyncEngineArgs field names (None: not checked here)."""
    if not isinstance(raw, Mapping):
        raise EngineArgsError("<root>", f"must be a JSON object, got {type(raw).__name__}")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise EngineArgsError("model", "is required: a path to a Hugging Face-format model dir")
    path = Path(os.path.expandvars(model)).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if not (path / "config.json").is_file():
        hint = " (build the tiny model: qlm-build-tiny-model)" if "tiny" in path.name else ""
        raise EngineArgsError("model", f"no model at {path} (config.json missing){hint}")
    known = {
        "model",
        "max_num_seqs",
        "kv_cache_memory_bytes",
        "max_model_len",
        "dtype",
        "scheduling_policy",
        "distributed_executor_backend",
    }
    extra = {k: v for k, v in raw.items() if k not in known}
    if allowed_extra is not None:
        unknown = sorted(set(extra) - allowed_extra)
        if unknown:
            raise EngineArgsError(unknown[0], "is not an engine argument of the installed vLLM")
    for k in ("kv_cache_space", "gpu_memory_utilization"):
        if k in extra:
            raise EngineArgsError(
                k, "not used on CPU: set kv_cache_memory_bytes (bytes of KV cache)"
            )
    _check_kv_tier(extra)
    d = VllmEngineArgs(model=str(path))
    args = VllmEngineArgs(
        model=str(path),
        max_num_seqs=_or(_int(raw, "max_num_seqs", 1), d.max_num_seqs),
        kv_cache_memory_bytes=_or(_int(raw, "kv_cache_memory_bytes", MiB), d.kv_cache_memory_bytes),
        max_model_len=_or(_int(raw, "max_model_len", 16), d.max_model_len),
        dtype=_or(_choice(raw, "dtype", DTYPES), d.dtype),
        scheduling_policy=_or(
            _choice(raw, "scheduling_policy", SCHEDULING_POLICIES), d.scheduling_policy
        ),
        distributed_executor_backend=_or(
            _choice(raw, "distributed_executor_backend", EXECUTOR_BACKENDS),
            d.distributed_executor_backend,
        ),
        extra=extra,
    )
    _check_model_len(path, args.max_model_len)
    return args


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
    model_version_dir: Path, allowed_extra: frozenset[str] | None = None
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
    return parse_engine_args(raw, model_version_dir, allowed_extra)
