"""`qlm-bench router`: what the `qlm` router costs, on a real tritonserver with simulated engines.

One run starts a server with one simulated engine per router (identical engines), and sends the
same closed-loop load (C concurrent clients, each streaming requests of N tokens back to back, over
gRPC) directly to an engine model and through a router, in interleaved rounds so that drift (CPU
heat, the OS) hits both alike. Two routers are measured: the default planner tick (tick_s 20 ms) and
a short one (2 ms), to show whether the tick is what a request pays.

Reported: throughput ratio (tokens/s through the router / direct), added latency per request
(end-to-end p50 and p99, router minus direct), added TTFT p50, added time per streamed token (p50 of
each request's mean inter-token gap, router minus direct), and the router's own queue time
(`qlm_queue_s`). The client runs on the same machine as the server, as a router's clients would not:
on a small CPU the client's own cost is in both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlm_backend.client import AsyncGrpcClient, Request, Result
from qlm_backend.stats import percentile
from qlm_backend.triton.repository import add_fleet, engine_model_name
from qlm_backend.triton.server import TritonServer

MODEL = "mistral-7b"
GPU = "A10"


@dataclass
class Phase:
    name: str
    target: str  # Triton model called
    via_router: bool
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0

    def ok(self) -> list[Result]:
        return [r for r in self.results if r.ok]


def ms_pct(xs_s: list[float], q: float) -> float:
    """The q-th percentile (q in [0, 100], qlm_backend.stats) of `xs_s` seconds, in ms; NaN
    without values (what the tables print, and what comparisons propagate)."""
    p = percentile(xs_s, q)
    return math.nan if p is None else p * 1e3


def gap_s(r: Result) -> float | None:
    """A request's mean time between streamed tokens."""
    t = r.token_times_s
    return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


def build(base: Path, time_scale: float, concurrency: int) -> tuple[Path, list[str], dict]:
    repo = base / "repo"
    repo.mkdir(parents=True)
    engine = {"time_scale": time_scale, "max_num_seqs": concurrency}
    loads: list[str] = []
    routers = {"qlm-bench-tick20ms": ("rb-0", 0.02), "qlm-bench-tick2ms": ("rb-1", 0.002)}
    for router, (inst, tick_s) in routers.items():
        loads += add_fleet(
            repo,
            router,
            "qlm",
            [
                {
                    "instance_id": inst,
                    "gpu": GPU,
                    "models_allowed": [MODEL],
                    "initial_model": MODEL,
                    "max_in_flight": concurrency,  # the router must not throttle the engine
                }
            ],
            engine,
            {"time_scale": time_scale, "tick_s": tick_s},
        )
    return repo, loads, routers


async def run_phase(
    url: str,
    ph: Phase,
    concurrency: int,
    tokens: int,
    duration_s: float,
    progress: Any,
    think_s: float = 0.0,
) -> None:
    stop_at = time.monotonic() + duration_s
    async with AsyncGrpcClient(url, timeout_s=120) as client:

        async def worker(k: int) -> None:
            n = 0
            rng = random.Random(k)
            while time.monotonic() < stop_at:
                if think_s > 0:
                    # A random pause: arrivals land anywhere in the engine's step, as open-loop
                    # traffic does (back-to-back requests all land just after a step ends).
                    await asyncio.sleep(rng.uniform(0.0, think_s))
                req = Request(
                    f"bench {k} {n}",
                    model=MODEL if ph.via_router else None,
                    slo_class="interactive" if ph.via_router else None,
                    max_tokens=tokens,
                    ignore_eos=True,
                    router=ph.target,
                )
                ph.results.append(await client.generate(req))
                n += 1
                progress()

        t0 = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        ph.wall_s += time.monotonic() - t0


