"""`qlm-bench realtime`: SLO attainment, qlm vs fcfs routing, a scaled trace replayed in real time.

One run starts a tritonserver with two identical fleets of simulated engines, each behind its own
router: `rt-qlm` (policy qlm) and `rt-fcfs` (policy fcfs, the vLLM default order). Every request of
a window of the Azure 2023 conversation trace (or any trace in the evaluation's formats) gets a
model and an SLO class as the evaluation's scenario WA assigns them (interactive / batch-1 /
batch-2, batch work arriving in runs), and is sent to both routers at the same moment, over gRPC
streaming, so both policies see identical arrivals on identical fleets, sharing the CPU.

Arrivals are rescaled so the mean rate is `--load` x the fleet's decode capacity (its engines'
`max_num_seqs` sequences per step, from the same roofline the engines run); `--time-scale` makes
the simulated GPUs (and the SLOs, which are in simulated seconds) run faster than real time.
Attainment of a class: requests whose TTFT (wall / time_scale) met the class SLO, over all sent;
a shed or failed request is a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlm_backend.client import AsyncGrpcClient, Request, Result
from qlm_backend.core.slo import DEFAULT_SLO_CLASSES
from qlm_backend.engine.perf import PerfModel
from qlm_backend.eval.scenario import WorkloadRequest, build_workload, parse_scenario
from qlm_backend.eval.traces import DEFAULT_TRACE, load_trace, window
from qlm_backend.stats import percentile
from qlm_backend.triton.repository import add_fleet
from qlm_backend.triton.server import TritonServer

MODEL = "mistral-7b"
GPU = "A10"
POLICIES = ("qlm", "fcfs")
SLO_S = {c.name: c.ttft_slo_s for c in DEFAULT_SLO_CLASSES}
# Scenario WA's class mix and runs (qlm_backend/eval/scenarios/wa.json), on this bench's fleet.
CLASS_SHARES = {"interactive": 0.4, "batch-1": 0.3, "batch-2": 0.3}
CLASS_RUN_MEAN = 8


@dataclass
class Sent:
    w: WorkloadRequest
    policy: str
    result: Result | None = None


@dataclass
class Run:
    sent: list[Sent] = field(default_factory=list)

    def of(self, policy: str) -> list[Sent]:
        return [s for s in self.sent if s.policy == policy]


def workload(
    trace_path: Path, n: int, max_tokens: int, seed: int, instances: int, max_num_seqs: int
) -> tuple[list[WorkloadRequest], float]:
    """The trace window with model/class assigned; returns it and the fleet's capacity (req/s)."""
    sc = parse_scenario(
        {
            "name": "realtime",
            "fleet": {
                "instances": [
                    {
                        "instance_id": "any",
                        "gpu": GPU,
                        "models_allowed": [MODEL],
                        "initial_model": MODEL,
                    }
                ]
            },
            "models": {MODEL: 1.0},
            "classes": CLASS_SHARES,
            "class_run_mean": CLASS_RUN_MEAN,
            "max_tokens": max_tokens,
        },
        "realtime",
    )
    ws = build_workload(sc, window(load_trace(trace_path), max_requests=n, duration_s=None), seed)
    perf = PerfModel.from_names(MODEL, GPU, 1)
    mean_out = sum(w.output_tokens for w in ws) / len(ws)
    mean_ctx = sum(w.prompt_tokens + w.output_tokens / 2 for w in ws) / len(ws)
    step_s = perf.decode_step_s(max_num_seqs, int(max_num_seqs * mean_ctx))
    # A busy engine finishes max_num_seqs sequences every mean_out steps (prefill ignored: a bound).
    capacity_rps = instances * max_num_seqs / (mean_out * step_s)
    return ws, capacity_rps


def scale(ws: list[WorkloadRequest], rate_rps: float) -> list[WorkloadRequest]:
    from dataclasses import replace

    span = ws[-1].arrival_s - ws[0].arrival_s
    factor = (len(ws) - 1) / rate_rps / span if span > 0 else 1.0
    t0 = ws[0].arrival_s
    return [replace(w, arrival_s=(w.arrival_s - t0) * factor) for w in ws]


def build(
    base: Path, time_scale: float, instances: int, max_num_seqs: int
) -> tuple[Path, list[str]]:
    repo = base / "repo"
    repo.mkdir(parents=True)
    loads: list[str] = []
    for policy in POLICIES:
        loads += add_fleet(
            repo,
            f"rt-{policy}",
            policy,
            [
                {
                    "instance_id": f"rt{policy[0]}-{k}",
                    "gpu": GPU,
                    "models_allowed": [MODEL],
                    "initial_model": MODEL,
                    "max_in_flight": max_num_seqs,
                }
                for k in range(instances)
            ],
            {"time_scale": time_scale, "max_num_seqs": max_num_seqs},
            {"time_scale": time_scale},
        )
    return repo, loads


