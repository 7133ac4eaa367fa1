"""GPU deployment: the Triton model repository of real vLLM engines behind the QLM router.

`docker/model_repository/fleet.json` is the one hand-written source: the fleet the router plans
over (core/fleet.py) plus a top-level `placement` section that the core keeps in `FleetConfig.extra`
and that says where each instance runs::

    "placement": {
      "h100-0":   {"server": "triton",     "gpus": [0]},
      "h100x4-0": {"server": "triton-70b", "gpus": [4, 5, 6, 7]}
    }

`server` is a Triton server (a compose service, reached at grpc://<server>:8001); `gpus` are host
GPU indices. From that file this module writes one `backend: "vllm"` engine model per (instance,
allowed model), named `<model>__<instance>`, and the router `qlm/`:

- How vllm_backend places an engine (src/model.py, `_validate_device_config`): with KIND_GPU it sets
  CUDA_VISIBLE_DEVICES to the instance's Triton device id, so `instance_group [{kind: KIND_GPU,
  gpus: [k]}]` pins a single-GPU engine to GPU k; tensor-parallel engines must be KIND_MODEL and
  vLLM then takes the first `tensor_parallel_size` GPUs the server process sees. Hence: single-GPU
  instances may share a server (each pinned by `gpus`), and a tensor-parallel instance gets a
  server of its own that sees exactly its GPUs (compose `device_ids`).
- Container GPU indices are the host ids renumbered from 0 in the order the server sees them, so
  `gpus: [k]` in config.pbtxt is the position of the host GPU in its server's sorted GPU list.

Regenerate after editing fleet.json: `python -m qlm_backend.deploy docker/model_repository`.
Pure Python, no Triton or vLLM import: the CPU test suite validates the result (tests/unit/test_docker.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlm_backend.contract import VLLM_BACKEND_INPUTS, VLLM_BACKEND_OUTPUTS, io_pbtxt
from qlm_backend.core.fleet import FleetConfig, parse_fleet
from qlm_backend.engine import hardware as hw
from qlm_backend.triton.repository import engine_model_name, split_engine_name, write_router

PLACEMENT_KEY = "placement"
ROUTER_SERVER = "triton"  # the compose service that runs the router; others hold remote engines
GRPC_PORT = 8001
VLLM_MODEL_FILE = "model.json"

# Hugging Face checkpoints of the profiled models: the same shapes hardware.py cites. Instruct/chat
# variants of the same architecture (e.g. meta-llama/Meta-Llama-3-70B-Instruct) keep the profile valid.
HF_MODELS: dict[str, str] = {
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "vicuna-13b": "lmsys/vicuna-13b-v1.5",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
}


@dataclass(frozen=True)
class Placement:
    server: str
    gpus: tuple[int, ...]  # host GPU indices


def placements(fleet: FleetConfig) -> dict[str, Placement]:
    """Validate the fleet's `placement` section against its instances; errors name the instance."""
    raw = fleet.extra.get(PLACEMENT_KEY)
    if not isinstance(raw, Mapping):
        raise ValueError(f"fleet: missing object {PLACEMENT_KEY!r} (instance -> server and gpus)")
    out: dict[str, Placement] = {}
    for inst in fleet.instances:
        p = raw.get(inst.instance_id)
        where = f"fleet.{PLACEMENT_KEY}.{inst.instance_id}"
        if not isinstance(p, Mapping) or set(p) != {"server", "gpus"}:
            raise ValueError(f"{where}: expected {{'server': str, 'gpus': [int, ...]}}, got {p!r}")
        gpus = p["gpus"]
        if (
            not isinstance(gpus, list)
            or not gpus
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus)
        ):
            raise ValueError(f"{where}.gpus: expected a non-empty list of GPU indices")
        if len(gpus) != inst.tp:
            raise ValueError(f"{where}.gpus: {len(gpus)} GPUs for an instance with tp {inst.tp}")
        out[inst.instance_id] = Placement(str(p["server"]), tuple(gpus))
    extra = sorted(set(raw) - set(out))
    if extra:
        raise ValueError(f"fleet.{PLACEMENT_KEY}: unknown instance(s) {extra}")
    used: dict[int, str] = {}
    for iid, p in out.items():
        for g in p.gpus:
            if g in used:
                raise ValueError(f"fleet.{PLACEMENT_KEY}: GPU {g} given to {used[g]} and {iid}")
            used[g] = iid
    for iid, p in out.items():
        # vLLM's KIND_MODEL engines take the server's first tp GPUs: share the server and they collide.
        if len(p.gpus) > 1 and any(o.server == p.server for k, o in out.items() if k != iid):
            raise ValueError(
                f"fleet.{PLACEMENT_KEY}.{iid}: a tensor-parallel instance needs a server of its own"
            )
    if ROUTER_SERVER not in {p.server for p in out.values()}:
        raise ValueError(
            f"fleet.{PLACEMENT_KEY}: no instance on the router's server {ROUTER_SERVER!r}"
        )
    return out


def server_gpus(pl: Mapping[str, Placement]) -> dict[str, list[int]]:
    """Host GPU ids each server sees (its compose device_ids), sorted."""
    out: dict[str, list[int]] = {}
    for p in pl.values():
        out.setdefault(p.server, []).extend(p.gpus)
    return {s: sorted(g) for s, g in sorted(out.items())}


