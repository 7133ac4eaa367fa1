"""One real tritonserver for the whole integration run, on free loopback ports, on the shipped repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qlm_backend.triton.launcher import models_to_load
from qlm_backend.triton.server import TritonServer

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "model_repository"


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    log = tmp_path_factory.mktemp("triton") / "server.log"
    server = TritonServer(REPO, load_models=models_to_load(REPO, None), log_path=log)
    server.start(timeout_s=90)
    try:
        yield server
    finally:
        server.stop()
        # Every process of the server's group is gone: no stub or engine left behind.
        assert server.descendants() == []
