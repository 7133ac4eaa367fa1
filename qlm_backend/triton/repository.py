"""Write engine models into a Triton model repository (the default fleet, test fleets, user fleets).

An engine model is named `<logical-model>__<instance>`: one Triton model per (model, serving
instance) pair, so the router addresses an instance directly and a model swap on an instance is an
unload of one name and a load of another.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlm_backend.contract import (
    ENGINE_INPUTS,
    ENGINE_OUTPUTS,
    ROUTER_INPUTS,
    ROUTER_OUTPUTS,
    io_config,
    io_pbtxt,
)
from qlm_backend.engine.config import CONFIG_FILE, EngineConfig

SEP = "__"

# The engines' input and output sections (contract.ENGINE_INPUTS, ENGINE_OUTPUTS).
ENGINE_IO = io_pbtxt(ENGINE_INPUTS, ENGINE_OUTPUTS)

SIM_MODEL_PY = '''\
"""Simulated vLLM engine (see qlm_backend/triton/sim_engine.py); its settings are in engine.json."""

from qlm_backend.triton.sim_engine import SimEngineModel as TritonPythonModel  # noqa: F401
'''


def engine_model_name(model: str, instance: str) -> str:
    return f"{model}{SEP}{instance}"


def split_engine_name(name: str) -> tuple[str, str]:
    model, sep, instance = name.partition(SEP)
    if not sep:
        raise ValueError(f"engine model name {name!r} is not <model>{SEP}<instance>")
    return model, instance


def sim_engine_config_pbtxt(name: str, parameters: Mapping[str, Any] | None = None) -> str:
    params = "".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
        for k, v in (parameters or {}).items()
    )
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        "model_transaction_policy { decoupled: true }\n"
        f"{ENGINE_IO}"
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        f"{params}"
    )


def write_sim_engine(repo: Path, model: str, instance: str, settings: Mapping[str, Any]) -> Path:
    """Create `<repo>/<model>__<instance>/` with config.pbtxt, 1/model.py and 1/engine.json."""
    cfg = EngineConfig.from_mapping(
        {"model": model, "instance": instance, **settings}
    )  # validate now
    name = engine_model_name(model, instance)
    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(sim_engine_config_pbtxt(name))
    (d / "1" / "model.py").write_text(SIM_MODEL_PY)
    body = {k: v for k, v in vars(cfg).items() if k in {"model", "instance", *settings}}
    (d / "1" / CONFIG_FILE).write_text(json.dumps(body, indent=2) + "\n")
    return d


def engine_config_dict(name: str, parameters: Mapping[str, str]) -> dict[str, Any]:
    """The full config of a simulated engine model with extra parameters, for `load_model(config=...)`.

    Triton replaces the repository's config with the override, so it must be complete; settings not
    given here still come from the model's engine.json.
    """
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        **io_config(ENGINE_INPUTS, ENGINE_OUTPUTS),
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {k: {"string_value": str(v)} for k, v in parameters.items()},
    }


ROUTER_MODEL_PY = '''\
"""The QLM router (see qlm_backend/triton/router_model.py); its settings are in router.json."""

from qlm_backend.triton.router_model import RouterModel as TritonPythonModel  # noqa: F401
'''


def router_config_pbtxt(name: str = "qlm") -> str:
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        "model_transaction_policy { decoupled: true }\n"
        f"{io_pbtxt(ROUTER_INPUTS, ROUTER_OUTPUTS)}"
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )


def write_router(repo: Path, settings: Mapping[str, Any], name: str = "qlm") -> Path:
    """Create `<repo>/<name>/` with config.pbtxt, 1/model.py and 1/router.json."""
    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(router_config_pbtxt(name))
    (d / "1" / "model.py").write_text(ROUTER_MODEL_PY)
    (d / "1" / "router.json").write_text(json.dumps(dict(settings), indent=2) + "\n")
    return d


def uniform_instances(
    prefix: str, gpu: str, model: str, count: int, max_in_flight: int
) -> list[dict[str, Any]]:
    """`count` identical instances `<prefix>-<k>` of one model on one GPU type (benches, tests)."""
    return [
        {
            "instance_id": f"{prefix}-{k}",
            "gpu": gpu,
            "models_allowed": [model],
            "initial_model": model,
            "max_in_flight": max_in_flight,
        }
        for k in range(count)
    ]


def add_fleet(
    repo: Path,
    router: str,
    policy: str,
    instances: list[dict[str, Any]],
    engine_settings: Mapping[str, Any] | None = None,
    router_settings: Mapping[str, Any] | None = None,
) -> list[str]:
    """Add a fleet behind its own router to `repo`: `fleet-<router>.json`, an engine model for every
    (model, instance) it allows, and the router. Returns the models to load at start (initial
    engines, then the router). Routers own their instances: give each fleet its own instance ids."""
    fleet_file = f"fleet-{router}.json"
    (repo / fleet_file).write_text(json.dumps({"instances": instances}, indent=2) + "\n")
    loads = []
    for inst in instances:
        for model in inst["models_allowed"]:
            write_sim_engine(
                repo, model, inst["instance_id"], {"gpu": inst["gpu"], **(engine_settings or {})}
            )
        if inst.get("initial_model"):
            loads.append(engine_model_name(inst["initial_model"], inst["instance_id"]))
    write_router(
        repo, {"policy": policy, "fleet": fleet_file, **(router_settings or {})}, name=router
    )
    loads.append(router)
    return loads
