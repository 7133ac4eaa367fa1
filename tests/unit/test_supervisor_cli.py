"""The router's supervisor run on its own (`python3 -m qlm_backend.triton.supervisor`, the compose
deployment's): its flags, its wait for the router, its key check against a fake Triton, how it finds
stubs among all processes, and the shell's once-per-10-s note while the server is unreachable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qlm_backend.triton import supervisor_cli
from qlm_backend.triton.server import free_port
from qlm_backend.triton.supervisor import (
    STUB_BINARY,
    UNREADABLE_NOTE_S,
    RouterSupervisor,
    SupervisorConfig,
)
from qlm_backend.triton.supervisor_cli import http_address, parse_args, stubs_under

ROOT = Path(__file__).resolve().parents[2]


def test_defaults(monkeypatch):
    monkeypatch.setenv("QLM_ADMIN_KEY", "k1")
    cfg = parse_args([])
    assert (cfg.address, cfg.admin_key, cfg.model) == ("127.0.0.1:8000", "k1", "qlm")
    assert cfg.wait_s == 3600 and cfg.model_repository is None
    monkeypatch.setenv("QLM_ADMIN_KEY", "")
    assert parse_args([]).admin_key is None  # an empty key: the API is open
    assert parse_args(["--admin-key", "k2", "--wait-s", "0"]).admin_key == "k2"


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://triton:8000", "triton:8000"),
        ("http://127.0.0.1:18000/", "127.0.0.1:18000"),
        ("http://[::1]:8000", "[::1]:8000"),
        ("http://triton", "triton:80"),
    ],
)
def test_http_url_forms(url, address):
    assert http_address(url) == address


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--http-url", "https://triton:8000"], "--http-url"),
        (["--http-url", "triton:8000"], "--http-url"),
        (["--http-url", "http://triton:8000/v2"], "--http-url"),
        (["--http-url", "http://triton:99999"], "--http-url"),
        (["--http-url", "http://user@triton:8000"], "--http-url"),
        (["--wait-s", "-1"], "--wait-s"),
        (["--wait-s", "nan"], "--wait-s"),
        (["--wait-s", "inf"], "--wait-s"),
        (["--wait-s", "soon"], "--wait-s"),
        (["--model", ""], "--model"),
        (["--model", "a/b"], "--model"),
        (["--model-repository", "/nonexistent/models"], "--model-repository"),
    ],
)
def test_bad_input_is_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


# --- the run, against a fake Triton ----------------------------------------------------------------
class FakeTriton(BaseHTTPRequestHandler):
    ready = True
    index_status = 200  # 403: the restricted API refuses the key

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(200 if self.ready and self.path == "/v2/models/qlm/ready" else 400, b"")

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.index_status != 200:
            body = b'{"error":"This API is restricted, expecting header \'qlm-admin-key\'"}'
            self._answer(self.index_status, body)
            return
        self._answer(200, json.dumps([{"name": "qlm", "version": "1", "state": "READY"}]).encode())

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def triton() -> Iterator[tuple[str, type[FakeTriton]]]:
    handler = type("Handler", (FakeTriton,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_signals(monkeypatch):
    """main() installs SIGTERM/SIGINT handlers: not into the test process."""
    monkeypatch.setattr(supervisor_cli.signal, "signal", lambda *a: None)


def test_a_refused_admin_key_exits_2_naming_the_flag(triton, no_signals, capsys):
    url, handler = triton
    handler.index_status = 403
    assert supervisor_cli.main(["--http-url", url, "--admin-key", "wrong"]) == 2
    out = capsys.readouterr().out
    assert "--admin-key" in out and "403" in out and "supervisor: qlm: error" in out


def test_a_router_that_is_never_ready_is_given_up_after_wait_s(triton, no_signals, capsys):
    url, handler = triton
    handler.ready = False
    t0 = time.monotonic()
    assert supervisor_cli.main(["--http-url", url, "--wait-s", "0.3"]) == 1
    assert time.monotonic() - t0 < 3
    assert "not READY within --wait-s 0.3 s" in capsys.readouterr().out


def test_a_ready_router_without_a_visible_stub_is_not_supervised(
    triton, no_signals, capsys, tmp_path
):
    url, _ = triton
    argv = ["--http-url", url, "--model-repository", str(tmp_path)]
    assert supervisor_cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "no stub process of it is visible here" in out and "--model-repository" in out


def test_sigterm_while_waiting_is_a_clean_exit():
    cmd = [sys.executable, "-m", "qlm_backend.triton.supervisor"]
    cmd += ["--http-url", f"http://127.0.0.1:{free_port()}", "--wait-s", "60"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        assert b"waiting up to 60 s" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert b"stopped before the router was ready" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


# --- stubs among all processes --------------------------------------------------------------------
def fake_stub(repo: Path, model: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A process whose argv is a Python-backend stub's: <stub> <repo>/<model>/1/model.py (relative to
    `cwd` when given)."""
    script = repo / model / "1" / "model.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("import time\ntime.sleep(60)\n")
    arg = str(script.relative_to(cwd)) if cwd else str(script)
    proc = subprocess.Popen(
        [str(repo / STUB_BINARY), arg], executable=sys.executable, cwd=cwd or None
    )
    deadline = time.monotonic() + 5
    while not Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc


def test_stubs_are_found_among_all_processes_and_kept_to_the_repository(tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    procs = [fake_stub(mine, "qlm"), fake_stub(other, "qlm"), fake_stub(mine, "m__i", cwd=mine)]
    try:
        everywhere = set(supervisor_cli.process_ids())
        assert {p.pid for p in procs} <= everywhere and os.getpid() in everywhere
        assert sorted(stubs_under(mine)()) == sorted([procs[0].pid, procs[2].pid])
        assert stubs_under(other)() == [procs[1].pid]
        assert stubs_under(tmp_path / "mine" / "qlm")() == [procs[0].pid]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=5)


# --- the shell's note while the index is unreadable ------------------------------------------------
class DownApi:
    def __init__(self) -> None:
        self.down = True

    def state(self, model: str) -> str | None:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        return "UNAVAILABLE"


def test_an_unreadable_index_is_said_once_then_every_10_s():
    """A stopping or dead server: the stub is gone and the index unreadable at every poll."""
    api, now, lines = DownApi(), [0.0], []
    sup = RouterSupervisor("qlm", list, api, SupervisorConfig(), lines.append, lambda: now[0])  # type: ignore[arg-type]
    for _ in range(99):  # 9.9 s of polls
        sup.tick()
        now[0] = round(now[0] + 0.1, 1)
    assert len(lines) == 1 and "repository index unreadable" in lines[0]
    now[0] = UNREADABLE_NOTE_S
    sup.tick()
    assert len(lines) == 2
    # Readable again (someone unloaded it): the decision runs, and the next outage is said at once.
    api.down = False
    sup.tick()
    assert "not supervised" in lines[-1] and sup._unreadable_at is None
    assert all(" supervisor: qlm: " in line for line in lines)
