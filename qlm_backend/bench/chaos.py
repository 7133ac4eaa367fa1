"""`qlm-bench chaos --minutes N` (`make bench-chaos`: 10 minutes): trace-shaped load through the
router, over its three fronts, while seeded faults are injected one at a time (docs/benchmarks.md,
"Chaos").

The fleet spans three tritonservers on loopback, as in docs/deployment.md "A fleet across Triton
servers": `router` serves only the `qlm` router (and qlm-openai fronts it), `e1` two simulated A10
engines, `e2` one simulated A100 (all mistral-7b); every server restricts its repository API with
one admin key, which the router holds. A RouterSupervisor watches the router, as qlm-serve does.

Load: the Azure conversation trace's arrivals, rescaled to `--load` x the fleet's capacity, classes
as in scenario WA, each request sent over Triton gRPC, Triton HTTP generate_stream or qlm-openai
(/v1/completions, streamed); a share of clients cancel mid-way and a share send bad input (which
must be refused naming its field). Faults (bench/faults.py has the schedule and the accounting):
the busiest engine's stub SIGKILLed, an engine server SIGKILLed and restarted on its ports, the
router unloaded and loaded through the repository API, a wave of cancelling clients, a window of
bad inputs, a burst at `--burst-factor` x the load; `router-crash` (its stub SIGKILLed) only when
asked for. An instance a fault hit is also probed directly (a 2-token request to its engine every
second) until it serves: the router may send an instance no work at a low load.

Reports sent / accepted / completed / cancelled / explicit errors by kind / orphaned / lost, each
fault's time to recover, per-class TTFT p99 before / during / after the faults, and the RSS of
every process at start and end; JSON in `--out`. Exit code 1 when a request was lost, a fault never
recovered, a bad input was not refused as such, or a server or qlm-openai died; 2 when the fleet
cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qlm_backend.bench.faults import (
    DEFAULT_KINDS,
    PHASES,
    WINDOW_KINDS,
    BadCase,
    FaultRun,
    Observed,
    Recovery,
    ScheduleConfig,
    account,
    busiest,
    choose,
    next_start_s,
    plan_faults,
    recovery,
)
from qlm_backend.bench.soak import proc_label
from qlm_backend.client import AsyncGrpcClient, Request, Result, http_body
from qlm_backend.core.slo import DEFAULT_SLO_CLASSES
from qlm_backend.engine.perf import PerfModel
from qlm_backend.eval.scenario import WorkloadRequest, build_workload, parse_scenario
from qlm_backend.eval.traces import DEFAULT_TRACE, load_trace, window
from qlm_backend.triton.repository import engine_model_name, write_router, write_sim_engine
from qlm_backend.triton.server import PortInUse, TritonServer, free_port, rss_bytes
from qlm_backend.triton.supervisor import (
    RepositoryApi,
    RouterSupervisor,
    SupervisorConfig,
    stub_pids,
)

ROUTER, MODEL = "qlm", "mistral-7b"
SERVERS = {"e1": (("e1-a10-0", "A10"), ("e1-a10-1", "A10")), "e2": (("e2-a100-0", "A100-80G"),)}
# The shipped classes, but batch-2's TTFT SLO cut from 3600 s to 90 s: the router must end every
# request it accepted (an answer or an explicit "request timed out") by its request_timeout_s, which
# must exceed every SLO, and the bench sets it under its clients' deadline (--deadline-s less
# TIMEOUT_MARGIN_S). Then a request its client saw nothing of is lost for certain, not a batch-2
# request the router may still serve within its hour (a 10-minute run had eight such, 2026-12-02).
CHAOS_CLASSES = tuple(
    replace(c, ttft_slo_s=90.0) if c.name == "batch-2" else c for c in DEFAULT_SLO_CLASSES
)
CLASSES = tuple(c.name for c in CHAOS_CLASSES)
SLO_S = {c.name: c.ttft_slo_s for c in CHAOS_CLASSES}
TIMEOUT_MARGIN_S = 10.0  # the router's timeout error reaches the client before its own deadline
CLASS_SHARES = {"interactive": 0.4, "batch-1": 0.3, "batch-2": 0.3}  # as the soak's trace replay
GAP_S = 1.0  # quiet time between one fault's end and the next one's start


# --- the fleet: three tritonservers and qlm-openai, each stopped by its process group -----------
@dataclass
class Fleet:
    base: Path
    time_scale: float
    max_num_seqs: int
    log: Any
    request_timeout_s: float = 7200.0  # the router's (wall seconds)
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    servers: dict[str, TritonServer] = field(default_factory=dict)
    loads: dict[str, list[str]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    openai: subprocess.Popen[bytes] | None = None
    openai_port: int = 0
    supervisor: RouterSupervisor | None = None

    def instances(self, server: str) -> list[str]:
        return [iid for iid, _ in SERVERS[server]]

    def server_of(self, engine: str) -> str:
        iid = engine.partition("__")[2]
        return next(s for s, insts in SERVERS.items() if iid in dict(insts))

    def engines(self) -> list[str]:
        return [engine_model_name(MODEL, iid) for insts in SERVERS.values() for iid, _ in insts]

    def build(self) -> None:
        settings = {"time_scale": self.time_scale, "max_num_seqs": self.max_num_seqs}
        instances, where = [], {}
        for name, insts in SERVERS.items():
            repo = self.base / name
            for iid, gpu in insts:
                write_sim_engine(repo, MODEL, iid, {"gpu": gpu, **settings})
                instances.append(
                    {
                        "instance_id": iid,
                        "gpu": gpu,
                        "models_allowed": [MODEL],
                        "initial_model": MODEL,
                        "max_in_flight": self.max_num_seqs,
                    }
                )
            self.loads[name] = [engine_model_name(MODEL, iid) for iid, _ in insts]
            self.servers[name] = self._server(name, repo, 0)
            where.update({iid: f"grpc://{self.servers[name].grpc_url}" for iid, _ in insts})
        repo = self.base / "router"
        repo.mkdir(parents=True)
        classes = [
            {
                "name": c.name,
                "ttft_slo_s": c.ttft_slo_s,
                "weight": c.weight,
                "sheddable": c.sheddable,
                "priority": c.priority,
            }
            for c in CHAOS_CLASSES
        ]
        fleet = {"instances": instances, "slo_classes": classes}
        (repo / "fleet.json").write_text(json.dumps(fleet, indent=2))
        write_router(
            repo,
            {
                "policy": "qlm",
                "time_scale": self.time_scale,
                "instance_servers": where,
                "request_timeout_s": self.request_timeout_s,
            },
        )
        self.loads["router"] = [ROUTER]
        self.servers["router"] = self._server("router", repo, 0)
        self.openai_port = free_port()

    def _server(
        self, name: str, repo: Path, n: int, like: TritonServer | None = None
    ) -> TritonServer:
        ports = {}
        if like is not None:
            ports = {p: getattr(like, p) for p in ("http_port", "grpc_port", "metrics_port")}
        return TritonServer(
            repo,
            load_models=self.loads[name],
            log_path=self.base / (f"{name}.log" if n == 0 else f"{name}.{n}.log"),
            admin_key=self.admin_key,
            **ports,
        )

    def start(self) -> None:
        with ThreadPoolExecutor(len(self.servers)) as pool:  # the stubs' imports overlap
            list(pool.map(lambda s: s.start(timeout_s=180), self.servers.values()))
        router = self.servers["router"]
        cmd = [sys.executable, "-m", "qlm_backend.openai_front", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.openai_port), "--triton-grpc", router.grpc_url]
        cmd += ["--router", ROUTER, "--model-repository", str(router.model_repository)]
        cmd += ["--log-level", "warning"]
        with open(self.base / "qlm-openai.log", "wb") as out:
            self.openai = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while not self._openai_healthy():
            if self.openai.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qlm-openai did not start (log {self.base}/qlm-openai.log)")
            time.sleep(0.2)
        api = RepositoryApi(router.http_url, self.admin_key, 120.0)
        self.supervisor = RouterSupervisor(
            ROUTER, router.descendants, api, SupervisorConfig(), self.log
        ).start()

    def _openai_healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.openai_port}/health"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
        return False

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.openai is not None and self.openai.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.openai.pid, signal.SIGTERM)
            try:
                self.openai.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.openai.pid, signal.SIGKILL)
                self.openai.wait(timeout=5)
        # In parallel and short: a model whose stub was killed holds a graceful stop for Triton's
        # whole exit timeout (30 s; facts, section 8), then the group is SIGKILLed.
        with ThreadPoolExecutor(len(self.servers)) as pool:
            list(pool.map(lambda s: s.stop(timeout_s=5), self.servers.values()))

    # Faults. Each returns a note for the log; they block, so the load runs them in a thread.
    def kill_engine(self, seed: int, index: int) -> tuple[str, str]:
        running = {e: v for e, v in self.scrape("vllm:num_requests_running").items() if "__" in e}
        engine = busiest({e: running.get(e, 0.0) for e in self.engines()}, seed, index)
        srv = self.servers[self.server_of(engine)]
        pids = stub_pids(srv.descendants(), engine)
        if not pids:
            raise RuntimeError(f"no stub process of {engine}")
        os.kill(pids[0], signal.SIGKILL)
        return engine, f"stub pid {pids[0]} SIGKILLed, {running.get(engine, 0):g} running"

    def kill_server(self, name: str) -> str:
        srv = self.servers[name]
        pid = srv.pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        srv.stop(timeout_s=5)  # reaps it, removes its shared memory
        return f"tritonserver pid {pid} and its group SIGKILLed"

    def restart_server(self, name: str) -> str:
        old = self.servers[name]
        self.restarts[name] = n = self.restarts.get(name, 0) + 1
        deadline = time.monotonic() + 30
        while True:  # the killed server's sockets may take a moment to be released
            try:
                new = self._server(name, old.model_repository, n, like=old)
                break
            except PortInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        took = new.start(timeout_s=120)
        self.servers[name] = new
        return f"restarted on its ports, ready in {took:.1f} s"

    def reload_router(self, hold_s: float) -> str:
        api = RepositoryApi(self.servers["router"].http_url, self.admin_key, 120.0)
        t0 = time.monotonic()
        api.unload(ROUTER)
        time.sleep(hold_s)
        t1 = time.monotonic()
        api.load(ROUTER)
        return f"unloaded, held {t1 - t0:.1f} s, loaded in {time.monotonic() - t1:.1f} s"

    def kill_router(self) -> str:
        pids = stub_pids(self.servers["router"].descendants(), ROUTER)
        if not pids:
            raise RuntimeError("no stub process of the router")
        os.kill(pids[0], signal.SIGKILL)
        return f"router stub pid {pids[0]} SIGKILLed (the supervisor reloads it)"

    def rss(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, srv in self.servers.items():
            for pid in srv.descendants():
                label = f"{name}: {proc_label(pid, srv.pid)}"
                out[label] = out.get(label, 0) + rss_bytes([pid])
        if self.openai is not None:
            out["qlm-openai"] = rss_bytes([self.openai.pid])
        out["qlm-bench chaos (the clients)"] = rss_bytes([os.getpid()])
        return out

    def scrape(self, *metrics: str) -> dict[str, float]:
        """Gauges summed per engine model (`model` label) or else per server and metric name."""
        out: dict[str, float] = {}
        for name, srv in self.servers.items():
            try:
                with urllib.request.urlopen(srv.metrics_url, timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                metric, _, rest = line.partition("{")
                if metric not in metrics:
                    continue
                model = rest.partition('model="')[2].partition('"')[0]
                key = model if "__" in model else f"{name}: {metric}"  # engines by name
                out[key] = out.get(key, 0.0) + float(line.rpartition(" ")[2])
        return out


# --- the load -----------------------------------------------------------------------------------
@dataclass
class Rec:
    """One request, filled in as its client sees it (bench-side and mutable; `observed()` freezes)."""

    rid: str
    w: WorkloadRequest
    front: str
    sent_s: float
    bad: BadCase | None
    cancel_after_s: float | None
    burst: bool
    res: Result = field(default_factory=Result)
    outcome: str = "open"
    end_s: float | None = None
    cut: bool = False  # still open when the run ended: the bench stopped waiting
    task: asyncio.Task[None] | None = None

    def observed(self) -> Observed:
        r = self.res
        return Observed(
            self.rid, self.front, self.w.slo_class, self.sent_s,
            self.outcome if self.outcome != "open" else "lost",  # type: ignore[arg-type]
            self.end_s, r.ttft_s, r.tokens, r.instance, r.status, r.error,
            self.bad.param if self.bad else None, self.burst,
        )  # fmt: skip


class Load:
    def __init__(self, a: argparse.Namespace, fleet: Fleet, plan: Any, sizing: dict) -> None:
        self.a, self.fleet, self.plan, self.sizing = a, fleet, plan, sizing
        self.workload: list[WorkloadRequest] = sizing["workload"]
        self.speedup: float = sizing["speedup"]
        self.recs: list[Rec] = []
        self.runs: list[FaultRun] = []
        self.recovered: dict[int, Recovery | None] = {}
        self.probes: list[asyncio.Task[None]] = []
        self.probed: list[Observed] = []  # direct probes of engines hit by a fault
        self.load_over = False
        self.active: set[str] = set()
        self.faults_done_s: float | None = None
        self.t0 = time.monotonic()
        self.shares = {k: float(v) for k, v in (x.split("=") for x in a.fronts.split(","))}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        print(f"  {self.now():6.1f} s  {msg}", file=sys.stderr, flush=True)

    def load_end_s(self) -> float | None:
        """None while faults remain; then the run's length, at least `after_s` past the last
        fault, and for a fault not recovered yet up to `recovery_timeout_s` past its end (a late
        fault's recovery is waited for, not cut off by the end of the load)."""
        if self.faults_done_s is None:
            return None
        end = max(self.a.minutes * 60, self.faults_done_s + self.a.after_s)
        for run in self.runs:
            if run.error is None and self.recovered.get(run.fault.index) is None:
                end = max(end, run.end_s + self.a.recovery_timeout_s)
        return end

    async def run(self) -> None:
        import aiohttp

        self.grpc = AsyncGrpcClient(self.fleet.servers["router"].grpc_url, self.a.deadline_s)
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.a.deadline_s),
            connector=aiohttp.TCPConnector(limit=0),  # a burst opens hundreds of streams
        )
        self.t0 = time.monotonic()
        try:
            injector = asyncio.create_task(self.inject_all())
            progress = asyncio.create_task(self.progress())
            await self.send_trace()
            await injector
            self.load_over = True
            await self.drain()
            await asyncio.gather(*self.probes, return_exceptions=True)
            progress.cancel()
            self.check_recoveries()
        finally:
            await self.grpc.close()
            await self.http.close()

    async def send_trace(self) -> None:
        for k, w in enumerate(self.workload):
            end = self.load_end_s()
            at = w.arrival_s / self.speedup
            if end is not None and at > end:
                return
            if (delay := at - self.now()) > 0:
                await asyncio.sleep(delay)
            self.send(f"r{k}", w, burst=False)
        self.say("the trace window ran out before the run's end (a shorter run than planned)")

    async def send_burst(self, duration_s: float, j0: int) -> None:
        """(factor - 1) x the mean rate on top of the trace for the window: `factor` x in all."""
        rng = random.Random(f"chaos-burst/{self.a.seed}/{j0}")
        rate = (self.a.burst_factor - 1) * self.sizing["rate_rps"]
        t, end, j = self.now(), self.now() + duration_s, 0
        while (t := t + rng.expovariate(rate)) < end:
            if (delay := t - self.now()) > 0:
                await asyncio.sleep(delay)
            self.send(f"b{j0}.{j}", rng.choice(self.workload), burst=True)
            j += 1

    def send(self, rid: str, w: WorkloadRequest, burst: bool) -> None:
        a = self.a
        cancel_p = a.cancel_wave_share if "cancel-wave" in self.active else a.cancel_share
        bad_p = a.bad_wave_share if "bad-input" in self.active else a.bad_share
        c = choose(a.seed, rid, self.shares, cancel_p, bad_p)
        cancel = None
        if c.cancel_at is not None:
            cancel = max(0.05, c.cancel_at * w.output_tokens * self.sizing["token_wall_s"])
        rec = Rec(rid, w, c.front, self.now(), c.bad, cancel, burst)
        rec.task = asyncio.create_task(self.one(rec))
        if cancel is not None:
            asyncio.get_running_loop().call_later(cancel, rec.task.cancel)
        self.recs.append(rec)

    async def one(self, rec: Rec) -> None:
        try:
            await (self.openai(rec) if rec.front == "openai" else self.triton(rec))
            rec.outcome = rec.res.outcome
        except asyncio.CancelledError:
            rec.outcome = "lost" if rec.cut else "cancelled"
            rec.res.status, rec.res.error = (
                ("CUT", "no answer by the end of the run")
                if rec.cut
                else ("CANCELLED", "cancelled by its client (the bench)")
            )
        except Exception as e:  # noqa: BLE001 - a client failure is no answer: counted, not raised
            rec.outcome, rec.res.status, rec.res.error = "lost", "CLIENT", repr(e)
        finally:
            rec.end_s = self.now()

    def request(self, rec: Rec, bad: BadCase | None) -> Request:
        w = rec.w
        req = Request(
            f"{rec.rid} " + "x" * max(1, 4 * w.prompt_tokens - len(rec.rid) - 2),
            model=MODEL, slo_class=w.slo_class, max_tokens=w.output_tokens, ignore_eos=True,
            router=ROUTER,
        )  # fmt: skip
        if bad is not None:
            req = dataclasses.replace(req, **bad.request, sampling={**req.sampling, **bad.sampling})
        return req

    async def triton(self, rec: Rec) -> None:
        req = self.request(rec, rec.bad)
        if rec.front == "grpc":
            async for _ in self.grpc.stream(req, rec.res):
                pass
            return
        url = f"http://{self.fleet.servers['router'].http_url}/v2/models/{ROUTER}/generate_stream"
        await self.sse(rec, url, http_body(req), {}, triton=True)

    async def openai(self, rec: Rec) -> None:
        req = self.request(rec, None)  # qlm-openai's bad inputs are its own (body, headers)
        body: dict[str, Any] = {"model": MODEL, "prompt": req.prompt, "stream": True}
        body |= {"max_tokens": req.max_tokens, "ignore_eos": True}
        headers = {"x-slo-class": rec.w.slo_class}
        if rec.bad is not None:
            body |= dict(rec.bad.body)
            headers |= dict(rec.bad.headers)
        url = f"http://127.0.0.1:{self.fleet.openai_port}/v1/completions"
        await self.sse(rec, url, body, headers, triton=False)

    async def sse(self, rec: Rec, url: str, body: dict, headers: dict, triton: bool) -> None:
        """A server-sent-event stream (Triton's generate_stream or qlm-openai) into rec.res."""
        import aiohttp

        r, t0, final = rec.res, time.monotonic(), False

        def fail(outcome: str, status: str, error: str) -> None:
            r.outcome, r.status, r.error = outcome, status, error  # type: ignore[assignment]
            r.total_s = time.monotonic() - t0

        try:
            async with self.http.post(url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    raw = await resp.text()
                    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
                        err = json.loads(raw.strip().removeprefix("data:"))["error"]
                        raw = err if triton else f"{err.get('param')}: {err.get('message')}"
                    return fail("error", f"HTTP {resp.status}", str(raw))
                async for line in resp.content:
                    text = line.decode("utf-8", "replace").strip()
                    if not text.startswith("data:"):
                        continue
                    data = text[5:].strip()
                    if data == "[DONE]":
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        err = ev["error"]
                        msg = err if isinstance(err, str) else err.get("message", str(err))
                        return fail("error", "SSE error", str(msg))
                    if triton:
                        n, reason = ev.get("num_output_tokens") or 0, ev.get("finish_reason")
                        r.instance = ev.get("qlm_instance") or r.instance
                    else:
                        ch = (ev.get("choices") or [{}])[0]
                        n, reason = (1 if ch.get("text") else 0), ch.get("finish_reason")
                    if n and r.ttft_s is None:
                        r.ttft_s = time.monotonic() - t0
                    r.tokens += int(n)
                    final = final or reason not in (None, "", "None")
                    if final and triton:
                        break
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return fail("lost", "CONNECTION", f"{type(e).__name__}: {e}")
        if not final:
            return fail("lost", "INCOMPLETE", "the stream ended without a final response")
        r.outcome, r.total_s = "completed", time.monotonic() - t0

    # Faults, one at a time ----------------------------------------------------------------------
    async def inject_all(self) -> None:
        prev_end = None
        for f in self.plan:
            await asyncio.sleep(max(0.0, next_start_s(f.at_s, prev_end, GAP_S) - self.now()))
            start = self.now()
            what = f"{f.kind}" + (f" {f.target}" if f.target else "")
            self.say(f"fault {f.index}/{len(self.plan)}: {what} ...")
            try:
                target, note = await self.inject(f.kind, f.target, f.duration_s, f.index)
                run = FaultRun(f, start, self.now(), note, None, target)
            except Exception as e:  # noqa: BLE001 - reported as a fault that never recovered
                run = FaultRun(f, start, self.now(), "", f"{type(e).__name__}: {e}", f.target)
            self.runs.append(run)
            prev_end = run.end_s
            if run.error is None and self.parts(run):
                self.probes.append(asyncio.create_task(self.probe(run)))
            what = f.kind + (f" {run.target}" if run.target else "")
            self.say(f"fault {f.index}: {what}: {run.error or run.note}")
        self.faults_done_s = prev_end if prev_end is not None else self.now()

    async def inject(
        self, kind: str, target: str, duration_s: float, index: int
    ) -> tuple[str, str]:
        fl, thread = self.fleet, asyncio.to_thread
        if kind == "engine-kill":
            return await thread(fl.kill_engine, self.a.seed, index)
        if kind == "server-restart":
            note = await thread(fl.kill_server, target)
            await asyncio.sleep(duration_s)
            note += f"; down {duration_s:g} s; " + await thread(fl.restart_server, target)
            return target, note
        if kind == "router-reload":
            return "", await thread(fl.reload_router, duration_s)
        if kind == "router-crash":
            return "", await thread(fl.kill_router)
        assert kind in WINDOW_KINDS, kind
        self.active.add(kind)
        try:
            if kind == "burst":
                await self.send_burst(duration_s, index)
            else:
                await asyncio.sleep(duration_s)
        finally:
            self.active.discard(kind)
        return "", f"{duration_s:g} s window"

    def parts(self, run: FaultRun) -> list[str]:
        if run.fault.kind == "engine-kill":
            return [run.target.partition("__")[2]]
        return self.fleet.instances(run.target) if run.fault.kind == "server-restart" else []

    async def probe(self, run: FaultRun) -> None:
        """Until the instances the fault hit have served, each second a 2-token request straight
        to each one's engine (the router may send an idle instance nothing for a long while)."""
        n = 0
        while self.recovered.get(run.fault.index) is None and not self.load_over:
            for iid in self.parts(run):
                srv = self.fleet.servers[next(s for s in SERVERS if iid in dict(SERVERS[s]))]
                n += 1
                req = Request("probe", max_tokens=2, ignore_eos=True)
                req.router = engine_model_name(MODEL, iid)
                w = WorkloadRequest(f"p{run.fault.index}.{n}", 0, MODEL, "interactive", 1, 2, 2)
                rec = Rec(w.request_id, w, "probe", self.now(), None, None, False)
                try:
                    async with AsyncGrpcClient(srv.grpc_url, timeout_s=10.0) as client:
                        async for _ in client.stream(req, rec.res):
                            pass
                except Exception as e:  # noqa: BLE001 - a probe that fails just did not serve
                    rec.res.outcome, rec.res.error = "lost", repr(e)
                rec.outcome, rec.end_s, rec.res.instance = rec.res.outcome, self.now(), iid
                self.probed.append(rec.observed())
            await asyncio.sleep(1.0)

    def check_recoveries(self) -> None:
        seen = [r.observed() for r in self.recs if r.end_s is not None] + self.probed
        for run in self.runs:
            i = run.fault.index
            if self.recovered.get(i) is None:
                got = recovery(run, seen, self.parts(run), SLO_S, self.a.time_scale)
                self.recovered[i] = got
                if got is not None:
                    self.say(
                        f"fault {i}: {run.fault.kind} recovered {got.after_s:.1f} s "
                        f"after it began (shown by {', '.join(got.by)})"
                    )

    async def progress(self) -> None:
        last = 0.0
        while True:
            await asyncio.sleep(1.0)
            self.check_recoveries()
            if self.now() - last < self.a.progress_s:
                continue
            last = self.now()
            done = [r for r in self.recs if r.end_s is not None]
            lost = sum(r.outcome == "lost" for r in done)
            cur = ", ".join(sorted(self.active)) or "-"
            self.say(
                f"sent {len(self.recs)}  answered {len(done)}  open {len(self.recs) - len(done)}"
                f"  lost {lost}  faults run {len(self.runs)}/{len(self.plan)}  window {cur}"
            )

    async def drain(self) -> None:
        """Wait for every answer (each client bounds its own wait at --deadline-s); what is still
        open after that, or after --drain-s once only orphans of a router crash remain, is cut."""
        kills = [r.start_s for r in self.runs if r.fault.kind == "router-crash"]

        def orphan(r: Rec) -> bool:
            return r.front != "openai" and any(r.sent_s < t for t in kills)

        t_end = self.now()
        while True:
            open_ = [r for r in self.recs if r.end_s is None]
            if not open_:
                break
            waited = self.now() - t_end
            if waited > self.a.deadline_s + 10 or (
                waited > self.a.drain_s and all(orphan(r) for r in open_)
            ):
                break
            await asyncio.sleep(0.5)
        for r in self.recs:
            if r.end_s is None and r.task is not None:
                r.cut = True
                r.task.cancel()
        await asyncio.gather(*(r.task for r in self.recs if r.task), return_exceptions=True)


# --- sizing, report, main ----------------------------------------------------------------------
def size(a: argparse.Namespace) -> dict[str, Any]:
    """Trace requests and speed-up for `--load` x the fleet's capacity over the run (with room for
    a run that faults make longer), and the wall time per token (when a cancelling client leaves)."""
    sc = parse_scenario(
        {
            "name": "chaos",
            "fleet": {
                "instances": [
                    {"instance_id": "any", "gpu": "A10", "models_allowed": [MODEL],
                     "initial_model": MODEL}
                ]
            },
            "models": {MODEL: 1.0},
            "classes": CLASS_SHARES,
            "class_run_mean": 4,
            "max_tokens": a.max_tokens,
        },
        "chaos",
    )  # fmt: skip
    trace = load_trace(a.trace)
    probe = build_workload(sc, window(trace, max_requests=2000, duration_s=None), a.seed)
    mean_out = sum(w.output_tokens for w in probe) / len(probe)
    ctx = int(
        a.max_num_seqs * sum(w.prompt_tokens + w.output_tokens / 2 for w in probe) / len(probe)
    )
    cap, token_s = 0.0, 0.0
    for insts in SERVERS.values():
        for _, gpu in insts:
            step_s = PerfModel.from_names(MODEL, gpu, None).decode_step_s(a.max_num_seqs, ctx)
            cap += a.max_num_seqs / (mean_out * step_s) / a.time_scale
            token_s = max(token_s, step_s * a.time_scale)
    duration = a.minutes * 60
    rate = a.load * cap
    n = max(20, math.ceil(rate * duration))
    ws = build_workload(sc, window(trace, max_requests=3 * n, duration_s=None), a.seed)
    span = ws[n - 1].arrival_s - ws[0].arrival_s if len(ws) >= n else ws[-1].arrival_s
    speedup = span / duration if span > 0 else 1.0
    return {"workload": ws, "speedup": speedup, "capacity_rps": cap, "rate_rps": rate,
            "token_wall_s": token_s, "mean_output_tokens": mean_out}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlm-bench chaos", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the load, wall minutes")
    p.add_argument("--seed", type=int, default=0, help="the fault schedule and every client choice")
    p.add_argument("--faults", default=",".join(DEFAULT_KINDS), help="kinds to inject")
    p.add_argument("--load", type=float, default=0.3, help="arrival rate / fleet capacity")
    p.add_argument("--burst-factor", type=float, default=10.0, help="arrival rate in a burst")
    p.add_argument("--fronts", default="grpc=0.5,http=0.2,openai=0.3", help="shares per front")
    p.add_argument("--cancel-share", type=float, default=0.05, help="clients that cancel")
    p.add_argument("--cancel-wave-share", type=float, default=0.5, help="... in a cancel wave")
    p.add_argument("--bad-share", type=float, default=0.03, help="bad inputs")
    p.add_argument("--bad-wave-share", type=float, default=0.3, help="... in a bad-input window")
    p.add_argument("--time-scale", type=float, default=1.0, help="wall s per simulated s")
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64, help="output length cap")
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--deadline-s", type=float, default=120.0, help="each client's own bound")
    p.add_argument("--drain-s", type=float, default=15.0, help="wait for orphans' answers")
    p.add_argument("--warmup-s", type=float, help="no fault before (default: 12%% of the run)")
    p.add_argument("--after-s", type=float, help="no fault for this long at the end (20%%)")
    p.add_argument("--every-s", type=float, default=40.0, help="mean time between faults")
    p.add_argument(
        "--recovery-timeout-s",
        type=float,
        default=90.0,
        help="a fault not recovered this long after it ended never recovered (the load goes on "
        "that long for a late one)",
    )
    p.add_argument("--window-s", type=float, help="burst / cancel / bad-input windows (5%%)")
    p.add_argument("--down-s", type=float, default=3.0, help="a killed server stays down")
    p.add_argument("--hold-s", type=float, default=1.0, help="the router stays unloaded")
    p.add_argument("--progress-s", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=Path("results/bench-chaos.json"))
    return p


