"""`python3 -m qlm_backend.triton.supervisor`: the router's supervisor beside a tritonserver that
qlm-serve did not start, e.g. in the compose deployment's `triton` container.

    python3 -m qlm_backend.triton.supervisor [--http-url http://127.0.0.1:8000]
        [--admin-key KEY | $QLM_ADMIN_KEY] [--model qlm] [--wait-s 3600] [--model-repository DIR]

qlm-serve runs the same RouterSupervisor over its server's process group. Here the server is not
our child: the stub is looked for among every process this one can see, so it must run in the
server's PID namespace (its container). It waits for the router to be READY the first time (a cold
GPU fleet loads for many minutes before the router does), checks that the server takes its admin key
(a wrong key would only show at the first crash, when the reload is refused), then supervises until
SIGTERM or SIGINT. `--model-repository` keeps to the stubs of that repository's models, for a host
that runs several tritonservers (the integration test's machine); a container has one.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from qlm_backend.triton.server import ADMIN_KEY_ENV
from qlm_backend.triton.supervisor import (
    STUB_BINARY,
    RepositoryApi,
    RouterSupervisor,
    SupervisorConfig,
    log_line,
)

DEFAULT_WAIT_S = 3600.0  # as long as the compose healthcheck's start_period: a cold 70B start
READY_POLL_S = 0.5
NOTE_EVERY_S = 60.0  # a "still waiting" line this often, so a long wait is not mistaken for a hang


@dataclass(frozen=True)
class StandaloneConfig:
    address: str  # host:port of the server's HTTP endpoint
    admin_key: str | None
    model: str
    wait_s: float
    model_repository: Path | None  # None: any stub serving `model`


def http_address(url: str) -> str:
    """host:port of an http:// URL (Triton's HTTP endpoint); ValueError otherwise."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    if (
        parts.scheme != "http"
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
    ):
        raise ValueError(f"expected http://HOST:PORT (Triton's HTTP endpoint), got {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port or 80}"


def _arg(check: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a checker raising ValueError: argparse then names the flag."""

    def convert(text: str) -> object:
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = check.__name__
    return convert


def _seconds(text: str) -> float:
    value = float(text)  # ValueError for a non-number
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def _model(text: str) -> str:
    if not text or "/" in text or text.strip() != text:
        raise ValueError(f"expected a model name, got {text!r}")
    return text


def _directory(text: str) -> Path:
    if not Path(text).is_dir():
        raise ValueError(f"{text!r} is not a directory")
    return Path(text)


def parse_args(argv: list[str] | None) -> StandaloneConfig:
    p = argparse.ArgumentParser(
        prog="python3 -m qlm_backend.triton.supervisor",
        description="Reload the QLM router when its Python-backend stub dies (Triton does not).",
    )
    p.add_argument(
        "--http-url",
        metavar="URL",
        type=_arg(http_address),
        default="http://127.0.0.1:8000",
        help="Triton's HTTP endpoint (default http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--admin-key",
        metavar="KEY",
        default=os.environ.get(ADMIN_KEY_ENV),
        help=f"key of the restricted model repository API (default: ${ADMIN_KEY_ENV}; none: open)",
    )
    p.add_argument(
        "--model", type=_arg(_model), default="qlm", metavar="NAME", help="the router (qlm)"
    )
    p.add_argument(
        "--wait-s",
        metavar="S",
        type=_arg(_seconds),
        default=DEFAULT_WAIT_S,
        help="how long to wait for the router to be READY the first time "
        f"(default {DEFAULT_WAIT_S:g} s: a cold GPU fleet loads for many minutes)",
    )
    p.add_argument(
        "--model-repository",
        metavar="DIR",
        type=_arg(_directory),
        default=None,
        help="only stubs of this repository's models (default: any stub serving --model)",
    )
    a = p.parse_args(argv)
    return StandaloneConfig(a.http_url, a.admin_key or None, a.model, a.wait_s, a.model_repository)


def process_ids() -> list[int]:
    """Every process this one can see: in a container, its PID namespace's."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def stubs_under(repository: Path) -> Callable[[], list[int]]:
    """The Python-backend stubs whose model file lies in `repository` (the stub's second argument,
    <repository>/<model>/<version>/model.py, relative to the stub's cwd if it is relative)."""
    root = os.path.realpath(repository) + os.sep

    def candidates() -> list[int]:
        found = []
        for pid in process_ids():
            with contextlib.suppress(OSError, IndexError, UnicodeDecodeError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if not argv[0].endswith(STUB_BINARY.encode()):
                    continue
                model_file = argv[1].decode()
                if not os.path.isabs(model_file):
                    model_file = os.path.join(os.readlink(f"/proc/{pid}/cwd"), model_file)
                if os.path.realpath(model_file).startswith(root):
                    found.append(pid)
        return found

    return candidates


def router_ready(address: str, model: str, timeout_s: float = 2.0) -> bool:
    """GET /v2/models/<model>/ready (unrestricted: no key needed)."""
    try:
        with urllib.request.urlopen(
            f"http://{address}/v2/models/{model}/ready", timeout=timeout_s
        ) as r:
            return bool(r.status == 200)
    except (OSError, http.client.HTTPException):  # refused, not ready (400), timed out
        return False


def wait_ready(
    cfg: StandaloneConfig,
    stop: threading.Event,
    say: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """True once the router is READY; False when --wait-s passes first or `stop` is set."""
    t0 = clock()
    deadline, note_at = t0 + cfg.wait_s, t0 + NOTE_EVERY_S
    while not router_ready(cfg.address, cfg.model):
        now = clock()
        if now >= deadline or stop.wait(min(READY_POLL_S, deadline - now)):
            return False
        if clock() >= note_at:
            say(
                f"still waiting for the router to be READY ({clock() - t0:.0f} of {cfg.wait_s:g} s)"
            )
            note_at += NOTE_EVERY_S
    return True


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def emit(line: str) -> None:
        print(line, flush=True)

    def say(message: str) -> None:
        emit(log_line(cfg.model, message))

    say(f"waiting up to {cfg.wait_s:g} s for the router to be READY on http://{cfg.address}")
    if not wait_ready(cfg, stop, say):
        if stop.is_set():
            say("stopped before the router was ready")
            return 0
        say(f"error: the router was not READY within --wait-s {cfg.wait_s:g} s: not supervising it")
        return 1
    sup_cfg = SupervisorConfig()
    api = RepositoryApi(cfg.address, cfg.admin_key, sup_cfg.request_timeout_s)
    try:
        api.state(cfg.model)
    except RuntimeError as e:  # the server answered, and refused (no key, or a wrong one)
        say(
            f"error: the server refused its repository index ({e}): --admin-key (default "
            f"${ADMIN_KEY_ENV}) must be the key of its restricted model-repository API"
        )
        return 2
    except (OSError, ValueError, http.client.HTTPException) as e:
        say(f"error: the repository index is unreadable ({e!r}): not supervising the router")
        return 1
    pids = process_ids if cfg.model_repository is None else stubs_under(cfg.model_repository)
    sup = RouterSupervisor(cfg.model, pids, api, sup_cfg, emit).start()
    if not sup.running:
        say(
            "error: the router is READY but no stub process of it is visible here: run this in "
            "the server's container (its PID namespace)"
            + (", with the server's --model-repository" if cfg.model_repository else "")
        )
        return 1
    while not stop.wait(1.0):
        pass
    sup.stop()
    say(f"stopped (the router was reloaded {sup.recoveries} times)")
    return 0
