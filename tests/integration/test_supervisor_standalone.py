"""The router's supervisor as the compose deployment runs it (issue 18): `python3 -m
qlm_backend.triton.supervisor` started beside a tritonserver it did not start, before that server is
up, finding the router's stub among all processes (filtered by --model-repository: this machine runs
other servers), with the admin key from $QLM_ADMIN_KEY.

Checked: it waits for the router to be READY; a wrong key is refused at once, naming --admin-key;
after a SIGKILL of the router's stub the router turns unready, comes back READY by itself and serves
a request; a graceful stop of the server (the container's stop: SIGTERM to tritonserver only)
makes it reload nothing; SIGTERM stops it cleanly (exit 0). Everything is stopped by process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ADMIN_KEY, QUICK_EXIT, REPO

from qlm_backend.triton.launcher import models_to_load
from qlm_backend.triton.server import ADMIN_KEY_ENV, TritonServer
from qlm_backend.triton.supervisor import stub_pids

pytestmark = pytest.mark.timeout(120)

ROUTER = "qlm"
# The supervisor checks the stub every 0.1 s and unloads with one local call; room for a loaded VM.
DETECT_S = 2.0
# The 1 s hold-down plus the router's load (0.2-0.5 s here; more beside other suites).
BACK_S = 30.0


def status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def generate(http_url: str) -> dict:
    """One short request through the router (HTTP generate_stream), its last event."""
    body = {
        "text_input": "hi",
        "model": "mistral-7b",
        "slo_class": "interactive",
        "stream": True,
        "sampling_parameters": json.dumps({"max_tokens": 3, "ignore_eos": True}),
        "return_finish_reason": True,
    }
    req = urllib.request.Request(
        f"http://{http_url}/v2/models/{ROUTER}/generate_stream", json.dumps(body).encode()
    )
    last: dict = {}
    with urllib.request.urlopen(req, timeout=30) as r:
        for line in r:
            if line.startswith(b"data:"):
                last = json.loads(line[5:])
    return last


def start_supervisor(repo: Path, http_port: int, out: Path, key: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "qlm_backend.triton.supervisor"]
    cmd += ["--http-url", f"http://127.0.0.1:{http_port}", "--model-repository", str(repo)]
    cmd += ["--wait-s", "120"]
    env = {**os.environ, ADMIN_KEY_ENV: key}  # the default of --admin-key, as in compose
    with open(out, "wb") as f:
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop_group(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TritonServer]:
    """A server on the shipped repository, not yet started (the supervisor starts first)."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
    s = TritonServer(
        repo,
        load_models=models_to_load(repo, None),
        log_path=tmp_path / "server.log",
        admin_key=ADMIN_KEY,
        extra_args=QUICK_EXIT,
    )
    try:
        yield s
    finally:
        s.stop()
        assert s.descendants() == [], "processes left behind"


def test_standalone_supervisor_reloads_a_killed_router(server: TritonServer, tmp_path: Path):
    out = tmp_path / "supervisor.out"
    sup = start_supervisor(server.model_repository, server.http_port, out, ADMIN_KEY)
    wrong = None
    try:
        # Started before the server, as in the container: it waits.
        time.sleep(1.0)
        assert sup.poll() is None, out.read_text()
        server.start(timeout_s=120)
        ready_url = f"http://{server.http_url}/v2/models/{ROUTER}/ready"
        deadline = time.monotonic() + 30
        while "supervising the router" not in out.read_text():
            assert sup.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)

        # A wrong key: refused at once, naming the flag, before any crash could need it.
        wrong_out = tmp_path / "wrong-key.out"
        wrong = start_supervisor(server.model_repository, server.http_port, wrong_out, "nope")
        assert wrong.wait(timeout=30) == 2, wrong_out.read_text()
        assert "--admin-key" in wrong_out.read_text(), wrong_out.read_text()

        [victim] = stub_pids(server.descendants(), ROUTER)  # this server's router stub
        assert f"stub pid {victim}" in out.read_text()
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        seen: list[tuple[float, int | None]] = []
        while not (seen and seen[-1][1] == 200 and any(c != 200 for _, c in seen)):
            code = status(ready_url)
            if not seen or seen[-1][1] != code:
                seen.append((round(time.monotonic() - killed, 2), code))
            assert time.monotonic() - killed < BACK_S, f"{seen}\n{out.read_text()}"
            time.sleep(0.02)
        down = next(t for t, c in seen if c != 200)
        assert down < DETECT_S, seen
        print(f"readiness after the kill: {seen}")

        last = generate(server.http_url)
        assert last.get("finish_reason") == "length", last

        # The container's stop: the server gets SIGTERM, the supervisor does not. Triton closes its
        # endpoints before its stubs exit, so the supervisor cannot read the index and decides
        # nothing: no reload of a router that is being stopped.
        before = out.read_text()
        server.stop()
        time.sleep(0.5)
        after = out.read_text()[len(before) :]
        assert "loading the router" not in after and "unloading" not in after, after
        assert after.count("repository index unreadable") <= 1, after  # said once, not per poll

        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=10) == 0, out.read_text()
        text = out.read_text()
        for what in (
            "waiting up to 120 s",
            "died while Triton lists it READY",
            "unloaded: readiness is false",
            "the router is back",
            "stopped (the router was reloaded 1 times)",
        ):
            assert what in text, text
    finally:
        stop_group(sup)
        stop_group(wrong)
