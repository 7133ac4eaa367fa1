"""Start and stop a real tritonserver process on loopback ports (used by qlm-serve, tests, benches).

The server runs in its own process group: Python-backend stubs and engine processes (vLLM's
EngineCore) are its descendants, and a crashed stub can leave them behind, so stopping signals the
whole group (SIGTERM, then SIGKILL after a timeout), never processes by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from qlm_backend.triton.installation import TritonInstallation, default_cache_dir, find_triton

BASE_FLAGS = (
    "--model-control-mode=explicit",
    "--disable-auto-complete-config",
    "--pinned-memory-pool-byte-size=0",
    "--allow-gpu-metrics=false",
    "--strict-readiness=true",
    # Each Python model instance talks to the server through a shared-memory region that starts at
    # 1 MiB and grows in 1 MiB steps (docs/triton-vllm-facts.md section 7). A soak at ~2.6
    # requests/s crashed a 2.51 stub with SIGSEGV after 19 minutes, then the server
    # (boost::interprocess::lock_exception); starting large makes growth (a remap under concurrent
    # senders) rare. Sparse until touched.
    "--backend-config=python,shm-default-byte-size=67108864",
    "--backend-config=python,shm-growth-byte-size=16777216",
)


class PortInUse(RuntimeError):
    pass


# The model repository API (index, load, unload) is restricted to holders of this key: clients send
# the header `qlm-admin-key` over HTTP and `triton-grpc-protocol-qlm-admin-key` over gRPC.
ADMIN_HEADER = "qlm-admin-key"
ADMIN_KEY_ENV = "QLM_ADMIN_KEY"


def admin_headers(key: str | None, protocol: str = "grpc") -> dict[str, str] | None:
    if not key:
        return None
    return {(f"triton-grpc-protocol-{ADMIN_HEADER}" if protocol == "grpc" else ADMIN_HEADER): key}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class TritonServer:
    model_repository: Path
    http_port: int = 0  # 0: pick a free port
    grpc_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    load_models: Sequence[str] = ()
    log_verbose: int = 0
    extra_args: Sequence[str] = ()
    log_path: Path | None = None
    installation: TritonInstallation | None = None
    exit_on_error: bool = False
    # When set, the model repository API needs this key (the router holds it, clients do not).
    admin_key: str | None = None
    env: dict[str, str] = field(
        default_factory=dict
    )  # extra environment for the server and its models
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log: IO[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        self.shm_prefix = f"qlm{os.getpid()}_{id(self) & 0xFFFFFF:x}_"
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if port == 0:
                setattr(self, name, free_port(self.host))
            elif not port_is_free(port, self.host):
                raise PortInUse(
                    f"port {port} ({name.replace('_', ' ')}) is already in use on {self.host}"
                )

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        inst = self.installation or find_triton(default_cache_dir())
        self.installation = inst
        args = [
            str(inst.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={inst.backend_dir}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-on-error={'true' if self.exit_on_error else 'false'}",
            f"--log-verbose={self.log_verbose}",
            *BASE_FLAGS,
        ]
        if self.admin_key:
            restrict = f"model-repository:{ADMIN_HEADER}={self.admin_key}"
            args += [f"--http-restricted-api={restrict}", f"--grpc-restricted-protocol={restrict}"]
        # Our own prefix for the Python backend's shared-memory regions, so that stop() can remove
        # what a killed server leaves in /dev/shm (and nothing of anybody else's).
        args.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        args += [f"--load-model={m}" for m in self.load_models]
        args += list(self.extra_args)
        return args

    def start(self, timeout_s: float = 60.0, stdout: IO[bytes] | int | None = None) -> float:
        """Start and wait until /v2/health/ready; returns the seconds it took."""
        cmd = self.command()
        assert self.installation is not None
        out: IO[bytes] | int | None = stdout
        if out is None and self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            out = self._log
        t0 = time.monotonic()
        env = {**self.installation.env, **self.env}
        # The router dispatches to this server's engines over its own gRPC port (router/config.py).
        env["QLM_GRPC_URL"] = self.grpc_url
        if self.admin_key:
            env[ADMIN_KEY_ENV] = self.admin_key
        else:
            env.pop(ADMIN_KEY_ENV, None)
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches stubs and engines too
        )
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                msg = f"tritonserver exited with code {self.proc.returncode}{self._log_tail()}"
                # Its stubs may outlive it, in its process group, each with its shared memory
                # (one was found alive 90 minutes after such a failed start).
                self.stop()
                raise RuntimeError(msg)
            if self.is_ready() and not port_is_free(self.metrics_port, self.host):
                return time.monotonic() - t0
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"tritonserver not ready within {timeout_s:.0f} s{self._log_tail()}")

    def _log_tail(self) -> str:
        if self.log_path and self.log_path.exists():
            lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
            return "; log tail:\n" + "\n".join(lines)
        return ""

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def crash_report(self) -> str | None:
        """A line saying the server died while it should be running (then a bench measured nothing)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        msg = f"tritonserver exited with code {self.proc.returncode} during the run"
        return msg + (f" (log: {self.log_path})" if self.log_path is not None else "")

    def descendants(self) -> list[int]:
        """Pids in the server's process group (stubs, engine processes)."""
        if not self.proc:
            return []
        pgid = self.proc.pid
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                # /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may contain spaces.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":  # zombies hold no resources
                    pids.append(int(entry.name))
        return pids

    def stop(self, timeout_s: float = 15.0) -> None:
        if not self.proc:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        # Stragglers (a stub's orphaned engine) still carry the group id: kill the group.
        deadline = time.monotonic() + timeout_s
        while self.descendants() and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        while self.descendants() and time.monotonic() < deadline:
            time.sleep(0.05)
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss_bytes(pids: Iterable[int], field: str = "VmRSS") -> int:
    """Summed resident memory of processes. `field` picks a /proc/PID/status line: VmRSS (all),
    RssAnon (private heap: what a leak grows), RssShmem (the Python backend's shared-memory pool,
    mapped by tritonserver and every stub, so counted once per process in VmRSS)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1]) * 1024
    return total
