"""qlm-serve's router supervisor: its decisions on a fake clock, then its thread-less shell on a fake
stub process (a process whose command line looks like a Python-backend stub's) and a fake
repository API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlm_backend.triton.supervisor import (
    Phase,
    RouterSupervisor,
    SupervisorConfig,
    Watch,
    loaded,
    pid_alive,
    started_at,
    step,
    stub_pids,
    unloaded,
    wants_state,
)

CFG = SupervisorConfig(hold_down_s=1.0, backoff_first_s=1.0, backoff_max_s=8.0, stable_s=60.0)


def crash(w: Watch, now_s: float) -> Watch:
    """The stub found dead while the index lists the model READY, and the unload done."""
    w, action = step(w, CFG, now_s, stub_alive=False, state="READY")
    assert action.kind == "unload"
    w, _ = unloaded(w, CFG, now_s, ok=True)
    return w


def recover(w: Watch, now_s: float) -> tuple[Watch, float]:
    """Step until the load is asked for; the load succeeds. Returns the watch and the load time."""
    t = now_s
    while True:
        w, action = step(w, CFG, t, stub_alive=False, state=None)
        if action.kind == "load":
            w, _ = loaded(w, CFG, t, ok=True)
            return w, t
        t += 0.1


def test_a_live_stub_needs_nothing_and_no_index_read():
    w = Watch(up_since_s=0.0)
    assert not wants_state(w, stub_alive=True)
    w2, action = step(w, CFG, 5.0, stub_alive=True, state=None)
    assert (w2, action.kind, action.log) == (w, "none", "")


def test_a_crash_unloads_holds_down_then_loads_and_logs_the_recovery_time():
    w = Watch(up_since_s=0.0)
    assert wants_state(w, stub_alive=False)
    w, action = step(w, CFG, 100.0, stub_alive=False, state="READY")
    assert action.kind == "unload" and "died" in action.log
    assert w.phase is Phase.DOWN and w.down_since_s == 100.0 and w.crashes == 1
    w, action = unloaded(w, CFG, 100.01, ok=True)
    assert w.phase is Phase.HOLDING and w.load_at_s == pytest.approx(101.01)
    assert "readiness is false" in action.log
    # Held down: readiness stays false for hold_down_s, whatever the observations say.
    assert not wants_state(w, stub_alive=False)
    w, action = step(w, CFG, 101.0, stub_alive=False, state=None)
    assert action.kind == "none"
    w, action = step(w, CFG, 101.02, stub_alive=False, state=None)
    assert action.kind == "load" and "try 1" in action.log
    w, action = loaded(w, CFG, 101.52, ok=True)
    assert w.phase is Phase.WATCHING and w.up_since_s == 101.52 and w.down_since_s is None
    assert "1.52 s" in action.log


def test_an_unload_or_reload_by_someone_else_is_left_alone_until_the_router_is_back():
    for state in ("UNLOADING", "UNAVAILABLE", "LOADING", None):
        w, action = step(Watch(), CFG, 10.0, stub_alive=False, state=state)
        assert w.phase is Phase.UNSUPERVISED and action.kind == "none"
        assert "not supervised" in action.log
        w, action = step(w, CFG, 11.0, stub_alive=False, state=None)
        assert w.phase is Phase.UNSUPERVISED and action == action.__class__()
        w, action = step(w, CFG, 12.0, stub_alive=True, state=None)
        assert w.phase is Phase.WATCHING and w.up_since_s == 12.0 and action.kind == "none"
        assert "supervising" in action.log


def test_a_failed_unload_is_tried_again_on_the_next_tick():
    w, _ = step(Watch(), CFG, 10.0, stub_alive=False, state="READY")
    w, action = unloaded(w, CFG, 10.0, ok=False, error="connection refused")
    assert w.phase is Phase.DOWN and "connection refused" in action.log
    w, action = step(w, CFG, 10.1, stub_alive=False, state=None)
    assert action.kind == "unload"


def test_failed_loads_back_off_exponentially_up_to_the_cap():
    w = crash(Watch(), 0.0)
    t, waits = 0.0, []
    for _ in range(6):
        while True:
            w, action = step(w, CFG, t, stub_alive=False, state=None)
            if action.kind == "load":
                break
            t = round(t + 0.01, 2)
        w, action = loaded(w, CFG, t, ok=False, error="router initialize failed")
        assert w.phase is Phase.HOLDING and "router initialize failed" in action.log
        waits.append(round(w.load_at_s - t, 2))
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    w, action = loaded(w, CFG, t, ok=True)
    assert w.phase is Phase.WATCHING and w.load_failures == 6  # counted until the next crash
    w = crash(w, t + 100)
    assert w.load_failures == 0


def test_a_router_that_crashes_soon_after_coming_back_waits_longer_each_time():
    w, t = Watch(up_since_s=0.0), 0.0
    holds = []
    for _ in range(5):
        t += 5.0  # up 5 s, less than stable_s: a crash loop
        w = crash(w, t)
        holds.append(round(w.load_at_s - t, 2))
        w, t = recover(w, t)
    assert holds == [1.0, 1.0, 2.0, 4.0, 8.0]  # hold-down, then backoff 1, 2, 4, 8 (capped)
    assert w.crashes == 5
    # A router that ran for stable_s counts as healthy: the next crash is reloaded after the
    # hold-down only.
    w = crash(w, t + CFG.stable_s)
    assert w.crashes == 1 and w.load_at_s - (t + CFG.stable_s) == pytest.approx(1.0)


def test_config_is_checked():
    with pytest.raises(ValueError):
        SupervisorConfig(poll_s=0)
    with pytest.raises(ValueError):
        SupervisorConfig(hold_down_s=-1)
    assert SupervisorConfig(backoff_first_s=0.5, backoff_max_s=3).backoff_s(4) == 3


# --- the shell, on a fake stub ------------------------------------------------------------------
def fake_stub(repo: Path, model: str) -> subprocess.Popen[bytes]:
    """A process whose argv is a Python-backend stub's: <stub binary> <repo>/<model>/1/model.py."""
    script = repo / model / "1" / "model.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("import time\ntime.sleep(60)\n")
    proc = subprocess.Popen(
        [str(repo / "triton_python_backend_stub"), str(script)], executable=sys.executable
    )
    # Popen returns inside the child's execve: its command line reads empty for a moment.
    deadline = time.monotonic() + 5
    while not Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc


