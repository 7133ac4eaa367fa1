"""`qlm-bench soak --minutes N` (`make soak`: 30 minutes): a long trace-shaped Locust load through qlm.

A tritonserver of its own serves one fleet behind a `qlm` router (simulated engines, `--time-scale`).
The Locust trace replay (loadtest/locustfile_trace.py: the Azure conversation trace, classes as in
scenario WA) runs headless in its own process group for the configured time: the trace window and
its speed-up are chosen so that the arrivals span `--minutes` at `--load` x the fleet's capacity.
A thin locustfile written next to the report imports that replay and records every request event,
so TTFT can be cut into time windows. Meanwhile the bench samples, every `--sample-s`, the RSS of
the server and of each of its processes (stubs by model) and the router's queue length.

Reports requests served, errors, lost (must be 0), p99 TTFT per class per time window, RSS of the
server and of each stub at start, after warm-up and at the end (growth after warm-up; goal < 5%),
a PNG of RSS, queue length and p99 TTFT over time, and JSON. Exit code 1 when a request was lost,
Locust failed or the server died.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from qlm_backend.engine.perf import PerfModel
from qlm_backend.eval.scenario import build_workload, parse_scenario
from qlm_backend.eval.traces import DEFAULT_TRACE, load_trace, window
from qlm_backend.loadtest_runner import LOADTEST_DIR, ROOT, run_locust
from qlm_backend.stats import percentile
from qlm_backend.triton.repository import add_fleet, uniform_instances
from qlm_backend.triton.server import TritonServer, rss_bytes

ROUTER = "qlm"
CLASSES = ("interactive", "batch-1", "batch-2")
# The same class mix and runs as loadtest/locustfile_trace.py (its build_schedule), so the sizing
# below sees the workload Locust will send.
CLASS_SHARES = {"interactive": 0.4, "batch-1": 0.3, "batch-2": 0.3}

RECORDER = '''\
"""Written by qlm-bench soak: the Locust trace replay, plus a record of every request event."""

import json
import sys
import time

sys.path[:0] = [{loadtest!r}, {root!r}]

from locust import events  # noqa: E402
from locustfile_trace import *  # noqa: E402, F403 - TraceUser, TraceShape, STATS

_out = open({events!r}, "a", buffering=1)


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception=None, **kw):
    _out.write(json.dumps([time.time(), name, response_time, exception is None]) + "\\n")
'''


def schedule(a: argparse.Namespace, n: int) -> list[Any]:
    """The workload locustfile_trace.py builds for the first `n` trace requests (same arguments)."""
    sc = parse_scenario(
        {
            "name": "loadtest",
            "fleet": {
                "instances": [
                    {
                        "instance_id": "any",
                        "gpu": "A100-80G",
                        "models_allowed": [a.model],
                        "initial_model": a.model,
                    }
                ]
            },
            "models": {a.model: 1.0},
            "classes": CLASS_SHARES,
            "class_run_mean": 4,
            "max_tokens": a.max_tokens,
        },
        "loadtest",
    )
    return build_workload(sc, window(load_trace(a.trace), max_requests=n, duration_s=None), 0)


def size(a: argparse.Namespace) -> tuple[int, float, float]:
    """(trace requests, speed-up, capacity req/s wall) for arrivals spanning the run at `--load`."""
    probe = schedule(a, 2000)
    mean_out = sum(w.output_tokens for w in probe) / len(probe)
    mean_ctx = sum(w.prompt_tokens + w.output_tokens / 2 for w in probe) / len(probe)
    perf = PerfModel.from_names(a.model, a.gpu, None)
    step_s = perf.decode_step_s(a.max_num_seqs, int(a.max_num_seqs * mean_ctx))
    cap = a.instances * a.max_num_seqs / (mean_out * step_s) / a.time_scale
    duration = a.minutes * 60
    n = max(10, math.ceil(a.load * cap * duration))
    ws = schedule(a, n)
    span = ws[-1].arrival_s - ws[0].arrival_s
    return len(ws), (span / duration if span > 0 else 1.0), cap


def build(base: Path, a: argparse.Namespace) -> tuple[Path, list[str]]:
    repo = base / "repo"
    repo.mkdir(parents=True)
    loads = add_fleet(
        repo,
        ROUTER,
        "qlm",
        uniform_instances("soak", a.gpu, a.model, a.instances, a.max_num_seqs),
        {"time_scale": a.time_scale, "max_num_seqs": a.max_num_seqs},
        {"time_scale": a.time_scale},
    )
    return repo, loads


def proc_label(pid: int, server_pid: int | None) -> str:
    if pid == server_pid:
        return "tritonserver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid}"
    for part in cmd:
        text = part.decode(errors="replace")
        if text.endswith("/model.py") or "/1/" in text:
            # The stub's first argument is its model's path: <repo>/<model>/1/model.py
            return "stub " + Path(text).parent.parent.name
    return Path(cmd[0].decode(errors="replace")).name + f" {pid}"


class Sampler(threading.Thread):
    """RSS per process and the router's queue length, every `interval_s`."""

    def __init__(self, server: TritonServer, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.server, self.interval_s = server, interval_s
        self.rows: list[dict[str, Any]] = []
        self.stop_event = threading.Event()
        self.t0 = time.time()

    def sample(self) -> dict[str, Any]:
        per: dict[str, int] = {}
        anon = 0
        for pid in self.server.descendants():
            label = proc_label(pid, self.server.pid)
            per[label] = per.get(label, 0) + rss_bytes([pid])
            anon += rss_bytes([pid], "RssAnon")
        queued = running = None
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(self.server.metrics_url, timeout=5) as r:
                text = r.read().decode()
            queued = running = 0.0
            for line in text.splitlines():
                if line.startswith("qlm_queue_length{") and f'router="{ROUTER}"' in line:
                    queued += float(line.rpartition(" ")[2])
                elif line.startswith("vllm:num_requests_running{"):
                    running += float(line.rpartition(" ")[2])
        row = {
            "t_s": time.time() - self.t0,
            "rss": per,
            "rss_total": sum(per.values()),
            # Private memory: VmRSS also counts the Python backend's shared-memory pool once per
            # process mapping it, which grows as traffic touches more of it (bounded by its size).
            "rss_anon_total": anon,
            "queued": queued,
            "running": running,
        }
        self.rows.append(row)
        return row

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self.sample()


def ttft_windows(events_path: Path, t0: float, window_s: float, time_scale: float) -> list[dict]:
    """p99 (and p50, count) TTFT per class per time window, in simulated seconds."""
    buckets: dict[tuple[int, str], list[float]] = {}
    if events_path.exists():
        for line in events_path.read_text().splitlines():
            try:
                t, name, ms, ok = json.loads(line)
            except ValueError:
                continue
            cls, _, kind = str(name).rpartition(" ")
            if kind != "ttft" or not ok:
                continue
            k = int((t - t0) // window_s)
            buckets.setdefault((k, cls), []).append(ms / 1e3 / time_scale)
    out = []
    for k in sorted({k for k, _ in buckets}):
        row: dict[str, Any] = {"t_start_s": k * window_s, "t_end_s": (k + 1) * window_s}
        for cls in CLASSES:
            xs = buckets.get((k, cls), [])
            row[cls] = {
                "n": len(xs),
                "p50_s": percentile(xs, 50),
                "p99_s": percentile(xs, 99),
            }
        out.append(row)
    return out


def rss_summary(rows: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    if not rows:
        return {}
    start = rows[0]
    warm = next((r for r in rows if r["t_s"] >= warmup_s), rows[-1])
    end = rows[-1]
    names = sorted(set(start["rss"]) | set(end["rss"]))

    def growth(x: float | None, y: float | None) -> float | None:
        return (y / x - 1) if x and y is not None else None

    per = {
        n: {
            "start_bytes": start["rss"].get(n),
            "warm_bytes": warm["rss"].get(n),
            "end_bytes": end["rss"].get(n),
            "growth_after_warmup": growth(warm["rss"].get(n), end["rss"].get(n)),
        }
        for n in names
    }
    return {
        "warmup_s": warmup_s,
        "warm_sample_t_s": warm["t_s"],
        "total": {
            "start_bytes": start["rss_total"],
            "warm_bytes": warm["rss_total"],
            "end_bytes": end["rss_total"],
            "growth_after_warmup": growth(warm["rss_total"], end["rss_total"]),
        },
        "private": {
            "start_bytes": start.get("rss_anon_total"),
            "warm_bytes": warm.get("rss_anon_total"),
            "end_bytes": end.get("rss_anon_total"),
            "growth_after_warmup": growth(warm.get("rss_anon_total"), end.get("rss_anon_total")),
        },
        "per_process": per,
    }


def plot(rows: list[dict[str, Any]], windows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    ts = [r["t_s"] / 60 for r in rows]
    names = sorted({n for r in rows for n in r["rss"]})
    for n in names:
        ax1.plot(ts, [r["rss"].get(n, 0) / 2**20 for r in rows], label=n)
    ax1.plot(ts, [r["rss_total"] / 2**20 for r in rows], "k--", label="total")
    ax1.set_ylabel("RSS (MiB)")
    ax1.set_title(title, fontsize=9)
    ax1.legend(fontsize=7, ncol=2)
    ax2.plot(ts, [r["queued"] or 0 for r in rows], label="queued in the router")
    ax2.plot(ts, [r["running"] or 0 for r in rows], label="running in engines")
    ax2.set_ylabel("requests")
    ax2.legend(fontsize=8)
    for cls in CLASSES:
        xs = [(w["t_start_s"] + w["t_end_s"]) / 120 for w in windows if w[cls]["p99_s"] is not None]
        ys = [w[cls]["p99_s"] for w in windows if w[cls]["p99_s"] is not None]
        ax3.plot(xs, ys, marker="o", label=f"{cls} p99")
    ax3.set_yscale("log")
    ax3.set_ylabel("TTFT p99 (simulated s)")
    ax3.set_xlabel("minutes")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlm-bench soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="length of the load, wall minutes")
    p.add_argument("--load", type=float, default=0.6, help="arrival rate / fleet capacity")
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--time-scale", type=float, default=0.5, help="wall s per simulated s")
    p.add_argument("--model", default="mistral-7b")
    p.add_argument("--gpu", default="A10")
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128, help="output length cap")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS / queue sampling interval")
    p.add_argument("--warmup-s", type=float, help="RSS baseline time (default: 10%% of the run)")
    p.add_argument("--window-s", type=float, help="TTFT window (default: the run / 10)")
    p.add_argument("--out", type=Path, default=Path("results/soak.json"), help="JSON report")
    p.add_argument("--png", type=Path, help="plot (default: --out with .png)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    n, speedup, cap = size(a)
    duration = a.minutes * 60
    warmup_s = a.warmup_s if a.warmup_s is not None else max(5.0, 0.1 * duration)
    window_s = a.window_s if a.window_s is not None else max(10.0, duration / 10)
    print(
        f"soak: {n} requests of {a.trace.name} over ~{a.minutes:g} min (speed-up {speedup:.2f}) = "
        f"{a.load:g} x capacity {cap:.2f} req/s; fleet: {a.instances} x {a.gpu} {a.model}, "
        f"time_scale {a.time_scale:g}",
        file=sys.stderr,
    )
    base = Path(tempfile.mkdtemp(prefix="qlm-bench-soak-"))
    repo, loads = build(base, a)
    report_dir = a.out.parent / (a.out.stem + "-locust")
    report_dir.mkdir(parents=True, exist_ok=True)
    events_path = report_dir / "events.jsonl"
    events_path.unlink(missing_ok=True)
    recorder = report_dir / "locustfile_soak.py"
    recorder.write_text(
        RECORDER.format(loadtest=str(LOADTEST_DIR), root=str(ROOT), events=str(events_path))
    )
    server = TritonServer(repo, load_models=loads, log_path=base / "server.log")
    try:
        server.start(timeout_s=120)
    except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"qlm-bench soak: cannot start tritonserver: {e}", file=sys.stderr)
        return 2
    sampler = Sampler(server, a.sample_s)
    crashed = None
    t0 = time.time()
    try:
        sampler.sample()
        sampler.start()
        cmd = [
            sys.executable, "-m", "locust", "-f", str(recorder),
            "--headless", "--only-summary",
            "--host", f"http://{server.http_url}", "--grpc-host", server.grpc_url,
            "--stop-timeout", "120",
            "--qlm-router", ROUTER, "--qlm-model", a.model,
            "--qlm-max-tokens", str(a.max_tokens), "--qlm-time-scale", f"{a.time_scale:g}",
            "--qlm-report-dir", str(report_dir),
            "--qlm-trace", str(a.trace), "--qlm-trace-speedup", f"{speedup:g}",
            "--qlm-trace-max-requests", str(n), "--qlm-trace-protocol", "grpc",
        ]  # fmt: skip
        # A trace that cannot keep up still ends: bounded at twice its length plus the drain.
        rc = run_locust(cmd, wall_limit_s=2 * duration + 240)
        sampler.stop_event.set()
        sampler.join(timeout=30)
        time.sleep(1.0)
        sampler.sample()
        crashed = server.crash_report()
    finally:
        sampler.stop_event.set()
        server.stop()
    wall_s = time.time() - t0
    try:
        locust_rep = json.loads((report_dir / "attainment.json").read_text())
    except (OSError, ValueError) as e:
        locust_rep = {"error": f"no Locust report: {e}"}
    totals = locust_rep.get("totals", {})
    windows = ttft_windows(events_path, t0, window_s, a.time_scale)
    rss = rss_summary(sampler.rows, warmup_s)
    out = {
        "bench": "soak",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "trace_requests": n,
        "trace_speedup": speedup,
        "capacity_rps": cap,
        "wall_s": wall_s,
        "locust_exit_code": rc,
        "server_crash": crashed,
        "served": totals.get("completed"),
        "errors": totals.get("errors"),
        "lost": totals.get("lost"),
        "abandoned": totals.get("abandoned"),
        "sent": totals.get("sent"),
        "classes": locust_rep.get("classes"),
        "ttft_windows": windows,
        "rss": rss,
        "samples": sampler.rows,
        "server_log": str(server.log_path),
    }
    png = a.png or a.out.with_suffix(".png")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(sampler.rows, windows, png, f"soak {a.minutes:g} min, {n} requests, load {a.load:g}")
    for w in windows:
        cells = []
        for cls in CLASSES:
            p99 = w[cls]["p99_s"]
            cells.append(f"{cls} n {w[cls]['n']:4d} p99 " + ("-" if p99 is None else f"{p99:.1f}"))
        print(f"  {w['t_start_s'] / 60:5.1f}-{w['t_end_s'] / 60:5.1f} min: " + "; ".join(cells))
    for name, d in rss.get("per_process", {}).items():
        g = d["growth_after_warmup"]
        print(
            f"  rss {name:32s} start {(d['start_bytes'] or 0) / 2**20:7.1f} MiB, warm "
            f"{(d['warm_bytes'] or 0) / 2**20:7.1f}, end {(d['end_bytes'] or 0) / 2**20:7.1f}"
            + ("" if g is None else f" ({g * 100:+.1f}% after warm-up)")
        )
    tot = rss.get("total", {})
    g = tot.get("growth_after_warmup")
    priv = rss.get("private", {})
    gp = priv.get("growth_after_warmup")
    print(f"report: {a.out}, plot: {png}, locust: {report_dir}", file=sys.stderr)
    print(
        f"soak ({a.minutes:g} min, {wall_s:.0f} s wall): sent {totals.get('sent')}, served "
        f"{totals.get('completed')}, errors {totals.get('errors')}, lost {totals.get('lost')}, "
        f"abandoned {totals.get('abandoned')}; rss total {(tot.get('warm_bytes') or 0) / 2**20:.0f}"
        f" -> {(tot.get('end_bytes') or 0) / 2**20:.0f} MiB after warm-up"
        + ("" if g is None else f" ({g * 100:+.1f}%)")
        + f", private {(priv.get('warm_bytes') or 0) / 2**20:.0f}"
        f" -> {(priv.get('end_bytes') or 0) / 2**20:.0f} MiB"
        + ("" if gp is None else f" ({gp * 100:+.1f}%)")
    )
    if crashed:
        print(f"INVALID RUN: {crashed}")
    bad = rc != 0 or crashed or totals.get("lost") != 0 or "error" in locust_rep
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