async def replay(url: str, ws: list[WorkloadRequest], a: argparse.Namespace, run: Run) -> None:
    async with AsyncGrpcClient(url, timeout_s=a.max_wall_s) as client:
        tasks: list[asyncio.Task[Any]] = []
        t0 = time.monotonic()
        last_print = 0.0

        async def one(s: Sent) -> None:
            s.result = await client.generate(
                Request(
                    "x" * max(1, 4 * s.w.prompt_tokens - 1),  # engines count 4 bytes per token
                    model=s.w.model,
                    slo_class=s.w.slo_class,
                    max_tokens=s.w.output_tokens,
                    ignore_eos=True,
                    router=f"rt-{s.policy}",
                )
            )

        def status(final: bool = False) -> None:
            parts = []
            for p in POLICIES:
                mine = run.of(p)
                done = sum(1 for s in mine if s.result is not None)
                parts.append(f"{p} {done}/{len(mine)} done")
            el = time.monotonic() - t0
            end = "\n" if final else ""
            print(f"\r  {el:5.0f} s  sent {len(run.sent) // 2}/{len(ws)}  " + ", ".join(parts),
                  end=end, file=sys.stderr, flush=True)  # fmt: skip

        for w in ws:
            delay = t0 + w.arrival_s * a.time_scale - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for p in POLICIES:
                s = Sent(w, p)
                run.sent.append(s)
                tasks.append(asyncio.create_task(one(s)))
            if time.monotonic() - last_print > 2:
                last_print = time.monotonic()
                status()
        while any(not t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=2.0)
            status()
            if time.monotonic() - t0 > a.max_wall_s:
                break  # bounded run: what is still open counts as a miss (and is reported)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        status(final=True)