def report_lines(rep: dict[str, Any]) -> list[str]:
    acc = rep["accounting"]
    lines = ["  fault                  target              start s  end s  recovery s"]
    for f in rep["faults"]:
        rec = "-" if f["recovery_s"] is None else f"{f['recovery_s']:.1f}"
        rec += f" ({', '.join(f['recovered_by'])})" if f["recovered_by"] else ""
        state = (
            ""
            if f["recovered"]
            else "  NEVER RECOVERED" + (f" ({f['error']})" if f["error"] else "")
        )
        lines.append(
            f"  {f['index']:2d} {f['kind']:19s} {f['target'] or '-':19s} {f['start_s']:7.1f}"
            f" {f['end_s']:6.1f}  {rec:>10s}{state}"
        )
    lines.append("  TTFT p99 (sim s)  " + "".join(f"{p:>16s}" for p in PHASES))
    for c in CLASSES:
        cells = []
        for p in PHASES:
            v, n = acc["ttft_p99_sim_s"][c][p], acc["ttft_n"][c][p]
            cells.append(f"{'-' if v is None else f'{v:.2f}'} (n {n})".rjust(16))
        lines.append(f"  {c:17s} " + "".join(cells))
    for name in sorted(set(rep["rss_start"]) | set(rep["rss_end"])):
        s, e = rep["rss_start"].get(name), rep["rss_end"].get(name)
        lines.append(
            f"  rss {name:44s} start {'-' if s is None else f'{s / 2**20:6.1f}'} MiB"
            f"  end {'-' if e is None else f'{e / 2**20:6.1f}'} MiB"
        )
    lines.append(f"  per front: {acc['per_front']}")
    lines.append(f"  served per instance (before/during/after): {acc['per_instance']}")
    lines.append(
        f"  bad inputs: {acc['bad_inputs']} sent, {acc['bad_inputs_refused_ok']} refused naming "
        f"their field; explicit errors by kind: {acc['errors_by_kind']}"
    )
    lines += [f"  e.g. {kind}: {m}" for kind, m in acc["error_samples"].items()]
    lines += [f"  misanswered bad input: {m}" for m in acc["bad_input_misanswers"]]
    lines += [f"  lost: {m}" for m in acc["lost_samples"]]
    lines += [f"  waiting (within its SLO): {m}" for m in acc.get("waiting_samples", ())]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    slo_max_s = max(SLO_S.values()) * a.time_scale
    if a.deadline_s - TIMEOUT_MARGIN_S <= slo_max_s:
        p.error(
            f"--deadline-s: must exceed every class's TTFT SLO ({slo_max_s:g} s at this time "
            f"scale) by more than {TIMEOUT_MARGIN_S:g} s: the router's request timeout sits "
            f"between them; got {a.deadline_s:g}"
        )
    duration = a.minutes * 60
    a.warmup_s = a.warmup_s if a.warmup_s is not None else max(8.0, 0.12 * duration)
    a.after_s = a.after_s if a.after_s is not None else max(10.0, 0.2 * duration)
    win = a.window_s if a.window_s is not None else min(20.0, max(3.0, 0.05 * duration))
    kinds = tuple(k.strip() for k in a.faults.split(",") if k.strip())
    base = Path(tempfile.mkdtemp(prefix="qlm-bench-chaos-"))
    log_file = open(base / "chaos.log", "a", buffering=1)  # noqa: SIM115 - closed at the end
    timeout_s = a.deadline_s - TIMEOUT_MARGIN_S
    fleet = Fleet(base, a.time_scale, a.max_num_seqs, lambda m: print(m, file=log_file), timeout_s)
    fleet.build()
    durations = {"burst": win, "cancel-wave": win, "bad-input": win}
    durations |= {"server-restart": a.down_s, "router-reload": a.hold_s}
    # An engine kill's target is chosen when it happens (the busiest engine): faults.busiest.
    targets = {"server-restart": list(SERVERS)}
    try:
        cfg = ScheduleConfig(kinds, a.warmup_s, duration - a.after_s, a.every_s, durations, GAP_S)
        plan = plan_faults(a.seed, cfg, targets)
    except ValueError as e:
        print(f"qlm-bench chaos: {e}", file=sys.stderr)
        return 2
    sizing = size(a)
    print(
        f"chaos: ~{a.minutes:g} min at {a.load:g} x capacity {sizing['capacity_rps']:.2f} req/s "
        f"(trace speed-up {sizing['speedup']:.2f}), fronts {a.fronts}, seed {a.seed}; "
        f"{len(plan)} faults: {', '.join(f.kind for f in plan)}; logs in {base}",
        file=sys.stderr,
    )
    t0 = time.monotonic()
    load = Load(a, fleet, plan, sizing)
    try:
        try:
            fleet.start()
        except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback
            print(f"qlm-bench chaos: cannot start the fleet: {e}", file=sys.stderr)
            return 2
        start_s = time.monotonic() - t0
        time.sleep(1.0)  # the stubs settle before the memory baseline
        rss_start = fleet.rss()
        asyncio.run(load.run())
        time.sleep(2.0)  # the router's gauges catch up with the last cancellations
        busy = fleet.scrape("qlm_queue_length", "vllm:num_requests_running")
        rss_end = fleet.rss()
        crashed = [c for srv in fleet.servers.values() if (c := srv.crash_report())]
        if fleet.openai is not None and fleet.openai.poll() is not None:
            crashed.append(f"qlm-openai exited with code {fleet.openai.returncode} during the run")
    finally:
        t_stop = time.monotonic()
        fleet.stop()
        stop_s = time.monotonic() - t_stop
        log_file.close()
    acc = account([r.observed() for r in load.recs], load.runs, CLASSES, a.time_scale, SLO_S)
    faults = []
    for r in load.runs:
        got = load.recovered.get(r.fault.index)
        faults.append(
            {
                **dataclasses.asdict(r.fault),
                "target": r.target,
                "start_s": r.start_s,
                "end_s": r.end_s,
                "note": r.note,
                "error": r.error,
                "recovered": got is not None,
                "recovery_s": got.after_s if got else None,
                "recovered_by": list(got.by) if got else [],
            }
        )
    unrun = [f.index for f in plan if f.index not in {r.fault.index for r in load.runs}]
    rep = {
        "bench": "chaos",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "fleet": {s: [iid for iid, _ in insts] for s, insts in SERVERS.items()},
        "capacity_rps": sizing["capacity_rps"],
        "rate_rps": sizing["rate_rps"],
        "trace_speedup": sizing["speedup"],
        "wall_s": time.monotonic() - t0,
        "fleet_start_s": start_s,
        "fleet_stop_s": stop_s,
        "load_s": load.load_end_s(),
        "faults": faults,
        "faults_not_run": unrun,
        "accounting": acc.as_json(),
        "rss_start": rss_start,
        "rss_end": rss_end,
        "after_run": busy,
        "crashes": crashed,
        "logs": str(base),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rep, indent=2) + "\n")
    for line in report_lines(rep):
        print(line)
    unrecovered = [f["index"] for f in faults if not f["recovered"]]
    print(
        f"chaos ({a.minutes:g} min, seed {a.seed}, {rep['wall_s']:.0f} s wall): sent {acc.sent}, "
        f"accepted {acc.accepted}, completed {acc.completed}, cancelled {acc.cancelled}, refused "
        f"{acc.refused}, errors {sum(acc.errors_by_kind.values())}, orphaned {acc.orphaned}, "
        f"waiting within SLO {acc.waiting}, lost {acc.lost}; faults {len(faults)}, recovered {len(faults) - len(unrecovered)}, "
        f"recovery max {max((f['recovery_s'] or 0 for f in faults), default=0):.1f} s; "
        f"report {a.out}"
    )
    for c in crashed:
        print(f"INVALID RUN: {c}")
    bad = acc.lost or unrecovered or unrun or acc.bad_input_misanswers or crashed
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