def summarize(ph: Phase) -> dict[str, Any]:
    ok = ph.ok()
    gaps = [g for g in (gap_s(r) for r in ok) if g is not None]
    queue = [r.queue_s for r in ok if r.queue_s is not None]
    return {
        "target": ph.target,
        "requests": len(ph.results),
        "completed": len(ok),
        "failed": len(ph.results) - len(ok),
        "wall_s": ph.wall_s,
        "tokens_per_s": sum(r.tokens for r in ok) / ph.wall_s if ph.wall_s else 0.0,
        "requests_per_s": len(ok) / ph.wall_s if ph.wall_s else 0.0,
        "e2e_p50_ms": ms_pct([r.total_s for r in ok], 50),
        "e2e_p99_ms": ms_pct([r.total_s for r in ok], 99),
        "ttft_p50_ms": ms_pct([r.ttft_s or 0.0 for r in ok], 50),
        "ttft_p99_ms": ms_pct([r.ttft_s or 0.0 for r in ok], 99),
        "token_gap_p50_ms": ms_pct(gaps, 50),
        "router_queue_p50_ms": ms_pct(queue, 50) if queue else None,
        "router_queue_p99_ms": ms_pct(queue, 99) if queue else None,
    }


def compare(direct: dict[str, Any], routed: dict[str, Any]) -> dict[str, float]:
    return {
        "throughput_ratio": routed["tokens_per_s"] / direct["tokens_per_s"],
        "added_latency_p50_ms": routed["e2e_p50_ms"] - direct["e2e_p50_ms"],
        "added_latency_p99_ms": routed["e2e_p99_ms"] - direct["e2e_p99_ms"],
        "added_ttft_p50_ms": routed["ttft_p50_ms"] - direct["ttft_p50_ms"],
        "added_per_token_ms": routed["token_gap_p50_ms"] - direct["token_gap_p50_ms"],
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlm-bench router", description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=8, help="concurrent streams")
    p.add_argument("--tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--phase-s", type=float, default=6.0, help="seconds per phase and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--time-scale",
        default="1",
        help="engine time_scale, or a comma list run one after another: 1 = a real A10's step "
        "times (~33 ms/token); smaller is faster",
    )
    p.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="each client pauses uniform(0, this) ms before each request (0: back to back)",
    )
    p.add_argument("--out", type=Path, help="write the full numbers as JSON here")
    return p


