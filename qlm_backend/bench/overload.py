"""`qlm-bench overload`: a burst at 10x the fleet's capacity, qlm vs fcfs: completed / shed / lost.

One tritonserver runs two fleets of the same shape, each behind its own router: `ov-qlm` (policy
qlm) and `ov-fcfs` (policy fcfs). Poisson arrivals at `--load` x the fleet's decode capacity, for
`--duration-s` wall seconds, each request drawn into a class (`--shares`), are sent to both routers
at the same moment over gRPC streaming. After the burst the bench waits up to `--drain-s` for
answers, then cancels what is still open ("cut": queued work the bench stopped waiting for; the
router answers it with CANCELLED and forgets it, which the metrics scraped afterwards confirm).

Per policy and class: sent, completed, shed (an explicit UNAVAILABLE "request shed: <reason>"),
other errors, cut, lost (neither a final response nor an explicit error), interactive attainment
(TTFT within the class SLO, over all sent), how fast shed requests were refused, and the server's
memory (RSS of its whole process group: tritonserver, the routers' and engines' stubs) before and
after. Afterwards the routers' own counters (qlm_requests_total) and queue gauges are read back,
so a request the router still holds after the run shows up there.

The class mix: interactive must fit the fleet on its own for any policy to attain it, so the
10x excess is batch work (default 6% interactive = 0.6x capacity, the rest batch-1 / batch-2).
Both batch classes are sheddable here (`--sheddable`; a per-class setting of the fleet config):
an operator facing a 10x burst lets QLM refuse batch work it cannot serve in time, and the goal is
that it does so at admission while the interactive class keeps its SLO.
Exit code 1 when a request was lost or the server died.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlm_backend.client import AsyncGrpcClient, Request, Result
from qlm_backend.core.slo import DEFAULT_SLO_CLASSES
from qlm_backend.engine.perf import PerfModel
from qlm_backend.stats import percentile
from qlm_backend.triton.repository import add_fleet, uniform_instances
from qlm_backend.triton.server import TritonServer, rss_bytes

POLICIES = ("qlm", "fcfs")
CLASS_ORDER = ("interactive", "batch-1", "batch-2")


@dataclass
class Sent:
    idx: int
    policy: str
    slo_class: str
    at_s: float
    result: Result | None = None
    cut: bool = False


@dataclass
class Run:
    sent: list[Sent] = field(default_factory=list)


def parse_kv(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        k, _, v = item.partition("=")
        out[k.strip()] = float(v)
    return out


def capacity_rps(a: argparse.Namespace) -> float:
    """Requests per wall second the fleet finishes when busy (decode-bound; prefill ignored)."""
    perf = PerfModel.from_names(a.model, a.gpu, None)
    ctx = a.max_num_seqs * (a.prompt_tokens + a.max_tokens // 2)
    step_s = perf.decode_step_s(a.max_num_seqs, ctx)
    return a.instances * a.max_num_seqs / (a.max_tokens * step_s) / a.time_scale


def arrivals(a: argparse.Namespace, rate_rps: float) -> list[tuple[float, str]]:
    rng = random.Random(a.seed)
    shares = parse_kv(a.shares)
    names, weights = list(shares), list(shares.values())
    out: list[tuple[float, str]] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate_rps)
        if t >= a.duration_s:
            return out
        out.append((t, rng.choices(names, weights)[0]))


def slo_classes(overrides: dict[str, float], sheddable: str) -> list[dict[str, Any]]:
    shed = {x.strip() for x in sheddable.split(",") if x.strip()}
    unknown = shed - {c.name for c in DEFAULT_SLO_CLASSES}
    if unknown:
        raise SystemExit(f"--sheddable: unknown class(es) {sorted(unknown)}")
    return [
        {
            "name": c.name,
            "ttft_slo_s": overrides.get(c.name, c.ttft_slo_s),
            "weight": c.weight,
            "sheddable": c.name in shed,
            "priority": c.priority,
        }
        for c in DEFAULT_SLO_CLASSES
    ]


def build(base: Path, a: argparse.Namespace) -> tuple[Path, list[str]]:
    repo = base / "repo"
    repo.mkdir(parents=True)
    loads: list[str] = []
    classes = slo_classes(parse_kv(a.slo), a.sheddable)
    for policy in POLICIES:
        router = f"ov-{policy}"
        loads += add_fleet(
            repo,
            router,
            policy,
            uniform_instances(f"ov{policy[0]}", a.gpu, a.model, a.instances, a.max_num_seqs),
            {"time_scale": a.time_scale, "max_num_seqs": a.max_num_seqs},
            {"time_scale": a.time_scale},
        )
        # Both fleets get the same classes (the defaults unless --slo / --sheddable change them).
        fleet_file = repo / f"fleet-{router}.json"
        fleet = json.loads(fleet_file.read_text())
        fleet["slo_classes"] = classes
        fleet_file.write_text(json.dumps(fleet, indent=2) + "\n")
    return repo, loads


def scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())
    except OSError as e:
        return f"# scrape failed: {e}"


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of one metric: (labels, value)."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        body = head[len(name) + 1 : head.rindex("}")]
        labels = {}
        for part in body.split('",'):
            k, _, v = part.partition('="')
            labels[k.strip()] = v.rstrip('"')
        out.append((labels, float(value)))
    return out


async def burst(url: str, plan: list[tuple[float, str]], a: argparse.Namespace, run: Run) -> None:
    clients = {p: AsyncGrpcClient(url, timeout_s=a.duration_s + a.drain_s + 120) for p in POLICIES}
    tasks: list[asyncio.Task[Any]] = []
    t0 = time.monotonic()

    async def one(s: Sent) -> None:
        s.result = await clients[s.policy].generate(
            Request(
                "x" * (4 * a.prompt_tokens - 1),  # the engines count 4 bytes per token
                model=a.model,
                slo_class=s.slo_class,
                max_tokens=a.max_tokens,
                ignore_eos=True,
                router=f"ov-{s.policy}",
            )
        )

    def status() -> None:
        done = sum(1 for s in run.sent if s.result is not None)
        print(
            f"\r  {time.monotonic() - t0:5.0f} s  sent {len(run.sent)}  answered {done}",
            end="",
            file=sys.stderr,
            flush=True,
        )

    last = 0.0
    for k, (at, cls) in enumerate(plan):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        for p in POLICIES:
            s = Sent(k, p, cls, at)
            run.sent.append(s)
            tasks.append(asyncio.create_task(one(s)))
        if time.monotonic() - last > 2:
            last = time.monotonic()
            status()
    deadline = t0 + a.duration_s + a.drain_s
    while any(not t.done() for t in tasks) and time.monotonic() < deadline:
        await asyncio.wait(tasks, timeout=min(2.0, max(0.01, deadline - time.monotonic())))
        status()
    # Bounded run: what is still open is cut (the client cancels; the router answers CANCELLED).
    for s, t in zip(run.sent, tasks, strict=True):
        if not t.done():
            s.cut = True
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    status()
    print(file=sys.stderr)
    for c in clients.values():
        await c.close()


def classify(s: Sent) -> str:
    r = s.result
    if s.cut:
        return "cut"
    if r is None or r.outcome == "lost":
        return "lost"
    if r.ok:
        return "completed"
    if r.status == "UNAVAILABLE" and "request shed" in (r.error or ""):
        return "shed"
    return "error"


def summarize(run: Run, a: argparse.Namespace) -> dict[str, Any]:
    slo = {c["name"]: c["ttft_slo_s"] for c in slo_classes(parse_kv(a.slo), a.sheddable)}
    out: dict[str, Any] = {}
    for p in POLICIES:
        per: dict[str, Any] = {}
        for c in [*CLASS_ORDER, "all"]:
            mine = [s for s in run.sent if s.policy == p and c in ("all", s.slo_class)]
            kinds = {k: 0 for k in ("completed", "shed", "error", "cut", "lost")}
            attained, ttfts, shed_s = 0, [], []
            errors: dict[str, int] = {}
            for s in mine:
                kind = classify(s)
                kinds[kind] += 1
                r = s.result
                if kind == "completed" and r is not None:
                    ttft = (r.ttft_s if r.ttft_s is not None else r.total_s) / a.time_scale
                    ttfts.append(ttft)
                    attained += ttft <= slo[s.slo_class]
                elif kind == "shed" and r is not None:
                    shed_s.append(r.total_s)
                elif kind in ("error", "lost") and r is not None:
                    key = f"{r.outcome} {r.status}: {(r.error or '')[:100]}"
                    errors[key] = errors.get(key, 0) + 1
            n = len(mine)
            per[c] = {
                "sent": n,
                **kinds,
                **{f"{k}_share": (v / n if n else None) for k, v in kinds.items()},
                "attained": attained,
                "attainment": attained / n if n else None,
                "ttft_p50_sim_s": percentile(ttfts, 50),
                "ttft_p99_sim_s": percentile(ttfts, 99),
                "shed_answer_p50_wall_s": percentile(shed_s, 50),
                "shed_answer_max_wall_s": max(shed_s) if shed_s else None,
                "errors": errors,
            }
        out[p] = per
    return out


def router_state(text: str) -> dict[str, Any]:
    """The routers' own view after the run: outcomes per class and what is still queued."""
    state: dict[str, Any] = {}
    for p in POLICIES:
        r = f"ov-{p}"
        outcomes: dict[str, dict[str, float]] = {}
        for labels, v in samples(text, "qlm_requests_total"):
            if labels.get("router") == r:
                outcomes.setdefault(labels["slo_class"], {})[labels["outcome"]] = v
        queued = sum(v for lb, v in samples(text, "qlm_queue_length") if lb.get("router") == r)
        running = sum(
            v
            for lb, v in samples(text, "vllm:num_requests_running")
            if f"__ov{p[0]}-" in lb.get("model", "")
        )
        state[p] = {"outcomes": outcomes, "queued_after": queued, "engine_running_after": running}
    return state


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlm-bench overload", description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=60.0, help="burst length, wall seconds")
    p.add_argument("--drain-s", type=float, default=30.0, help="wait for answers after the burst")
    p.add_argument("--load", type=float, default=10.0, help="arrival rate / fleet capacity")
    p.add_argument("--shares", default="interactive=0.06,batch-1=0.34,batch-2=0.6")
    p.add_argument("--slo", default="", help="class SLO overrides, e.g. batch-2=120 (sim s)")
    p.add_argument(
        "--sheddable",
        default="batch-1,batch-2",
        help="classes an operator lets QLM refuse under overload (the defaults shed batch-2 only)",
    )
    p.add_argument("--time-scale", type=float, default=0.2, help="wall s per simulated s")
    p.add_argument("--model", default="mistral-7b")
    p.add_argument("--gpu", default="L4", help="slow decode steps keep the CPU cost down")
    p.add_argument("--instances", type=int, default=1, help="instances per fleet")
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON with the full numbers")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    cap = capacity_rps(a)
    plan = arrivals(a, a.load * cap)
    counts = {c: sum(1 for _, k in plan if k == c) for c in parse_kv(a.shares)}
    print(
        f"overload bench: {len(plan)} requests per policy over {a.duration_s:g} s ({counts}) = "
        f"{a.load:g} x capacity {cap:.2f} req/s; fleets: {a.instances} x {a.gpu} {a.model}, "
        f"max_num_seqs {a.max_num_seqs}, time_scale {a.time_scale:g}",
        file=sys.stderr,
    )
    base = Path(tempfile.mkdtemp(prefix="qlm-bench-overload-"))
    repo, loads = build(base, a)
    server = TritonServer(repo, load_models=loads, log_path=base / "server.log")
    try:
        server.start(timeout_s=120)
    except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"qlm-bench overload: cannot start tritonserver: {e}", file=sys.stderr)
        return 2
    run = Run()
    crashed = None
    try:
        time.sleep(2.0)  # let the stubs finish importing before the memory baseline
        pids = server.descendants()
        rss_before = rss_bytes(pids)
        anon_before = rss_bytes(pids, "RssAnon")
        t0 = time.monotonic()
        asyncio.run(burst(server.grpc_url, plan, a, run))
        wall_s = time.monotonic() - t0
        time.sleep(3.0)  # the routers see the cancellations and push their gauges
        metrics = scrape(server.metrics_url)
        rss_after = rss_bytes(server.descendants())
        anon_after = rss_bytes(server.descendants(), "RssAnon")
        crashed = server.crash_report()
    finally:
        server.stop()
    summary = summarize(run, a)
    routers = router_state(metrics)
    lost = {p: summary[p]["all"]["lost"] for p in POLICIES}
    out = {
        "bench": "overload",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "capacity_rps": cap,
        "requests_per_policy": len(plan),
        "wall_s": wall_s,
        "server_crash": crashed,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_growth": rss_after / rss_before - 1 if rss_before else None,
        # Private memory only: VmRSS also counts the Python backend's shared-memory pool once per
        # process that maps it, and a burst touches more of that pool (bounded by its size).
        "rss_anon_before_bytes": anon_before,
        "rss_anon_after_bytes": anon_after,
        "per_class": summary,
        "routers_after": routers,
        "server_log": str(server.log_path),
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2) + "\n")
    for p in POLICIES:
        for c, d in summary[p].items():
            att = "-" if d["attainment"] is None else f"{d['attainment']:.3f}"
            shed_t = d["shed_answer_p50_wall_s"]
            print(
                f"  {p:5s} {c:12s} sent {d['sent']:5d} completed {d['completed']:5d} "
                f"shed {d['shed']:5d} error {d['error']:4d} cut {d['cut']:5d} lost {d['lost']:3d} "
                f"attainment {att}"
                + (f" (shed answered in {shed_t * 1e3:.0f} ms p50)" if shed_t is not None else "")
            )
            for key, n in sorted(d["errors"].items(), key=lambda kv: -kv[1])[:3]:
                if c == "all":
                    print(f"        {n:4d} x {key}", file=sys.stderr)
        r = routers[p]
        print(
            f"  {p:5s} router after the run: queued {r['queued_after']:g}, engines running "
            f"{r['engine_running_after']:g}, outcomes {r['outcomes']}"
        )

    def share(p: str, c: str, k: str) -> str:
        v = summary[p].get(c, {}).get(f"{k}_share")
        return "-" if v is None else f"{v:.2f}"

    qi, fi = (summary[p]["interactive"]["attainment"] for p in POLICIES)
    ratio = f"{qi / fi:.2f}" if qi is not None and fi else "inf"
    parts = [
        f"{p} completed/shed/lost {c}: {share(p, c, 'completed')}/{share(p, c, 'shed')}/"
        f"{share(p, c, 'lost')}"
        for p in POLICIES
        for c in CLASS_ORDER
    ]
    print(
        f"overload bench ({len(plan)} req/policy, {a.load:g}x for {a.duration_s:g} s, "
        f"rss {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB, private "
        f"{anon_before / 2**20:.0f} -> {anon_after / 2**20:.0f} MiB): "
        + "; ".join(parts)
        + f"; lost qlm {lost['qlm']} fcfs {lost['fcfs']}"
        + f"; interactive attainment qlm {qi if qi is None else f'{qi:.2f}'} fcfs "
        + f"{fi if fi is None else f'{fi:.2f}'} ratio {ratio}"
    )
    if crashed:
        print(f"INVALID RUN: {crashed}")
    return 1 if any(lost.values()) or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
