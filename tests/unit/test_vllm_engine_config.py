"""The real vLLM engine's model.json, validated without vLLM (vllm_engine/config.py), and the GPU
pinning of its model instances (vllm_engine/devices.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qlm_backend.vllm_engine.config import (
    CPU_KV_CACHE_BYTES,
    EngineArgsError,
    check_repository,
    load_engine_args,
    parse_engine_args,
)
from qlm_backend.vllm_engine.devices import check_instance_kind, cuda_visible_devices


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    return d


def parse(model_dir: Path, platform: str | None = None, **keys: Any) -> Any:
    return parse_engine_args({"model": str(model_dir), **keys}, model_dir.parent, None, platform)


def test_defaults_and_pass_through_keys_reach_the_engine(model_dir: Path) -> None:
    args = parse(
        model_dir,
        enable_prefix_caching=True,
        kv_offloading_size=4,
        kv_offloading_backend="native",
    )
    kw = args.engine_kwargs()
    assert kw["model"] == str(model_dir) and kw["scheduling_policy"] == "priority"
    assert kw["kv_offloading_size"] == 4 and kw["kv_offloading_backend"] == "native"
    assert kw["enable_prefix_caching"] is True


@pytest.mark.parametrize(
    ("keys", "field", "message"),
    [
        ({"kv_offloading_size": 0}, "kv_offloading_size", "GiB > 0"),
        ({"kv_offloading_size": "4"}, "kv_offloading_size", "GiB > 0"),
        ({"kv_offloading_size": True}, "kv_offloading_size", "GiB > 0"),
        (
            {"kv_offloading_size": 2, "kv_offloading_backend": "disk"},
            "kv_offloading_backend",
            "one of native, lmcache",
        ),
        ({"kv_offloading_backend": "native"}, "kv_offloading_backend", "without"),
        ({"enable_prefix_caching": "yes"}, "enable_prefix_caching", "true or false"),
        ({"enable_sleep_mode": 1}, "enable_sleep_mode", "true or false"),
        ({"max_num_seqs": 0}, "max_num_seqs", ">= 1"),
        ({"dtype": "int4"}, "dtype", "one of"),
        ({"gpu_memory_utilization": 0}, "gpu_memory_utilization", "fraction in"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization", "fraction in"),
        ({"gpu_memory_utilization": "0.9"}, "gpu_memory_utilization", "fraction in"),
        (
            {"gpu_memory_utilization": 0.9, "kv_cache_memory_bytes": 1 << 30},
            "gpu_memory_utilization",
            "gpu_memory_utilization or kv_cache_memory_bytes, not both",
        ),
        ({"kv_cache_space": 4}, "kv_cache_space", "kv_cache_memory_bytes"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size", ">= 1"),
        (
            {"tensor_parallel_size": 2, "distributed_executor_backend": "uni"},
            "distributed_executor_backend",
            "use 'mp'",
        ),
        ({"max_model_len": 100_000}, "max_model_len", "max_position_embeddings"),
    ],
)
def test_a_bad_key_is_refused_naming_it(
    model_dir: Path, keys: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(EngineArgsError, match=message) as e:
        parse(model_dir, **keys)
    assert e.value.key == field and f"'{field}'" in str(e.value)


def test_unknown_keys_are_checked_against_the_installed_vllm(model_dir: Path) -> None:
    raw = {"model": str(model_dir), "enable_prefix_cachin": True}
    with pytest.raises(EngineArgsError, match="not an engine argument"):
        parse_engine_args(raw, model_dir.parent, frozenset({"enable_prefix_caching"}))


def test_the_file_errors_name_the_file(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(EngineArgsError, match="missing"):
        load_engine_args(tmp_path)
    (tmp_path / "model.json").write_text("{nope")
    with pytest.raises(EngineArgsError, match="not valid JSON"):
        load_engine_args(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"model": "tiny"}))
    assert load_engine_args(tmp_path).model == str(model_dir)  # relative to the file


def test_cpu_engines_size_the_kv_cache_in_bytes(model_dir: Path) -> None:
    for platform in ("cpu", None):  # at engine load on CPU; a repository checked anywhere
        kw = parse(model_dir, platform).engine_kwargs()
        assert kw["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
        assert "gpu_memory_utilization" not in kw
        assert parse(model_dir, platform, kv_cache_memory_bytes=1 << 30).engine_kwargs()[
            "kv_cache_memory_bytes"
        ] == (1 << 30)
    # On CPU the fraction is refused with the key and what to set instead.
    with pytest.raises(EngineArgsError, match="not used on CPU: set kv_cache_memory_bytes") as e:
        parse(model_dir, "cpu", gpu_memory_utilization=0.9)
    assert e.value.key == "gpu_memory_utilization"


def test_gpu_engines_size_the_kv_cache_by_gpu_memory_utilization(model_dir: Path) -> None:
    for platform in ("gpu", None):
        args = parse(model_dir, platform, gpu_memory_utilization=0.9)
        kw = args.engine_kwargs()
        assert kw["gpu_memory_utilization"] == 0.9
        assert "kv_cache_memory_bytes" not in kw  # it would override the fraction in vLLM
        assert "GPU memory utilization 0.9" in args.memory_summary()
    # Neither key on a GPU: vLLM's own default fraction, no CPU-sized KV cache.
    kw = parse(model_dir, "gpu").engine_kwargs()
    assert "kv_cache_memory_bytes" not in kw and "gpu_memory_utilization" not in kw
    # Bytes alone stay allowed on a GPU (vLLM's fine-grained alternative).
    kw = parse(model_dir, "gpu", kv_cache_memory_bytes=8 << 30).engine_kwargs()
    assert kw["kv_cache_memory_bytes"] == 8 << 30 and "gpu_memory_utilization" not in kw
    with pytest.raises(ValueError, match="platform"):
        parse(model_dir, "tpu")


def test_gpu_deployment_keys_pass_through(model_dir: Path) -> None:
    """What qlm_backend.deploy writes for a GPU engine: sleep mode, prefix caching, KV offloading,
    tensor parallelism with worker processes (the default there)."""
    args = parse(
        model_dir,
        "gpu",
        gpu_memory_utilization=0.9,
        enable_sleep_mode=True,
        enable_prefix_caching=True,
        kv_offloading_size=8,
        kv_offloading_backend="native",
        tensor_parallel_size=4,
        dtype="auto",
    )
    kw = args.engine_kwargs()
    assert args.world_size == 4 and kw["tensor_parallel_size"] == 4
    assert kw["distributed_executor_backend"] == "mp"  # "uni" runs one worker
    assert kw["enable_sleep_mode"] is True and kw["enable_prefix_caching"] is True
    assert (kw["kv_offloading_size"], kw["kv_offloading_backend"]) == (8, "native")
    assert parse(model_dir).engine_kwargs()["distributed_executor_backend"] == "uni"


def test_a_hugging_face_repository_id_is_taken_as_it_is(tmp_path: Path) -> None:
    args = parse_engine_args(
        {"model": "mistralai/Mistral-7B-v0.1", "max_model_len": 8192}, tmp_path, platform="gpu"
    )
    assert args.model == "mistralai/Mistral-7B-v0.1"  # vLLM fetches it; it checks the length
    # Paths that are not there stay errors that say where they looked.
    for model in ("../models/tiny-llama", "./org/name", "/abs/path", "a/b/c", "$HOME/x"):
        with pytest.raises(EngineArgsError, match="no model at") as e:
            parse_engine_args({"model": model}, tmp_path)
        assert e.value.key == "model"


@pytest.mark.parametrize(
    ("kind", "device", "current", "pinned"),
    [
        ("GPU", "3", None, "3"),  # what vllm_backend sets: the Triton device id
        ("GPU", 0, "", "0"),
        ("GPU", "1", "4,5,6,7", "5"),  # a server already restricted: the id indexes its devices
        ("GPU", "0", "GPU-aaaa, GPU-bbbb", "GPU-aaaa"),
        ("GPU", "-1", None, None),  # no device assigned: nothing to pin (as vllm_backend)
        ("MODEL", "0", None, None),  # tensor-parallel engines use what the server sees
        ("CPU", "0", "0", None),
    ],
)
def test_a_kind_gpu_instance_is_pinned_to_its_device(
    kind: str, device: str | int, current: str | None, pinned: str | None
) -> None:
    assert cuda_visible_devices(kind, device, current) == pinned


def test_pinning_errors_say_why() -> None:
    with pytest.raises(ValueError, match="sees only 2 GPU"):
        cuda_visible_devices("GPU", "2", "0,1")
    with pytest.raises(ValueError, match="model_instance_device_id"):
        cuda_visible_devices("GPU", "x", None)
    check_instance_kind("GPU", 1)
    check_instance_kind("MODEL", 4)
    check_instance_kind("CPU", 1)
    with pytest.raises(ValueError, match="KIND_MODEL"):
        check_instance_kind("GPU", 4)


def test_a_repository_check_names_the_engine(tmp_path: Path) -> None:
    for name, body in (
        ("a__x", {"model": "org/a", "gpu_memory_utilization": 0.9}),
        ("b__x", {"model": "org/b", "gpu_memory_utilization": 0.9, "kv_offloading_size": 8}),
    ):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "model.json").write_text(json.dumps(body))
    assert check_repository(tmp_path, None, "gpu") == ["a__x", "b__x"]
    fields = frozenset({"gpu_memory_utilization"})  # a vLLM without KV offloading
    with pytest.raises(ValueError, match="b__x: model.json key 'kv_offloading_size'"):
        check_repository(tmp_path, fields, "gpu")
    with pytest.raises(ValueError, match="a__x: .*not used on CPU"):
        check_repository(tmp_path, None, "cpu")