def summarize(run: Run, time_scale: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in POLICIES:
        per: dict[str, Any] = {}
        classes = sorted({s.w.slo_class for s in run.of(p)})
        for c in [*classes, "all"]:
            mine = [s for s in run.of(p) if c == "all" or s.w.slo_class == c]
            ttfts, met, completed, errors, unfinished = [], 0, 0, 0, 0
            for s in mine:
                r = s.result
                if (
                    r is None
                    or r.outcome == "lost"
                    or (r.outcome == "error" and r.status == "CANCELLED")
                ):
                    unfinished += 1
                    continue
                if not r.ok:
                    errors += 1
                    continue
                completed += 1
                ttft = (r.ttft_s if r.ttft_s is not None else r.total_s) / time_scale
                ttfts.append(ttft)
                met += ttft <= SLO_S[s.w.slo_class]
            ttfts.sort()
            per[c] = {
                "sent": len(mine),
                "completed": completed,
                "errors": errors,
                "unfinished": unfinished,
                "attained": met,
                "attainment": met / len(mine) if mine else None,
                "ttft_p50_s": percentile(ttfts, 50),
                "ttft_p99_s": percentile(ttfts, 99),
                "ttfts_s": ttfts,
            }
        out[p] = per
    return out


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [c for c in summary["qlm"] if c != "all"] + ["all"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for k, p in enumerate(POLICIES):
        vals = [summary[p][c]["attainment"] or 0.0 for c in classes]
        ax1.bar([i + (k - 0.5) * width for i in range(len(classes))], vals, width, label=p)
    ax1.set_xticks(range(len(classes)), classes)
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("SLO attainment (TTFT <= SLO)")
    ax1.legend()
    ax1.set_title(title, fontsize=9)
    for p in POLICIES:
        xs = summary[p].get("interactive", {}).get("ttfts_s", [])
        if xs:
            ax2.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{p} interactive")
    ax2.axvline(SLO_S["interactive"], color="grey", linestyle="--", label="interactive SLO")
    ax2.set_xscale("log")
    ax2.set_xlabel("TTFT (simulated s)")
    ax2.set_ylabel("CDF")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlm-bench realtime", description=__doc__.split("\n")[0])
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--requests", type=int, default=240, help="trace window (first N requests)")
    p.add_argument("--load", type=float, default=1.5, help="arrival rate / fleet capacity")
    p.add_argument("--time-scale", type=float, default=0.25, help="wall s per simulated s")
    p.add_argument("--instances", type=int, default=1, help="instances per fleet")
    p.add_argument("--max-num-seqs", type=int, default=4, help="engine batch (and router pull)")
    p.add_argument("--max-tokens", type=int, default=128, help="output length cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-wall-s", type=float, default=240.0, help="hard bound on the replay")
    p.add_argument("--out", type=Path, help="JSON with the full numbers (PNG next to it)")
    p.add_argument("--png", type=Path, help="plot path (default: --out with .png, or ./)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    ws, cap_rps = workload(a.trace, a.requests, a.max_tokens, a.seed, a.instances, a.max_num_seqs)
    ws = scale(ws, a.load * cap_rps)
    span_wall = ws[-1].arrival_s * a.time_scale
    counts = {c: sum(1 for w in ws if w.slo_class == c) for c in CLASS_SHARES}
    print(
        f"realtime bench: {len(ws)} requests of {a.trace.name} ({counts}), arrivals over "
        f"{ws[-1].arrival_s:.0f} simulated s = {span_wall:.0f} s wall at load {a.load:g} x "
        f"capacity {cap_rps:.2f} req/s; fleets: {a.instances} x {GPU} {MODEL} per policy",
        file=sys.stderr,
    )
    base = Path(tempfile.mkdtemp(prefix="qlm-bench-realtime-"))
    repo, loads = build(base, a.time_scale, a.instances, a.max_num_seqs)
    server = TritonServer(repo, load_models=loads, log_path=base / "server.log")
    try:
        server.start(timeout_s=120)
    except Exception as e:  # noqa: BLE001
        print(f"qlm-bench realtime: cannot start tritonserver: {e}", file=sys.stderr)
        return 2
    run = Run()
    t0 = time.monotonic()
    try:
        asyncio.run(replay(server.grpc_url, ws, a, run))
    finally:
        crashed = server.crash_report()
        if crashed:
            print(f"qlm-bench: {crashed}", file=sys.stderr)
        server.stop()
    wall_s = time.monotonic() - t0
    summary = summarize(run, a.time_scale)
    att = {p: {c: v["attainment"] for c, v in summary[p].items()} for p in POLICIES}
    fi = att["fcfs"].get("interactive")
    qi = att["qlm"].get("interactive")
    ratio = (qi / fi) if (qi is not None and fi) else None
    out = {
        "bench": "realtime",
        "date": time.strftime("%Y-%m-%d"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "capacity_rps": cap_rps,
        "wall_s": wall_s,
        "server_crash": crashed,
        "slo_s": SLO_S,
        "attainment": att,
        "attainment_ratio_interactive": ratio,
        "per_class": {
            p: {c: {k: v for k, v in d.items() if k != "ttfts_s"} for c, d in summary[p].items()}
            for p in POLICIES
        },
    }
    png = a.png or (a.out.with_suffix(".png") if a.out else Path("realtime.png"))
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(summary, png, f"{len(ws)} req, load {a.load:g}, time_scale {a.time_scale:g}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2) + "\n")
    for p in POLICIES:
        for c, d in summary[p].items():
            p50 = d["ttft_p50_s"]
            print(
                f"  {p:5s} {c:12s} sent {d['sent']:4d} done {d['completed']:4d} "
                f"errors {d['errors']:3d} unfinished {d['unfinished']:3d} "
                f"attainment {d['attainment']:.3f} ttft p50 "
                + (f"{p50:7.1f} s" if p50 is not None else "      - ")
            )
    parts = [
        f"{c} qlm {att['qlm'][c]:.2f} fcfs {att['fcfs'][c]:.2f}"
        for c in att["qlm"]
        if att["qlm"][c] is not None and att["fcfs"].get(c) is not None
    ]
    print(f"plot: {png}" + (f", json: {a.out}" if a.out else ""), file=sys.stderr)
    print(
        f"realtime bench ({len(ws)} requests, load {a.load:g}, time_scale {a.time_scale:g}, "
        f"{wall_s:.0f} s): "
        + "; ".join(parts)
        + f"; attainment_ratio_interactive {'inf' if ratio is None else f'{ratio:.2f}'}"
    )
    problems: dict[str, int] = {}
    for snt in run.sent:
        r = snt.result
        if r is None or not r.ok:
            key = (
                "not answered" if r is None else f"{r.outcome} {r.status}: {(r.error or '')[:120]}"
            )
            problems[key] = problems.get(key, 0) + 1
    for key, n in sorted(problems.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {n:4d} x {key}", file=sys.stderr)
    out["problems"] = problems
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")
    lost = sum(d["all"]["unfinished"] for d in summary.values())
    if crashed:
        print(f"INVALID RUN: {crashed}")
    return 1 if lost or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
