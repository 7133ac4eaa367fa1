"""`qlm-serve`: start a real tritonserver with QLM on a fleet, print how to call it, stop cleanly.

Beside Triton it starts `qlm-openai` (the OpenAI-compatible endpoint, qlm_backend/openai_front) as a
child in qlm-serve's own process group, so Ctrl-C reaches both; it is stopped with the server (and
stops by itself if qlm-serve is killed). It also supervises the router: when the router's stub dies,
Triton 2.51 reloads nothing, so qlm-serve unloads and loads it again (triton/supervisor.py;
--no-supervise turns it off).

qlm-openai gets qlm-serve's --host, --openai-port, --model-repository and --fleet, the server's gRPC
address, and any --openai-arg; its size caps default to the router's (router.json in the same
repository), so they agree with the router without a flag here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from qlm_backend.openai_front import cli as openai_cli
from qlm_backend.openai_front.config import DEFAULT_PORT as OPENAI_PORT
from qlm_backend.router.config import FLEET_ENV
from qlm_backend.triton.installation import TritonNotFound, default_cache_dir, find_triton
from qlm_backend.triton.repository import engine_model_name
from qlm_backend.triton.server import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    PortInUse,
    TritonServer,
    port_is_free,
)
from qlm_backend.triton.supervisor import RepositoryApi, RouterSupervisor, SupervisorConfig

FLEET_FILE = "fleet.json"
ROUTER_MODEL = "qlm"


class LaunchError(RuntimeError):
    pass


def models_to_load(repo: Path, fleet_path: Path | None) -> list[str]:
    """The router (when the repository has one) and each instance's initial engine."""
    fleet_path = fleet_path or repo / FLEET_FILE
    if not fleet_path.exists():
        raise LaunchError(f"no fleet config at {fleet_path} (pass --fleet FILE)")
    try:
        fleet = json.loads(fleet_path.read_text())
    except json.JSONDecodeError as e:
        raise LaunchError(f"fleet config {fleet_path} is not valid JSON: {e}") from None
    names = []
    for i, inst in enumerate(fleet.get("instances", [])):
        if "instance_id" not in inst:
            raise LaunchError(f"fleet config {fleet_path}: instances[{i}] has no 'instance_id'")
        if inst.get("server"):  # lives on another Triton server; nothing to load here
            continue
        model = inst.get("initial_model")
        if model:
            name = engine_model_name(model, inst["instance_id"])
            if not (repo / name).is_dir():
                raise LaunchError(
                    f"fleet config: instances[{i}].initial_model {model!r} has no engine model {name!r} in {repo}"
                )
            names.append(name)
    if (repo / ROUTER_MODEL).is_dir():
        names.append(ROUTER_MODEL)
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qlm-serve", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument(
        "--fleet", type=Path, default=None, help="fleet config (default: <repository>/fleet.json)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--log-file", type=Path, default=None, help="server log (default: stdout)")
    p.add_argument("--triton", choices=("auto", "system", "pytriton"), default="auto")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.add_argument(
        "--admin-key",
        default=os.environ.get(ADMIN_KEY_ENV),
        help=f"key of the restricted model repository API (default: ${ADMIN_KEY_ENV}, else a random key "
        "per run that only the router holds)",
    )
    p.add_argument(
        "--open-repository-api",
        action="store_true",
        help="do not restrict the model repository API (development only)",
    )
    p.add_argument(
        "--openai-port",
        type=int,
        default=OPENAI_PORT,
        help=f"port of the OpenAI-compatible endpoint, qlm-openai (default {OPENAI_PORT})",
    )
    p.add_argument("--no-openai", action="store_true", help="do not start qlm-openai")
    p.add_argument(
        "--openai-arg",
        action="append",
        default=[],
        metavar="ARGS",
        help="more qlm-openai arguments, shell-quoted, e.g. --openai-arg='--max-tokens-limit 4096' "
        "(its size caps default to the router's; docs/openai.md)",
    )
    p.add_argument(
        "--no-supervise",
        action="store_true",
        help="do not reload the router when its stub dies (docs/reliability.md, the router's own crash)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    return p.parse_args(argv)


def openai_command(a: argparse.Namespace, repo: Path, grpc_url: str) -> list[str]:
    """qlm-openai for this server's router ($QLM_OPENAI_API_KEY, if set, is its API key)."""
    cmd = [sys.executable, "-m", "qlm_backend.openai_front", "--host", a.host]
    cmd += ["--port", str(a.openai_port), "--triton-grpc", grpc_url, "--router", ROUTER_MODEL]
    cmd += ["--model-repository", str(repo), "--parent-pid", str(os.getpid())]
    if a.fleet:
        cmd += ["--fleet", str(a.fleet.resolve())]
    for extra in getattr(a, "openai_arg", []):
        try:
            cmd += shlex.split(extra)
        except ValueError as e:  # unbalanced quotes
            raise LaunchError(f"--openai-arg {extra!r}: {e}") from None
    return cmd


# qlm-openai's settings that qlm-serve decides (they must match its server and its own checks).
OWN_SETTINGS = {
    "host": "--host",
    "port": "--openai-port",
    "triton_grpc": "--grpc-port",
    "router": "the router it loads",
    "model_repository": "--model-repository",
    "fleet": "--fleet",
    "parent_pid": "its own pid",
    "show_config": "nothing: qlm-openai would exit",
}


def check_openai(a: argparse.Namespace, cmd: list[str]) -> None:
    """Refuse --openai-arg that qlm-openai would refuse (its own parser and checks, before Triton
    starts), or that overrides what qlm-serve sets."""
    args = cmd[3:]  # after `python -m qlm_backend.openai_front`
    n_own = len(args) - sum(len(shlex.split(x)) for x in a.openai_arg)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            mine = openai_cli.parse_args(args[:n_own])
            full = openai_cli.parse_args(args)
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        raise LaunchError(f"--openai-arg: {lines[-1] if lines else 'refused'}") from None
    for dest, owner in OWN_SETTINGS.items():
        if getattr(full, dest) != getattr(mine, dest):
            flag = "--" + dest.replace("_", "-")
            raise LaunchError(f"--openai-arg: qlm-openai's {flag} is set by qlm-serve ({owner})")
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its notes are printed when it starts
            openai_cli.build_config(full)
    except (ValueError, OSError) as e:
        raise LaunchError(f"--openai-arg: qlm-openai: {e}") from None


def start_openai(cmd: list[str], url: str, timeout_s: float = 30.0) -> subprocess.Popen[bytes]:
    """Start qlm-openai (in qlm-serve's process group) and wait until its /health answers 200."""
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"qlm-openai exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    stop_openai(proc)
    raise LaunchError(f"qlm-openai did not answer {url}/health within {timeout_s:.0f} s")


def stop_openai(proc: subprocess.Popen[bytes] | None, timeout_s: float = 12.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # uvicorn: graceful shutdown, bounded at 5 s
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def start_supervisor(server: TritonServer, timeout_s: float) -> RouterSupervisor:
    """Reloads the router through the repository API when its stub dies (Triton 2.51 does not)."""
    cfg = SupervisorConfig(request_timeout_s=timeout_s)
    api = RepositoryApi(server.http_url, server.admin_key, cfg.request_timeout_s)
    log = lambda msg: print(f"qlm-serve: {msg}", flush=True)  # noqa: E731
    return RouterSupervisor(ROUTER_MODEL, server.descendants, api, cfg, log).start()


def example_engine(loaded: list[str]) -> str:
    engines = [m for m in loaded if m != ROUTER_MODEL]
    return engines[0] if engines else ROUTER_MODEL


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    repo = a.model_repository.resolve()
    try:
        if not repo.is_dir():
            raise LaunchError(f"model repository {repo} does not exist")
        loads = models_to_load(repo, a.fleet)
        inst = find_triton(default_cache_dir(), a.triton)
        server = TritonServer(
            repo,
            http_port=a.http_port,
            grpc_port=a.grpc_port,
            metrics_port=a.metrics_port,
            host=a.host,
            load_models=loads,
            log_verbose=a.log_verbose,
            log_path=a.log_file,
            installation=inst,
            admin_key=None if a.open_repository_api else (a.admin_key or secrets.token_urlsafe(24)),
            # The router reads its fleet from router.json; --fleet overrides it for this run.
            env={FLEET_ENV: str(a.fleet.resolve())} if a.fleet else {},
        )
        with_openai = ROUTER_MODEL in loads and not a.no_openai
        if with_openai and not port_is_free(a.openai_port, a.host):
            raise PortInUse(
                f"port {a.openai_port} (qlm-openai) is already in use on {a.host} "
                "(pass --openai-port N or --no-openai)"
            )
        if with_openai:
            check_openai(a, openai_command(a, repo, server.grpc_url))
        elif a.openai_arg:
            raise LaunchError("--openai-arg: no qlm-openai is started (--no-openai, or no router)")
        if a.dry_run:
            print(" ".join(server.command()))
            if with_openai:
                print(shlex.join(openai_command(a, repo, server.grpc_url)))
            return 0
    except (LaunchError, TritonNotFound, PortInUse, ValueError) as e:
        print(f"qlm-serve: error: {e}", file=sys.stderr)
        return 2

    stop = {"sig": 0}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop["sig"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"qlm-serve: starting tritonserver {inst.version} ({inst.kind}) on {repo}", flush=True)
    print(f"qlm-serve: loading {', '.join(loads)}", flush=True)
    try:
        took = server.start(timeout_s=a.timeout)
    except (RuntimeError, TimeoutError) as e:
        print(f"qlm-serve: error: {e}", file=sys.stderr)
        return 1
    supervisor = None
    if ROUTER_MODEL in loads and not a.no_supervise:
        supervisor = start_supervisor(server, a.timeout)
    host = a.host if a.host not in ("0.0.0.0", "::") else "127.0.0.1"
    openai_url = f"http://{host}:{a.openai_port}"
    front = None
    if with_openai:
        try:
            front = start_openai(openai_command(a, repo, server.grpc_url), openai_url)
        except LaunchError as e:
            print(f"qlm-serve: error: {e}", file=sys.stderr)
            if supervisor is not None:
                supervisor.stop()
            server.stop()
            return 1
    eng = example_engine(loads)
    router_hint = openai_line = ""
    if ROUTER_MODEL in loads:
        model = eng.split("__")[0]
        router_hint = (
            f"  curl -N http://{host}:{server.http_port}/v2/models/{ROUTER_MODEL}/generate_stream "
            f'-d \'{{"text_input": "hi", "stream": true, "max_tokens": 8, "model": "{model}", "slo_class": "interactive"}}\'\n'
        )
    if front is not None:
        key = (
            ' -H "Authorization: Bearer $QLM_OPENAI_API_KEY"'
            if os.environ.get("QLM_OPENAI_API_KEY")
            else ""
        )
        openai_line = f"  OpenAI   {openai_url}/v1 (qlm-openai; docs/openai.md)\n"
        router_hint = (
            f"  curl -N {openai_url}/v1/chat/completions -H 'x-slo-class: interactive'{key} "
            f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}], "stream": true}}\'\n'
            + router_hint
        )
    print(
        f"\nQLM is ready in {took:.1f} s.\n"
        f"  HTTP     http://{host}:{server.http_port}\n"
        f"  gRPC     {host}:{server.grpc_port}\n"
        f"  metrics  http://{host}:{server.metrics_port}/metrics\n"
        + openai_line
        + f"  models   {', '.join(loads)}\n"
        f"  model repository API: {'open' if not server.admin_key else 'restricted (header ' + repr(ADMIN_HEADER) + '; key in $' + ADMIN_KEY_ENV + ' or --admin-key)'}\n"
        + (
            "  router supervised: reloaded if its stub dies (--no-supervise to turn off)\n"
            if supervisor is not None
            else ""
        )
        + "\n"
        "Try:\n"
        + router_hint
        + f"  curl -N http://{host}:{server.http_port}/v2/models/{eng}/generate_stream "
        '-d \'{"text_input": "hi", "stream": true, "max_tokens": 8}\'\n\n'
        "Ctrl-C stops the server.",
        flush=True,
    )
    try:
        while not stop["sig"]:
            if server.proc is not None and server.proc.poll() is not None:
                print(
                    f"qlm-serve: tritonserver exited with code {server.proc.returncode}",
                    file=sys.stderr,
                )
                return 1
            if front is not None and front.poll() is not None:
                print(f"qlm-serve: qlm-openai exited with code {front.returncode}", file=sys.stderr)
                return 1
            time.sleep(0.2)
    finally:
        # Triton first: the router ends its requests with an explicit error, which qlm-openai
        # passes on to its clients before it stops.
        print("\nqlm-serve: stopping tritonserver ...", flush=True)
        if supervisor is not None:
            supervisor.stop()  # first: the stubs' exits at the stop are no crash
        server.stop()
        stop_openai(front)
        print("qlm-serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