def vllm_config_pbtxt(name: str, local_gpu: int | None) -> str:
    """config.pbtxt of a vllm_backend engine; `local_gpu` pins a single-GPU engine (KIND_GPU)."""
    group = (
        "instance_group [ { count: 1 kind: KIND_MODEL } ]\n"
        if local_gpu is None
        else f"instance_group [ {{ count: 1 kind: KIND_GPU gpus: [ {local_gpu} ] }} ]\n"
    )
    return (
        f'name: "{name}"\nbackend: "vllm"\nmax_batch_size: 0\n'
        "model_transaction_policy { decoupled: true }\n"
        # The stock vllm_backend contract: ours without `priority`, which vllm_backend has no input
        # for; declaring it would make Triton accept a field the engine then rejects.
        f"{io_pbtxt(VLLM_BACKEND_INPUTS, VLLM_BACKEND_OUTPUTS)}"
        f"{group}"
        # vllm_backend reports its vllm:* metrics on Triton's :8002 only with this on.
        'parameters { key: "REPORT_CUSTOM_METRICS" value { string_value: "true" } }\n'
    )


def vllm_model_json(model: str, tp: int, max_in_flight: int) -> dict[str, Any]:
    """vLLM AsyncEngineArgs for one engine (vllm_backend's 1/model.json)."""
    spec = hw.get_model(model)
    return {
        "model": HF_MODELS[model],
        "tensor_parallel_size": tp,
        # The fraction the roofline's KV capacity assumes, so the router's estimates match the engine.
        "gpu_memory_utilization": hw.GPU_MEMORY_UTILIZATION,
        "max_model_len": spec.max_context_tokens,
        # Room for every request the router keeps in flight plus the ones it is evicting.
        "max_num_seqs": max(64, 2 * max_in_flight),
        "dtype": "auto",
        # vLLM >= 0.7.3. vllm_backend has no sleep/wake request, so Triton unload/load still restarts
        # the engine; kept on for engines that expose wake-up (see docker/README.md, warm start).
        "enable_sleep_mode": True,
        # vllm:* metrics need the engine's stat logging on (vllm_backend README).
        "disable_log_stats": False,
    }


def router_settings(fleet: FleetConfig, pl: Mapping[str, Placement]) -> dict[str, Any]:
    remote = {
        iid: f"grpc://{p.server}:{GRPC_PORT}"
        for iid, p in sorted(pl.items())
        if p.server != ROUTER_SERVER
    }
    return {
        "policy": "qlm",
        "fleet": "fleet.json",
        "default_slo_class": "interactive",
        "instance_servers": remote,
        # Triton's vllm_backend engines: plain loads (no config override) and no `priority` input,
        # which vllm_backend lacks (sending one fails every request).
        "engine_backend": "vllm",
        "forward_priority": False,
        # A cold 70B load (140 GB read, TP4 start) takes minutes.
        "load_timeout_s": 1800.0,
    }


def initial_loads(fleet: FleetConfig, pl: Mapping[str, Placement]) -> dict[str, list[str]]:
    """`--load-model` names per server: the initial engines, and the router on its own server."""
    out: dict[str, list[str]] = {s: [] for s in server_gpus(pl)}
    for inst in fleet.instances:
        if inst.initial_model:
            out[pl[inst.instance_id].server].append(
                engine_model_name(inst.initial_model, inst.instance_id)
            )
    out[ROUTER_SERVER].append("qlm")
    return out


def engine_names(fleet: FleetConfig) -> list[str]:
    return [engine_model_name(m, i.instance_id) for i in fleet.instances for m in i.models_allowed]


def load_deploy_fleet(repo: Path) -> tuple[dict[str, Any], FleetConfig, dict[str, Placement]]:
    data = json.loads((repo / "fleet.json").read_text())
    fleet = parse_fleet(data, strict=False)
    unknown = set(fleet.extra) - {PLACEMENT_KEY, "default_model"}
    if unknown:
        raise ValueError(f"fleet: unknown key(s) {sorted(unknown)}")
    return data, fleet, placements(fleet)


def write_gpu_repository(repo: Path) -> list[str]:
    """(Re)write every engine model and the router under `repo` from `repo/fleet.json`; engine or
    router directories no longer in the fleet are removed. Returns the engine model names."""
    _, fleet, pl = load_deploy_fleet(repo)
    gpus = server_gpus(pl)
    names = engine_names(fleet)
    for d in repo.iterdir():
        if d.is_dir() and "__" in d.name and d.name not in names:
            shutil.rmtree(d)
    for inst in fleet.instances:
        p = pl[inst.instance_id]
        local = gpus[p.server].index(p.gpus[0]) if inst.tp == 1 else None
        for model in inst.models_allowed:
            if model not in HF_MODELS:
                raise ValueError(f"no Hugging Face checkpoint known for model {model!r}")
            name = engine_model_name(model, inst.instance_id)
            split_engine_name(name)  # the router's naming rule
            d = repo / name
            (d / "1").mkdir(parents=True, exist_ok=True)
            (d / "config.pbtxt").write_text(vllm_config_pbtxt(name, local))
            body = vllm_model_json(model, inst.tp, inst.max_in_flight)
            (d / "1" / VLLM_MODEL_FILE).write_text(json.dumps(body, indent=2) + "\n")
    write_router(repo, router_settings(fleet, pl))
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo", type=Path, help="model repository holding fleet.json")
    args = ap.parse_args(argv)
    _, fleet, pl = load_deploy_fleet(args.repo)
    names = write_gpu_repository(args.repo)
    print(f"wrote {len(names)} engine models and the router under {args.repo}")
    for server, loads in initial_loads(fleet, pl).items():
        print(f"{server}: GPUs {server_gpus(pl)[server]}; load {' '.join(loads)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
