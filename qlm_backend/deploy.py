"""GPU deployment: the Triton model repository of real vLLM engines behind the QLM router.

`docker/model_repository/fleet.json` is the one hand-written source: the fleet the router plans
over (core/fleet.py) plus a top-level `placement` section that the core keeps in `FleetConfig.extra`
and that says where each instance runs::

    "placement": {
      "h100-0":   {"server": "triton",     "gpus": [0], "kv_offloading_gib": 8},
      "h100x4-0": {"server": "triton-70b", "gpus": [4, 5, 6, 7]}
    }

`server` is a Triton server (a compose service, reached at grpc://<server>:8001); `gpus` are host
GPU indices; `kv_offloading_gib` (optional) turns on vLLM's KV offloading to host memory with a
buffer of that many GiB per engine (summed over its GPUs). From that file this module writes one
engine model per (instance, allowed model), named `<model>__<instance>`, and the router `qlm/`.

Two kinds of engine model (`--engine`):
- `qlm` (default): our vLLM engine model (qlm_backend/vllm_engine/model.py, Triton's Python backend
  with the image's system Python and vLLM): the vllm_backend contract plus `priority` (vLLM priority
  scheduling) and `num_cached_tokens`, sleep and wake control requests (warm model swaps), exact
  resume of evicted requests, request traces. Router: `engine_backend` "qlm-vllm", priority sent.
- `vllm`: Triton's stock vllm_backend (`backend: "vllm"`): no `priority` input, no sleep or wake
  (every swap is a cold unload and load), no cached-token counts. Router: `engine_backend` "vllm",
  no priority sent; the router plans every swap there as cold (RouterConfig.planning_fleet).

Placement on GPUs, from vllm_backend's src/model.py (`_validate_device_config`): with KIND_GPU it
sets CUDA_VISIBLE_DEVICES to the instance's Triton device id, and it refuses KIND_GPU for engines
over several GPUs. Triton's Python backend itself pins nothing, so our engine model does the same
(qlm_backend/vllm_engine/devices.py). Hence for both kinds `instance_group [{kind: KIND_GPU, gpus:
[k]}]` pins a single-GPU engine to GPU k; tensor-parallel engines are KIND_MODEL and vLLM takes the
first `tensor_parallel_size` GPUs the server process sees. So single-GPU instances may share a
server (each pinned by `gpus`), and a tensor-parallel instance gets a server of its own that sees
exactly its GPUs (compose `device_ids`). Container GPU indices are the host ids renumbered from 0 in
the order the server sees them, so `gpus: [k]` in config.pbtxt is the position of the host GPU in
its server's sorted GPU list.

Regenerate after editing fleet.json: `python -m qlm_backend.deploy docker/model_repository`
(`--engine vllm` for the stock backend). Pure Python, no Triton or vLLM import: the CPU test suite
validates the result (tests/unit/test_docker.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlm_backend.contract import (
    ENGINE_INPUTS,
    ENGINE_OUTPUTS,
    VLLM_BACKEND_INPUTS,
    VLLM_BACKEND_OUTPUTS,
    io_pbtxt,
)
from qlm_backend.core.fleet import FleetConfig, parse_fleet
from qlm_backend.engine import hardware as hw
from qlm_backend.triton.repository import engine_model_name, split_engine_name, write_router

PLACEMENT_KEY = "placement"
PLACEMENT_FIELDS = {"server", "gpus"}
PLACEMENT_OPTIONAL = {"kv_offloading_gib"}
ROUTER_SERVER = "triton"  # the compose service that runs the router; others hold remote engines
GRPC_PORT = 8001
VLLM_MODEL_FILE = "model.json"
ENGINES = ("qlm", "vllm")  # our vLLM engine model; Triton's stock vllm_backend
DEFAULT_ENGINE = "qlm"
# The router's engine_backend for each kind of engine model (router/config.py).
ROUTER_BACKENDS = {"qlm": "qlm-vllm", "vllm": "vllm"}

QLM_MODEL_PY = '''\
"""Our vLLM engine (see qlm_backend/vllm_engine/model.py) on GPU; engine arguments in model.json."""

from qlm_backend.vllm_engine.model import VllmEngineModel as TritonPythonModel  # noqa: F401
'''

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
    kv_offloading_gib: float | None = None  # vLLM KV offloading buffer per engine; None: off


def placements(fleet: FleetConfig) -> dict[str, Placement]:
    """Validate the fleet's `placement` section against its instances; errors name the instance."""
    raw = fleet.extra.get(PLACEMENT_KEY)
    if not isinstance(raw, Mapping):
        raise ValueError(f"fleet: missing object {PLACEMENT_KEY!r} (instance -> server and gpus)")
    out: dict[str, Placement] = {}
    for inst in fleet.instances:
        p = raw.get(inst.instance_id)
        where = f"fleet.{PLACEMENT_KEY}.{inst.instance_id}"
        if (
            not isinstance(p, Mapping)
            or not set(p) >= PLACEMENT_FIELDS
            or not set(p) <= PLACEMENT_FIELDS | PLACEMENT_OPTIONAL
        ):
            raise ValueError(
                f"{where}: expected {{'server': str, 'gpus': [int, ...]}} and optionally "
                f"'kv_offloading_gib' (number > 0), got {p!r}"
            )
        gpus = p["gpus"]
        if (
            not isinstance(gpus, list)
            or not gpus
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus)
        ):
            raise ValueError(f"{where}.gpus: expected a non-empty list of GPU indices")
        if len(gpus) != inst.tp:
            raise ValueError(f"{where}.gpus: {len(gpus)} GPUs for an instance with tp {inst.tp}")
        kv = p.get("kv_offloading_gib")
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int | float) or kv <= 0):
            raise ValueError(f"{where}.kv_offloading_gib: expected a number of GiB > 0, got {kv!r}")
        out[inst.instance_id] = Placement(str(p["server"]), tuple(gpus), kv)
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