def run_scale(a: argparse.Namespace, time_scale: float) -> tuple[dict[str, Any], str, bool]:
    """One server, one time scale: the full comparison, its summary line, and whether it failed."""
    base = Path(tempfile.mkdtemp(prefix="qlm-bench-router-"))
    repo, loads, routers = build(base, time_scale, a.concurrency)
    server = TritonServer(repo, load_models=loads, log_path=base / "server.log")
    try:
        server.start(timeout_s=120)
    except Exception as e:  # noqa: BLE001
        return {}, f"time_scale {time_scale:g}: cannot start tritonserver: {e}", True
    # Direct: the very engine behind the 20 ms router (idle while the direct phase runs).
    first_inst = routers["qlm-bench-tick20ms"][0]
    phases = [Phase("direct", engine_model_name(MODEL, first_inst), False)]
    phases += [Phase(name, name, True) for name in routers]
    done = 0
    total_s = (a.phase_s * a.rounds + 1.0) * len(phases)
    t_start = time.monotonic()

    def progress() -> None:
        nonlocal done
        done += 1
        if done % 20 == 0:
            el = time.monotonic() - t_start
            print(
                f"\r  time_scale {time_scale:g}: {done} requests, {el:.0f} of ~{total_s:.0f} s",
                end="",
                file=sys.stderr,
            )

    try:
        for _ in range(2):  # warm-up: first-call costs (channel setup, stub imports) out of it
            for ph in phases:
                tmp = Phase(ph.name, ph.target, ph.via_router)
                asyncio.run(run_phase(server.grpc_url, tmp, a.concurrency, a.tokens, 0.5, progress))
        for _ in range(a.rounds):
            for ph in phases:
                asyncio.run(
                    run_phase(
                        server.grpc_url,
                        ph,
                        a.concurrency,
                        a.tokens,
                        a.phase_s,
                        progress,
                        a.think_ms / 1e3,
                    )
                )
        print(file=sys.stderr)
    finally:
        crashed = server.crash_report()
        if crashed:
            print(f"qlm-bench: {crashed}", file=sys.stderr)
        server.stop()
    summary = {ph.name: summarize(ph) for ph in phases}
    direct = summary["direct"]
    comparisons = {name: compare(direct, summary[name]) for name in routers}
    main_cmp = comparisons["qlm-bench-tick20ms"]
    out = {
        "bench": "router",
        "date": time.strftime("%Y-%m-%d"),
        "config": {
            "concurrency": a.concurrency,
            "tokens": a.tokens,
            "phase_s": a.phase_s,
            "rounds": a.rounds,
            "think_ms": a.think_ms,
            "time_scale": time_scale,
            "engine": f"{MODEL} on simulated {GPU}",
            "routers": {k: {"tick_s": v[1]} for k, v in routers.items()},
        },
        "phases": summary,
        "server_crash": crashed,
        "comparisons": comparisons,
        **main_cmp,  # the default router (tick_s 20 ms) at top level
    }
    for name, s in summary.items():
        q = s["router_queue_p50_ms"]
        print(
            f"  {name:20s} {s['completed']:5d} ok {s['failed']:3d} failed  "
            f"{s['tokens_per_s']:8.1f} tok/s  e2e p50 {s['e2e_p50_ms']:7.1f} ms "
            f"p99 {s['e2e_p99_ms']:7.1f} ms  ttft p50 {s['ttft_p50_ms']:6.1f} ms  "
            f"gap p50 {s['token_gap_p50_ms']:5.2f} ms"
            + (f"  queue p50 {q:5.2f} ms" if q is not None else "")
        )
    fast = comparisons["qlm-bench-tick2ms"]
    failed = sum(s["failed"] for s in summary.values())
    line = (
        f"router bench ({a.concurrency} streams x {a.tokens} tokens, time_scale {time_scale:g}): "
        f"direct {direct['tokens_per_s']:.0f} tok/s; tick 2 ms: added p50 "
        f"{fast['added_latency_p50_ms']:.2f} ms, ratio {fast['throughput_ratio']:.3f}; "
        f"tick 20 ms: added p50 {main_cmp['added_latency_p50_ms']:.2f} ms "
        f"p99 {main_cmp['added_latency_p99_ms']:.2f} ms "
        f"per token {main_cmp['added_per_token_ms']:.3f} ms, "
        f"added ttft p50 {main_cmp['added_ttft_p50_ms']:.2f} ms, "
        f"throughput_ratio {main_cmp['throughput_ratio']:.3f}"
    )
    if crashed:
        line += f"  INVALID RUN: {crashed}"
    return out, line, bool(failed or crashed)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        scales = [float(x) for x in str(a.time_scale).split(",")]
    except ValueError:
        print(
            f"qlm-bench router: --time-scale: not a number list: {a.time_scale!r}", file=sys.stderr
        )
        return 2
    if not scales or any(not x > 0 for x in scales):
        print(f"qlm-bench router: --time-scale: must be > 0, got {a.time_scale!r}", file=sys.stderr)
        return 2
    runs, lines, bad = [], [], False
    for ts in scales:
        out, line, failed = run_scale(a, ts)
        runs.append(out)
        lines.append(line)
        bad |= failed
        print(line)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        doc = runs[0] if len(runs) == 1 else {"bench": "router", "runs": runs}
        a.out.write_text(json.dumps(doc, indent=2) + "\n")
    if len(scales) > 1:  # the ratios side by side, last
        print(
            "router relay: "
            + "; ".join(
                f"time_scale {ts:g} ratio {r['throughput_ratio']:.3f} added ttft p50 "
                f"{r['added_ttft_p50_ms']:.1f} ms"
                for ts, r in zip(scales, runs, strict=True)
                if r
            )
        )
    return 1 if bad else 0
