"""TritonServer.start on a server that exits at start-up: what it started in its process group is
stopped too (a stub outlived such a failed start by 90 minutes, with its shared memory)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from qlm_backend.triton.installation import TritonInstallation
from qlm_backend.triton.server import TritonServer


def test_a_server_that_exits_at_start_leaves_no_process_of_its_group(tmp_path: Path) -> None:
    # A stand-in for tritonserver: it starts a long child (as a model's stub would) and exits.
    fake = tmp_path / "tritonserver"
    pidfile = tmp_path / "child.pid"
    fake.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\nexit 3\n")
    fake.chmod(0o755)
    inst = TritonInstallation(fake, tmp_path, {}, "system", "test")
    server = TritonServer(tmp_path, installation=inst, log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="exited with code 3"):
        server.start(timeout_s=10)
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _running(child)
    if left:
        os.kill(child, 9)  # not left behind, whatever the outcome
    assert not left, "the failed server's child was left running"


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie holds nothing until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