def _instance_group(local_gpu: int | None) -> str:
    """KIND_GPU pinned to `local_gpu` for a single-GPU engine, KIND_MODEL for a tensor-parallel one."""
    if local_gpu is None:
        return "instance_group [ { count: 1 kind: KIND_MODEL } ]\n"
    return f"instance_group [ {{ count: 1 kind: KIND_GPU gpus: [ {local_gpu} ] }} ]\n"


def _parameter(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


def qlm_config_pbtxt(name: str, local_gpu: int | None, trace_requests: bool = False) -> str:
    """config.pbtxt of our vLLM engine model on GPU; `local_gpu` pins a single-GPU engine."""
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        "model_transaction_policy { decoupled: true }\n"
        # Our engines' contract: vllm_backend's plus `priority` and `num_cached_tokens`.
        f"{io_pbtxt(ENGINE_INPUTS, ENGINE_OUTPUTS)}"
        f"{_instance_group(local_gpu)}"
        # No EXECUTION_ENV_PATH: the stub runs the image's system Python, which has vLLM and
        # qlm_backend (docker/Dockerfile). The engine model's parameters (docs/engines.md):
        "# REPORT_CUSTOM_METRICS: vllm:* metrics on Triton's :8002. TRACE_REQUESTS: one log line per\n"
        "# request (python -m qlm_backend.deploy --trace-requests). STREAM_INTERVAL_S 0: a response\n"
        "# per engine step, as vllm_backend. EXACT_RESUME: an evicted request resumes with its token\n"
        "# ids (a prefix cache hit). DEFAULT_STREAM false: no `stream` input, no streaming.\n"
        + _parameter("REPORT_CUSTOM_METRICS", "true")
        + _parameter("TRACE_REQUESTS", "true" if trace_requests else "false")
        + _parameter("STREAM_INTERVAL_S", "0")
        + _parameter("EXACT_RESUME", "true")
        + _parameter("DEFAULT_STREAM", "false")
    )


def vllm_config_pbtxt(name: str, local_gpu: int | None) -> str:
    """config.pbtxt of a stock vllm_backend engine; `local_gpu` pins a single-GPU engine (KIND_GPU)."""
    return (
        f'name: "{name}"\nbackend: "vllm"\nmax_batch_size: 0\n'
        "model_transaction_policy { decoupled: true }\n"
        # The stock vllm_backend contract: ours without `priority`, which vllm_backend has no input
        # for; declaring it would make Triton accept a field the engine then rejects.
        f"{io_pbtxt(VLLM_BACKEND_INPUTS, VLLM_BACKEND_OUTPUTS)}"
        f"{_instance_group(local_gpu)}"
        # vllm_backend reports its vllm:* metrics on Triton's :8002 only with this on.
        f"{_parameter('REPORT_CUSTOM_METRICS', 'true')}"
    )


def _engine_args(model: str, tp: int, max_in_flight: int) -> dict[str, Any]:
    """The AsyncEngineArgs both kinds of engine model share."""
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
    }


def _kv_offloading(gib: float | None) -> dict[str, Any]:
    # vLLM's KV offloading: blocks evicted from GPU memory stay in a host-memory buffer, so a
    # resumed or repeated prefix is reloaded rather than recomputed. The backend is named: "native"
    # became vLLM's default only in 2026 (vllm-project/vllm#32421).
    if gib is None:
        return {}
    return {"kv_offloading_size": gib, "kv_offloading_backend": "native"}


def qlm_model_json(
    model: str, tp: int, max_in_flight: int, kv_offloading_gib: float | None = None
) -> dict[str, Any]:
    """Engine arguments of our vLLM engine model (1/model.json, vllm_engine/config.py)."""
    return {
        **_engine_args(model, tp, max_in_flight),
        # What the router's class priorities reach (forward_priority).
        "scheduling_policy": "priority",
        # One worker in the engine process for one GPU; worker processes for tensor parallelism.
        "distributed_executor_backend": "uni" if tp == 1 else "mp",
        # Warm swaps: the router's sleep control request moves the weights to host memory, a wake
        # moves them back (vLLM >= 0.7.3; docs/engines.md).
        "enable_sleep_mode": True,
        # An evicted request's resume and repeated prompts hit the prefix cache.
        "enable_prefix_caching": True,
        **_kv_offloading(kv_offloading_gib),
        # vLLM's per-request timestamps (the engine's traces) and stats need stat logging on.
        "disable_log_stats": False,
    }