class FakeApi:
    def __init__(self, repo: Path, procs: list[subprocess.Popen[bytes]]) -> None:
        self.repo, self.procs, self.calls = repo, procs, []
        self.model_state: str | None = "READY"

    def state(self, model: str) -> str | None:
        self.calls.append(("state", model))
        return self.model_state

    def unload(self, model: str) -> None:
        self.calls.append(("unload", model))

    def load(self, model: str) -> None:
        self.calls.append(("load", model))
        self.procs.append(fake_stub(self.repo, model))


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=5)


def test_stub_pids_finds_a_models_stub_and_a_killed_one_is_dead_while_a_zombie(tmp_path, procs):
    procs += [fake_stub(tmp_path, "qlm"), fake_stub(tmp_path, "mistral-7b__a10-0")]
    pids = [p.pid for p in procs] + [os.getpid()]
    assert stub_pids(pids, "qlm") == [procs[0].pid]
    assert stub_pids(pids, "qlm-test") == []
    os.kill(procs[0].pid, signal.SIGKILL)
    # Not reaped (nobody waits on it, as Triton does not on a crashed stub): a zombie, not alive.
    deadline = time.monotonic() + 5
    while pid_alive(procs[0].pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(procs[0].pid)
    assert Path(f"/proc/{procs[0].pid}").exists()
    assert stub_pids(pids, "qlm") == []  # a zombie's command line is empty
    # A live pid names the stub only with the stub's start time (pids are reused).
    start = started_at(procs[1].pid)
    assert start is not None and pid_alive(procs[1].pid, start)
    assert not pid_alive(procs[1].pid, start + 1)


def test_a_router_whose_stub_is_not_found_is_not_supervised(tmp_path):
    lines: list[str] = []
    api = FakeApi(tmp_path, [])
    sup = RouterSupervisor("qlm", list, api, CFG, lines.append).start()  # type: ignore[arg-type]
    assert not sup._thread.is_alive() and "not supervising" in lines[0]
    sup.stop()
    assert api.calls == []


def test_the_shell_unloads_holds_down_loads_and_finds_the_new_stub(tmp_path, procs):
    procs.append(fake_stub(tmp_path, "qlm"))
    api = FakeApi(tmp_path, procs)
    now = [0.0]
    lines: list[str] = []

    def group() -> list[int]:
        return [p.pid for p in procs if p.poll() is None]

    sup = RouterSupervisor("qlm", group, api, CFG, lines.append, clock=lambda: now[0])  # type: ignore[arg-type]
    assert sup._stub_alive()  # what start() checks, without starting its thread
    first = sup._pid
    sup.tick()
    assert api.calls == [] and sup.watch.phase is Phase.WATCHING  # alive: no index read
    procs[0].kill()
    procs[0].wait(timeout=5)
    now[0] = 10.0
    sup.tick()
    assert api.calls == [("state", "qlm"), ("unload", "qlm")]
    assert sup.watch.phase is Phase.HOLDING
    assert any(f"stub pid {first}" in line for line in lines)
    now[0] = 10.5
    sup.tick()
    assert api.calls[-1] == ("unload", "qlm")  # held down
    now[0] = 11.0
    sup.tick()
    assert api.calls[-1] == ("load", "qlm") and sup.watch.phase is Phase.WATCHING
    assert sup.recoveries == 1 and sup._pid == procs[1].pid != first
    sup.tick()
    assert api.calls[-1] == ("load", "qlm")  # the new stub is alive: nothing more
    assert all(" supervisor: qlm: " in line for line in lines)


def test_qlm_serve_supervises_unless_told_not_to():
    from qlm_backend.triton.launcher import parse_args

    assert not parse_args([]).no_supervise
    assert parse_args(["--no-supervise"]).no_supervise
