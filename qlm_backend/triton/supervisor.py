"""qlm-serve's supervisor of the router model: notice its stub's death, take it out of readiness,
load it again through the repository API.

Why (docs/triton-vllm-facts.md section 8): when the stub of a decoupled Python model dies, Triton
2.51 keeps reporting the model ready, fails every later request with "Stub process ... is not
healthy" and reloads nothing. The supervisor watches the router's stub process (qlm-serve is its
ancestor, so a pid check is a file read, no request), and on its death unloads the model (readiness
false at once), holds it down briefly, and loads it again, with backoff when loads fail or the new
router dies again soon. What it cannot do is end the streams the dead stub held: Triton 2.51 keeps
their response factories forever, and neither the unload nor the load ends them (facts, section 8).

The decision logic (`step`, `loaded`, `unloaded`) is pure: time is an argument, observations come
in, actions and log lines go out; `RouterSupervisor` is the thread that observes and acts.

`python3 -m qlm_backend.triton.supervisor` runs it beside a tritonserver that qlm-serve did not
start (the compose deployment's `triton` container): supervisor_cli.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Literal

from qlm_backend.triton.server import admin_headers

STUB_BINARY = "triton_python_backend_stub"
# What a repository API call raises when the server refuses, breaks the connection or is gone.
API_ERRORS = (OSError, RuntimeError, ValueError, http.client.HTTPException)
UNREADABLE_NOTE_S = 10.0


@dataclass(frozen=True)
class SupervisorConfig:
    poll_s: float = 0.1  # how often the stub's pid is checked (one /proc read)
    # The router stays unready at least this long after a crash: a readiness watcher polling at
    # half this period (a load balancer, a client holding streams on the dead router) sees the
    # outage, which a reload of ~0.2 s would otherwise hide.
    hold_down_s: float = 1.0
    backoff_first_s: float = 1.0  # after a failed load, or a crash soon after coming back
    backoff_max_s: float = 30.0
    # A router that ran this long before crashing counts as healthy: its reload is not delayed.
    stable_s: float = 60.0
    request_timeout_s: float = 120.0  # a load runs the router's initialize()

    def __post_init__(self) -> None:
        for name in ("poll_s", "backoff_first_s", "backoff_max_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"supervisor {name} must be > 0")
        if self.hold_down_s < 0 or self.stable_s < 0:
            raise ValueError("supervisor hold_down_s and stable_s must be >= 0")

    def backoff_s(self, n: int) -> float:
        """The wait before the n-th retry (n >= 1): first, 2x first, ... up to the max."""
        return float(min(self.backoff_first_s * 2 ** max(n - 1, 0), self.backoff_max_s))


class Phase(str, Enum):
    WATCHING = "watching"  # the router is loaded; its stub is checked every poll
    DOWN = "down"  # its stub died while Triton still lists it READY: unload it
    HOLDING = "holding"  # unloaded (readiness false); load it again at load_at_s
    UNSUPERVISED = "unsupervised"  # unloaded or being loaded by someone else: leave it alone


@dataclass(frozen=True)
class Watch:
    phase: Phase = Phase.WATCHING
    up_since_s: float = 0.0  # when the router was loaded (by qlm-serve's start or a reload)
    down_since_s: float | None = None  # when its stub was found dead
    load_at_s: float = 0.0
    load_failures: int = 0  # failed loads since the crash
    crashes: int = 0  # crashes in a row, each less than stable_s after the router came back


@dataclass(frozen=True)
class Action:
    kind: Literal["none", "unload", "load"] = "none"
    log: str = ""  # what to log now (empty: nothing)


NOTHING = Action()


def wants_state(w: Watch, stub_alive: bool) -> bool:
    """Whether the repository index must be read this tick: only to tell a crash (the model still
    READY) from an unload or a reload someone else asked for (UNLOADING, UNAVAILABLE, LOADING)."""
    return w.phase is Phase.WATCHING and not stub_alive


def step(
    w: Watch, cfg: SupervisorConfig, now_s: float, stub_alive: bool, state: str | None
) -> tuple[Watch, Action]:
    """One look at the router: `stub_alive` (a live stub process serves it), `state` (its state in
    the repository index when `wants_state`, else None)."""
    if w.phase is Phase.WATCHING:
        if stub_alive:
            return w, NOTHING
        if state != "READY":
            return replace(w, phase=Phase.UNSUPERVISED), Action(
                log=f"the router's stub is gone and the model is {state or 'not listed'}: "
                "unloaded or reloaded through the repository API, not supervised until it is "
                "loaded again"
            )
        crashes = w.crashes + 1 if now_s - w.up_since_s < cfg.stable_s else 1
        w = replace(w, phase=Phase.DOWN, down_since_s=now_s, load_failures=0, crashes=crashes)
        return w, Action(
            "unload",
            f"the router's stub died while Triton lists it READY (crash {crashes} in a row): "
            "unloading it so that its readiness turns false",
        )
    if w.phase is Phase.DOWN:
        return w, Action("unload")  # the last unload failed: try again
    if w.phase is Phase.HOLDING:
        if now_s < w.load_at_s:
            return w, NOTHING
        return w, Action("load", f"loading the router (try {w.load_failures + 1})")
    # UNSUPERVISED: someone loaded it again (or qlm-serve's own reload raced an operator's).
    if stub_alive:
        return replace(w, phase=Phase.WATCHING, up_since_s=now_s, crashes=0), Action(
            log="the router is loaded again: supervising it"
        )
    return w, NOTHING


def unloaded(
    w: Watch, cfg: SupervisorConfig, now_s: float, ok: bool, error: str = ""
) -> tuple[Watch, Action]:
    if not ok:
        return w, Action(log=f"unloading the router failed ({error}); trying again")
    # A router that crashes again soon after coming back waits longer each time (a crash loop
    # must not hammer the server); one that ran for stable_s is reloaded after the hold-down only.
    wait_s = max(cfg.hold_down_s, cfg.backoff_s(w.crashes - 1) if w.crashes > 1 else 0.0)
    w = replace(w, phase=Phase.HOLDING, load_at_s=now_s + wait_s)
    return w, Action(log=f"unloaded: readiness is false; loading it again in {wait_s:.1f} s")


def loaded(
    w: Watch, cfg: SupervisorConfig, now_s: float, ok: bool, error: str = ""
) -> tuple[Watch, Action]:
    down_s = now_s - (w.down_since_s if w.down_since_s is not None else now_s)
    if ok:
        return replace(w, phase=Phase.WATCHING, up_since_s=now_s, down_since_s=None), Action(
            log=f"the router is back: ready {down_s:.2f} s after its stub was found dead"
        )
    fails = w.load_failures + 1
    wait_s = cfg.backoff_s(fails)
    w = replace(w, load_failures=fails, load_at_s=now_s + wait_s)
    return w, Action(
        log=f"loading the router failed ({error}); down {down_s:.1f} s, next try in {wait_s:.1f} s"
    )


# --- the shell: a thread that observes the stub and calls the repository API ---------------------
def stub_pids(group_pids: list[int], model: str) -> list[int]:
    """Live Python-backend stubs serving `model` among `group_pids`: the stub's second argument is
    the model's file, <repository>/<model>/<version>/model.py."""
    found = []
    for pid in group_pids:
        with contextlib.suppress(OSError, IndexError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(STUB_BINARY.encode()) and Path(argv[1].decode()).parts[-3] == model:
                found.append(pid)
    return found


def started_at(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when it is dead: gone, or a zombie
    (a dead stub stays one until Triton reaps it, at the model's unload). With the pid it names a
    process for good: a pid reused by a later process has a later start."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # Fields after the comm: state is field 3 of stat(5), starttime field 22.
    return None if len(fields) < 20 or fields[0] == "Z" else int(fields[19])


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Alive (not a zombie), and the same process as the one that started at `start` if given."""
    now = started_at(pid)
    return now is not None and (start is None or now == start)


def log_line(model: str, message: str) -> str:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
    return f"{stamp}.{int(now * 1000) % 1000:03d} supervisor: {model}: {message}"


class RepositoryApi:
    """Triton's model repository API over HTTP, with qlm-serve's admin key."""

    def __init__(self, http_url: str, admin_key: str | None, timeout_s: float) -> None:
        self.base = f"http://{http_url}/v2/repository"
        self.headers = {
            "Content-Type": "application/json",
            **(admin_headers(admin_key, "http") or {}),
        }
        self.timeout_s = timeout_s

    def _post(self, path: str, timeout_s: float) -> bytes:
        req = urllib.request.Request(
            self.base + path, data=b"{}", headers=self.headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return bytes(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"HTTP {e.code}: {e.read().decode(errors='replace')}") from None

    def state(self, model: str) -> str | None:
        """The model's state in the index (READY if any version is), None when unlisted."""
        states = [
            m.get("state") for m in json.loads(self._post("/index", 5.0)) if m.get("name") == model
        ]
        return "READY" if "READY" in states else (states[0] if states else None)

    def unload(self, model: str) -> None:
        self._post(f"/models/{model}/unload", self.timeout_s)

    def load(self, model: str) -> None:
        self._post(f"/models/{model}/load", self.timeout_s)


class RouterSupervisor:
    """Watches one router model of a running TritonServer (`group_pids`: its process group).

    The router runs one instance (model_repository/qlm/config.pbtxt): with several, the death of
    one stub would go unnoticed while another lives."""

    def __init__(
        self,
        model: str,
        group_pids: Callable[[], list[int]],
        api: RepositoryApi,
        cfg: SupervisorConfig | None = None,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model, self.group_pids, self.api = model, group_pids, api
        self.cfg = cfg or SupervisorConfig()
        self.log, self.clock = log, clock
        self.watch = Watch(up_since_s=clock())
        self.recoveries = 0
        self._pid: int | None = None
        self._start: int | None = None  # the stub's start time: a reused pid is not the stub
        self._unreadable_at: float | None = None  # when that was last said
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{model}-supervisor", daemon=True)

    def start(self) -> RouterSupervisor:
        if not self._stub_alive():
            # Its command line is not the one expected (another backend, another layout): every
            # tick would take it for dead and reload a healthy router.
            self._say("no stub process found for the router: not supervising it")
            return self
        self._say(f"supervising the router (stub pid {self._pid})")
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Before the server stops: its stubs exit then, which is no crash."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    @property
    def running(self) -> bool:
        """Whether it supervises (start() found the stub) and has not been stopped."""
        return self._thread.is_alive()

    def _say(self, message: str) -> None:
        self.log(log_line(self.model, message))

    def _stub_alive(self) -> bool:
        # The known stub is checked with one file read; the group is scanned only when it is gone.
        if self._pid is not None and pid_alive(self._pid, self._start):
            return True
        for pid in stub_pids(self.group_pids(), self.model):
            if (start := started_at(pid)) is not None:
                self._pid, self._start = pid, start
                return True
        return False  # self._pid stays the last stub seen alive: the log names it

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - the supervisor must outlive a bad tick
                self._say(f"tick failed: {e!r}")

    def tick(self) -> None:
        w = self.watch
        alive = self._stub_alive() if w.phase in (Phase.WATCHING, Phase.UNSUPERVISED) else False
        state = None
        if wants_state(w, alive):
            try:
                state = self.api.state(self.model)
            except API_ERRORS as e:
                # The server itself is gone or stopping: nothing to decide (qlm-serve notices; a
                # standalone supervisor ends with its container). A stopping server closes its HTTP
                # endpoint before its stubs exit, so this would repeat every poll: said once, then
                # every UNREADABLE_NOTE_S.
                now = self.clock()
                if self._unreadable_at is None or now - self._unreadable_at >= UNREADABLE_NOTE_S:
                    self._say(f"repository index unreadable ({e}); looking again")
                    self._unreadable_at = now
                return
        self._unreadable_at = None
        self.watch, action = step(w, self.cfg, self.clock(), alive, state)
        if action.log:
            self._say(
                action.log + (f" (stub pid {self._pid})" if w.phase is Phase.WATCHING else "")
            )
        if action.kind == "unload":
            self._act(self.api.unload, unloaded)
        elif action.kind == "load":
            self._act(self.api.load, loaded)
            if self.watch.phase is Phase.WATCHING:
                self.recoveries += 1
                self._say(f"new stub pid {self._pid if self._stub_alive() else None}")

    def _act(
        self,
        call: Callable[[str], None],
        outcome: Callable[[Watch, SupervisorConfig, float, bool, str], tuple[Watch, Action]],
    ) -> None:
        t0 = self.clock()
        try:
            call(self.model)
            ok, error = True, ""
        except API_ERRORS as e:
            ok, error = False, str(e) or repr(e)
        self.watch, action = outcome(self.watch, self.cfg, self.clock(), ok, error)
        if action.log:
            self._say(f"{action.log} [{call.__name__} took {(self.clock() - t0) * 1000:.0f} ms]")


if __name__ == "__main__":
    from qlm_backend.triton.supervisor_cli import main

    sys.exit(main())