def vllm_model_json(
    model: str, tp: int, max_in_flight: int, kv_offloading_gib: float | None = None
) -> dict[str, Any]:
    """vLLM AsyncEngineArgs for one stock vllm_backend engine (its 1/model.json)."""
    return {
        **_engine_args(model, tp, max_in_flight),
        # vLLM >= 0.7.3. vllm_backend has no sleep/wake request, so Triton unload/load still restarts
        # the engine and this goes unused; kept so both kinds pass vLLM the same engine arguments.
        "enable_sleep_mode": True,
        **_kv_offloading(kv_offloading_gib),
        # vllm:* metrics need the engine's stat logging on (vllm_backend README).
        "disable_log_stats": False,
    }


def router_settings(
    fleet: FleetConfig, pl: Mapping[str, Placement], engine: str = DEFAULT_ENGINE
) -> dict[str, Any]:
    _check_engine(engine)
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
        # Real engines load with no config override. Ours take `priority` (vLLM priority
        # scheduling) and sleep/wake; Triton's vllm_backend has no `priority` input (sending one
        # fails every request) and no sleep/wake, so the router plans its swaps cold.
        "engine_backend": ROUTER_BACKENDS[engine],
        "forward_priority": engine == "qlm",
        # A cold 70B load (140 GB read, TP4 start) takes minutes.
        "load_timeout_s": 1800.0,
    }


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")


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


def write_gpu_repository(
    repo: Path, engine: str = DEFAULT_ENGINE, trace_requests: bool = False
) -> list[str]:
    """(Re)write every engine model and the router under `repo` from `repo/fleet.json`; engine
    directories are written afresh, and those no longer in the fleet removed. `engine`: "qlm" (our
    vLLM engine model) or "vllm" (Triton's stock vllm_backend). Returns the engine model names."""
    _check_engine(engine)
    _, fleet, pl = load_deploy_fleet(repo)
    gpus = server_gpus(pl)
    names = engine_names(fleet)
    for inst in fleet.instances:
        for model in inst.models_allowed:
            if model not in HF_MODELS:
                raise ValueError(f"no Hugging Face checkpoint known for model {model!r}")
            split_engine_name(
                engine_model_name(model, inst.instance_id)
            )  # the router's naming rule
    for d in repo.iterdir():
        if d.is_dir() and "__" in d.name:
            shutil.rmtree(d)  # generated: stale files of the other engine kind go too
    for inst in fleet.instances:
        p = pl[inst.instance_id]
        local = gpus[p.server].index(p.gpus[0]) if inst.tp == 1 else None
        for model in inst.models_allowed:
            name = engine_model_name(model, inst.instance_id)
            d = repo / name
            (d / "1").mkdir(parents=True)
            if engine == "qlm":
                config = qlm_config_pbtxt(name, local, trace_requests)
                body = qlm_model_json(model, inst.tp, inst.max_in_flight, p.kv_offloading_gib)
                (d / "1" / "model.py").write_text(QLM_MODEL_PY)
            else:
                config = vllm_config_pbtxt(name, local)
                body = vllm_model_json(model, inst.tp, inst.max_in_flight, p.kv_offloading_gib)
            (d / "config.pbtxt").write_text(config)
            (d / "1" / VLLM_MODEL_FILE).write_text(json.dumps(body, indent=2) + "\n")
    write_router(repo, router_settings(fleet, pl, engine))
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo", type=Path, help="model repository holding fleet.json")
    ap.add_argument(
        "--engine",
        choices=ENGINES,
        default=DEFAULT_ENGINE,
        help="qlm: our vLLM engine model (priority, sleep/wake, exact resume, traces; default); "
        "vllm: Triton's stock vllm_backend (no priority, cold swaps only)",
    )
    ap.add_argument(
        "--trace-requests",
        action="store_true",
        help="our engine only: TRACE_REQUESTS on (one log line per request)",
    )
    args = ap.parse_args(argv)
    if args.trace_requests and args.engine != "qlm":
        ap.error("--trace-requests needs --engine qlm (vllm_backend has no request traces)")
    _, fleet, pl = load_deploy_fleet(args.repo)
    names = write_gpu_repository(args.repo, args.engine, args.trace_requests)
    kind = "our vLLM engine" if args.engine == "qlm" else "Triton vllm_backend"
    print(f"wrote {len(names)} engine models ({kind}) and the router under {args.repo}")
    for server, loads in initial_loads(fleet, pl).items():
        print(f"{server}: GPUs {server_gpus(pl)[server]}; load {' '.join(loads)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
