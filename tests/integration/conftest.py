"""One real tritonserver for the whole integration run, on free loopback ports.

Its repository is a copy of the shipped one (the default fleet and its `qlm` router) plus two small
test fleets that run ten times faster than real time (time_scale 0.1), each behind its own router:
`qlm-test` (policy qlm) and `fcfs-test` (policy fcfs). They have separate instances, because a
router owns what its instances run.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlm_backend.triton.launcher import models_to_load
from qlm_backend.triton.repository import add_fleet
from qlm_backend.triton.server import TritonServer

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "model_repository"
TIME_SCALE = 0.1
ADMIN_KEY = "test-admin-key"  # the model repository API is restricted, as in the shipped deployment
# Triton waits up to its exit timeout (30 s) for models that still hold requests at shutdown; a
# request whose engine stub was killed, or some a client abandoned, are never released by Triton
# 2.51 (docs/triton-vllm-facts.md section 8), so a test server's stop took 30 s for nothing. Its
# processes are checked gone after the stop either way.
QUICK_EXIT = ("--exit-timeout-secs=5",)

TEST_FLEETS = {
    "qlm-test": {
        "policy": "qlm",
        "instances": [
            {
                "instance_id": "q-a10-0",
                "gpu": "A10",
                "models_allowed": ["mistral-7b"],
                "initial_model": "mistral-7b",
                "max_in_flight": 4,
            },
            {
                "instance_id": "q-a100-0",
                "gpu": "A100-80G",
                "models_allowed": ["llama-2-13b", "llama-3-8b"],
                "initial_model": "llama-2-13b",
                "max_in_flight": 8,
            },
        ],
    },
    "fcfs-test": {
        "policy": "fcfs",
        "instances": [
            {
                "instance_id": "f-a10-0",
                "gpu": "A10",
                "models_allowed": ["mistral-7b"],
                "initial_model": "mistral-7b",
                "max_in_flight": 4,
            },
        ],
    },
}
ENGINE_SETTINGS = {"time_scale": TIME_SCALE, "max_num_seqs": 4}


def build_repository(dst: Path) -> list[str]:
    """Copy the shipped repository, add the test fleets; returns the models to load at start."""
    shutil.copytree(REPO, dst)
    loads = models_to_load(dst, None)
    for router, spec in TEST_FLEETS.items():
        loads += add_fleet(
            dst,
            router,
            spec["policy"],
            spec["instances"],
            ENGINE_SETTINGS,
            {"time_scale": TIME_SCALE},
        )
    return loads


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    base = tmp_path_factory.mktemp("triton")
    loads = build_repository(base / "repo")
    server = TritonServer(
        base / "repo",
        load_models=loads,
        log_path=base / "server.log",
        admin_key=ADMIN_KEY,
        extra_args=QUICK_EXIT,
    )
    server.start(timeout_s=120)
    try:
        yield server
    finally:
        server.stop()
        # Every process of the server's group is gone: no stub or engine left behind.
        assert server.descendants() == []
        # Every model unloaded cleanly: the 2.51 stub crashed at exit while our metric families
        # were left to the interpreter's teardown (now released in finalize()).
        log = (base / "server.log").read_text(errors="replace")
        assert "Segfault encountered" not in log, "a Python-backend stub crashed at unload"
