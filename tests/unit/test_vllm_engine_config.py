"""The real vLLM engine's model.json, validated without vLLM (vllm_engine/config.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qlm_backend.vllm_engine.config import EngineArgsError, load_engine_args, parse_engine_args


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    return d


def parse(model_dir: Path, **keys: Any) -> Any:
    return parse_engine_args({"model": str(model_dir), **keys}, model_dir.parent)


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
        ({"gpu_memory_utilization": 0.9}, "gpu_memory_utilization", "not used on CPU"),
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
