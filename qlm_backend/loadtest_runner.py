"""`make loadtest`: run the Locust load test headless for a bounded time, against a server or its own.

    python -m qlm_backend.loadtest_runner [--grpc-url H:P --http-url H:P] [--run-time-s 30]
        [--users 12] [--protocol grpc|http|both] [--router qlm] [--model mistral-7b]
        [--trace FILE --trace-speedup X] [--report-dir DIR]

Reports in --report-dir: ours (per-class attainment, TTFT) and Locust's own (locust_stats.csv and
the other --csv files, locust.html).

Without URLs it uses the server `make serve` started on the default ports (127.0.0.1:8000 / 8001)
when that one is ready, else (or with --own-server) starts a tritonserver with the shipped
repository on free loopback ports and stops it (its whole process group) at the end. Exit code: Locust's, which is 1 when a request was lost
(neither completed nor answered with an explicit error), 2 for a setup failure.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOADTEST_DIR = Path(__file__).resolve().parent / "loadtest"  # the locustfiles ship in the package
CLASSES = ("Interactive", "Batch1", "Batch2")
DEFAULT_HTTP, DEFAULT_GRPC = "127.0.0.1:8000", "127.0.0.1:8001"  # qlm-serve's defaults


def _ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlm-loadtest", description=__doc__.split("\n")[0])
    p.add_argument("--grpc-url", help="Triton gRPC address (host:port) of a running server")
    p.add_argument("--http-url", help="Triton HTTP address (host:port) of a running server")
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository",
                   help="model repository for the server started when no URL is given")  # fmt: skip
    p.add_argument("--own-server", action="store_true",
                   help="start a server even when one is ready on the default ports")  # fmt: skip
    p.add_argument("--run-time-s", type=float, default=30.0)
    p.add_argument("--users", type=int, default=12)
    p.add_argument("--spawn-rate", type=float, default=6.0)
    p.add_argument("--stop-timeout-s", type=float, default=120.0,
                   help="how long users may finish their request once the time is up")  # fmt: skip
    p.add_argument("--protocol", choices=("grpc", "http", "both"), default="both")
    p.add_argument("--router", default="qlm")
    p.add_argument("--model", default="mistral-7b")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="the fleet's time_scale (the shipped fleet runs in real time: 1)")  # fmt: skip
    p.add_argument("--trace", help="replay this trace (locustfile_trace.py) instead of users")
    p.add_argument("--trace-speedup", type=float, default=1.0)
    p.add_argument("--trace-max-requests", type=int, default=200)
    p.add_argument("--report-dir", type=Path, default=Path("loadtest-report"))
    p.add_argument("--locust-args", default="", help="extra Locust arguments, one string")
    return p


def locust_command(a: argparse.Namespace, grpc_url: str, http_url: str) -> list[str]:
    trace = bool(a.trace)
    cmd = [
        sys.executable, "-m", "locust",
        "-f", str(LOADTEST_DIR / ("locustfile_trace.py" if trace else "locustfile.py")),
        "--headless", "--only-summary",
        "--host", f"http://{http_url}", "--grpc-host", grpc_url,
        "--stop-timeout", f"{a.stop_timeout_s:g}",
        "--qlm-router", a.router, "--qlm-model", a.model,
        "--qlm-max-tokens", str(a.max_tokens), "--qlm-time-scale", f"{a.time_scale:g}",
        "--qlm-report-dir", str(a.report_dir),
        # Locust's own reports beside ours: its CSV stats and its HTML page.
        "--csv", str(a.report_dir / "locust"), "--html", str(a.report_dir / "locust.html"),
    ]  # fmt: skip
    if trace:
        cmd += ["--qlm-trace", str(a.trace), "--qlm-trace-speedup", f"{a.trace_speedup:g}"]
        cmd += ["--qlm-trace-max-requests", str(a.trace_max_requests)]
        cmd += ["--qlm-trace-protocol", "http" if a.protocol == "http" else "grpc"]
    else:
        cmd += ["-u", str(a.users), "-r", f"{a.spawn_rate:g}", "-t", f"{a.run_time_s:g}s"]
        protos = ("Grpc", "Http") if a.protocol == "both" else (a.protocol.capitalize(),)
        cmd += [f"{p}{c}User" for p in protos for c in CLASSES]
    return cmd + a.locust_args.split()


def run_locust(cmd: list[str], wall_limit_s: float) -> int:
    # Own process group: a Locust that hangs is stopped with everything it started, and only it.
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=wall_limit_s)
    except subprocess.TimeoutExpired:
        print(f"qlm-loadtest: Locust still running after {wall_limit_s:.0f} s; stopping it")
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 1
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if bool(a.grpc_url) != bool(a.http_url) and a.protocol == "both":
        print("qlm-loadtest: give both --grpc-url and --http-url, or neither", file=sys.stderr)
        return 2
    a.report_dir.mkdir(parents=True, exist_ok=True)
    run_s = 3600.0 if a.trace else a.run_time_s
    wall_limit_s = run_s + a.stop_timeout_s + 60.0
    if not (a.grpc_url or a.http_url or a.own_server) and _ready(DEFAULT_HTTP):
        print(f"qlm-loadtest: using the server at {DEFAULT_HTTP} / {DEFAULT_GRPC}", flush=True)
        a.grpc_url, a.http_url = DEFAULT_GRPC, DEFAULT_HTTP
    if a.grpc_url or a.http_url:
        cmd = locust_command(a, a.grpc_url or "127.0.0.1:8001", a.http_url or "127.0.0.1:8000")
        return run_locust(cmd, wall_limit_s)

    from qlm_backend.triton.launcher import models_to_load
    from qlm_backend.triton.server import TritonServer

    log = Path(tempfile.mkdtemp(prefix="qlm-loadtest-")) / "server.log"
    try:
        server = TritonServer(a.repository, load_models=models_to_load(a.repository, None),
                              log_path=log)  # fmt: skip
        startup_s = server.start(timeout_s=120)
    except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"qlm-loadtest: cannot start tritonserver: {e}", file=sys.stderr)
        return 2
    try:
        print(
            f"qlm-loadtest: tritonserver ready in {startup_s:.1f} s: grpc {server.grpc_url}, "
            f"http {server.http_url} (log {log})",
            flush=True,
        )
        return run_locust(locust_command(a, server.grpc_url, server.http_url), wall_limit_s)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
