"""`qlm-bench cancel`: where a client's cancel goes, hop by hop, and what the engine does meanwhile.

A tritonserver of its own serves the shipped `qlm` router and one shipped simulated engine
(`mistral-7b__a10-0`, real time), from a copy of model_repository whose fleet keeps that one
instance and caps its `max_in_flight` at `--wave`, so that requests beyond it queue in the router,
and whose router lets a wave of long prompts into the engine (its prefill backlog cap, 2 s by
default, raised to 20 s). qlm-openai runs beside it (own process group) when the openai path is
measured. Both are stopped by process group at the end.

Cases: path x phase, `--n` cancelled streams each (sent in waves of at most `--wave`, so that in
the engine phases none queues in the router). Paths: `direct-grpc` and `direct-http` (straight to
the engine model, no router), `qlm-grpc` (Triton gRPC stream to the router), `qlm-http` (Triton
HTTP generate_stream, SSE), `openai` (qlm-openai's /v1/chat/completions stream). Phases: `queued`
(router paths only: `--wave` filler requests take every seat of the instance first, then the test
requests wait in the router's queue), `engine` (in the engine, before its first token: a long
prompt whose prefill is still running) and `mid` (mid-stream: after `--mid-tokens` tokens). The
client cancels by closing its stream (gRPC: cancels the call; HTTP: closes the connection).

Per case, from the router's and the engine's own evidence:
- router saw: the router's log line `qN: cancelled by its client (stream qN.G on I | queued)`
  (cross-checked with its qlm_requests_total{outcome="cancelled"} delta);
- router stopped: of the cancels it saw on a stream, those with `stream qN.G: stopped (cancel)`;
- engine aborted: the engine's vllm:request_success_total{finished_reason="abort"} delta;
- ran on: test requests the engine finished anyway (its non-abort finishes, fillers deducted);
- where each loss was: the router never saw it (the client->server frontend: Triton's HTTP or gRPC
  frontend, or qlm-openai and Triton's gRPC frontend on the openai path; on the direct paths the
  engine never saw it), or the router stopped the stream and the engine ran on (the router->engine
  gRPC frontend), or the router saw it and did not stop its stream: a router fault;
- engine work wasted: tokens the engine generated after the client left (ran-on requests: exact,
  from vllm:generation_tokens_total; aborted mid-stream ones: their cancel->abort time over the
  decode step the clients saw), the cancel->abort time of each abort (the engine's log line
  `request rN cancelled by the client`, timestamped by Triton) and the time from a wave's last
  cancel to the engine being idle (its running + waiting gauges back at 0).

Each wave ends when every request has ended where it should (the router's outcomes, the engine's
finishes) and the engine is idle, so a cancel that was lost shows up as a request that ran on.
Prints progress and one row per case, writes JSON (`--out`). Exit code 1 on a router fault, a lost
request (one not cancelled that got neither a final response nor an explicit error), a wave that
never settled, or a server that died; cancels lost by a frontend are figures, not failures (the
known Triton 2.51 limit, docs/reliability.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlm_backend.bench.overload import samples, scrape
from qlm_backend.client import Request, grpc_inputs, http_body
from qlm_backend.triton.launcher import openai_command
from qlm_backend.triton.repository import engine_model_name
from qlm_backend.triton.server import TritonServer, free_port

ROOT = Path(__file__).resolve().parents[2]
ROUTER = "qlm"
MODEL = "mistral-7b"
INSTANCE = "a10-0"
ENGINE = engine_model_name(MODEL, INSTANCE)
PATHS = ("direct-grpc", "direct-http", "qlm-grpc", "qlm-http", "openai")
ROUTER_PATHS = frozenset({"qlm-grpc", "qlm-http", "openai"})
PHASES = ("queued", "engine", "mid")
# Fillers must stay in the engine, never evicted for the test requests queued behind them: they
# are the highest class, the tests a lower one.
FILLER_CLASS = "interactive"
BYTES_PER_TOKEN = 4  # the engines count 4 bytes of prompt per token (engine/tokens.py)
POLL_S = 0.05

# Triton's log prefix: severity, MMDD, local wall time with microseconds, then `pid file:line] "`.
_STAMP = re.compile(r"^[IWE](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+) ")
_ROUTER_CANCEL = re.compile(
    rf'"{ROUTER}: (q\d+): cancelled by its client \((?:stream (q\d+\.\d+) on (\S+)|queued)\)'
)
_ROUTER_STOP = re.compile(rf'"{ROUTER}: stream (q\d+\.\d+): stopped \(cancel\)')
_ENGINE_ABORT = re.compile(
    rf'"{re.escape(ENGINE)}: (?:request r\d+ cancelled by the client|send failed .*aborting)'
)


# ---------------------------------------------------------------------------------- the clients
@dataclass(eq=False)
class Probe:
    """One stream as its client saw it (wall times: comparable with Triton's log stamps)."""

    role: str  # "test" or "filler"
    cancel_after_tokens: int | None = None  # mid phase: the client leaves after this many
    sent_wall: float = 0.0
    tokens: int = 0
    token_walls: list[tuple[float, int]] = field(default_factory=list)  # (wall, tokens so far)
    cancel_wall: float | None = None
    tokens_at_cancel: int = 0
    end_wall: float | None = None
    end: str = "open"  # final | error | cancelled | lost
    error: str | None = None
    leave: asyncio.Event = field(default_factory=asyncio.Event)

    def got(self, n: int) -> None:
        if n <= 0:
            return
        self.tokens += n
        self.token_walls.append((time.time(), self.tokens))
        if self.cancel_after_tokens is not None and self.tokens >= self.cancel_after_tokens:
            self.leave.set()

    def step_s(self) -> float | None:
        """The client's mean time per token after its first response (the engine's decode step)."""
        if len(self.token_walls) < 2:
            return None
        (t0, n0), (t1, n1) = self.token_walls[0], self.token_walls[-1]
        return (t1 - t0) / (n1 - n0) if n1 > n0 else None


def _sse_data(line: bytes) -> str | None:
    text = line.decode("utf-8", "replace").strip()
    return text[len("data:") :].strip() if text.startswith("data:") else None


class Clients:
    """The five ways in, each as one coroutine per stream that leaves when its probe says so."""

    def __init__(self, grpc_url: str, http_url: str, openai_url: str | None) -> None:
        import aiohttp
        import tritonclient.grpc.aio as grpcaio

        self._grpcaio = grpcaio
        # One channel, a gRPC stream per request: what the router and qlm-openai do too.
        self.grpc = grpcaio.InferenceServerClient(grpc_url)
        self.http_url, self.openai_url = f"http://{http_url}", openai_url
        # A connection per request, closed with it: a client that leaves closes its own.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        await self.session.close()
        await self.grpc.close()

    async def run(self, p: Probe, path: str, req: Request) -> None:
        p.sent_wall = time.time()
        try:
            if path.endswith("grpc"):
                await self._grpc(p, req)
            elif path == "openai":
                await self._openai(p, req)
            else:
                await self._http(p, req)
        finally:
            p.end_wall = time.time()

    async def _race(
        self, p: Probe, reader: Coroutine[Any, Any, None], leave: Callable[[], None]
    ) -> None:
        """Read until the stream ends or the probe leaves; leaving closes the stream at once."""
        task = asyncio.ensure_future(reader)
        waiter = asyncio.ensure_future(p.leave.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done():
            if (exc := task.exception()) is not None:
                p.end, p.error = "lost", f"{type(exc).__name__}: {exc}"
            return
        p.cancel_wall, p.tokens_at_cancel = time.time(), p.tokens
        leave()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if p.end == "open":
            p.end = "cancelled"

    async def _grpc(self, p: Probe, req: Request) -> None:
        done = asyncio.Event()

        async def requests() -> Any:
            yield {
                "model_name": req.router,
                "inputs": grpc_inputs(req, self._grpcaio),
                "enable_empty_final_response": True,
            }
            await done.wait()  # the request side stays open until the request has ended

        it = self.grpc.stream_infer(inputs_iterator=requests())

        async def read() -> None:
            async for result, error in it:
                if error is not None:
                    p.end, p.error = "error", str(error)
                    return
                n = result.as_numpy("num_output_tokens")
                p.got(int(n.reshape(-1)[0]) if n is not None and n.size else 0)
                params = result.get_response().parameters
                if "triton_final_response" in params and params["triton_final_response"].bool_param:
                    p.end = "final"
                    return
            p.end, p.error = "lost", "the stream ended without a final response"

        try:
            await self._race(p, read(), it.cancel)
        finally:
            done.set()

    async def _http(self, p: Probe, req: Request) -> None:
        url = f"{self.http_url}/v2/models/{req.router}/generate_stream"

        async def read() -> None:
            async with self.session.post(url, json=http_body(req)) as resp:
                if resp.status != 200:
                    p.end, p.error = "error", f"HTTP {resp.status}: {await resp.text()}"
                    return
                async for raw in resp.content:
                    data = _sse_data(raw)
                    if data is None:
                        continue
                    ev = json.loads(data)
                    if "error" in ev:
                        p.end, p.error = "error", str(ev["error"])
                        return
                    p.got(int(ev.get("num_output_tokens") or 0))
                    if ev.get("finish_reason") not in (None, "", "None"):
                        p.end = "final"
                        return
            p.end, p.error = "lost", "the stream ended without a final response"

        # Cancelling the reader closes its connection (aiohttp closes a response it abandons).
        await self._race(p, read(), lambda: None)

    async def _openai(self, p: Probe, req: Request) -> None:
        assert self.openai_url is not None
        body = {
            "model": req.model,
            "messages": [{"role": "user", "content": req.prompt}],
            "max_tokens": req.max_tokens,
            "stream": True,
            "ignore_eos": req.ignore_eos,
        }
        headers = {"x-slo-class": req.slo_class or "interactive"}

        async def read() -> None:
            url = f"{self.openai_url}/v1/chat/completions"
            async with self.session.post(url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    p.end, p.error = "error", f"HTTP {resp.status}: {await resp.text()}"
                    return
                async for raw in resp.content:
                    data = _sse_data(raw)
                    if data is None:
                        continue
                    if data == "[DONE]":
                        p.end = "final"
                        return
                    ev = json.loads(data)
                    if "error" in ev:
                        p.end, p.error = "error", str(ev["error"])
                        return
                    for choice in ev.get("choices", []):
                        # A simulated token is one word and a space.
                        p.got(len((choice.get("delta", {}).get("content") or "").split()))
            p.end, p.error = "lost", "the stream ended without [DONE]"

        await self._race(p, read(), lambda: None)


# ---------------------------------------------------------------------------------- the server
@dataclass(frozen=True)
class Counters:
    """The engine's and the router's counters at one moment."""

    engine_aborted: float
    engine_finished_other: float  # finishes for any other reason (length, stop)
    engine_tokens: float  # vllm:generation_tokens_total: finished requests only, aborts excluded
    engine_busy: float  # running + waiting
    router_cancelled: float
    router_ended: float  # every outcome: each accepted request ends exactly once

    @classmethod
    def read(cls, url: str) -> Counters:
        for _ in range(20):  # a busy server may miss one scrape; zeros would read as a reset
            text = scrape(url)
            if not text.startswith("# scrape failed"):
                break
            time.sleep(0.25)
        else:
            raise RuntimeError(f"cannot read the server's metrics at {url}: {text}")

        def engine(name: str, **want: str) -> float:
            return sum(
                v
                for lb, v in samples(text, name)
                if lb.get("model") == ENGINE and all(lb.get(k) == x for k, x in want.items())
            )

        ended = [
            (lb, v) for lb, v in samples(text, "qlm_requests_total") if lb.get("router") == ROUTER
        ]
        finished = engine("vllm:request_success_total")
        aborted = engine("vllm:request_success_total", finished_reason="abort")
        return cls(
            engine_aborted=aborted,
            engine_finished_other=finished - aborted,
            engine_tokens=engine("vllm:generation_tokens_total"),
            engine_busy=engine("vllm:num_requests_running") + engine("vllm:num_requests_waiting"),
            router_cancelled=sum(v for lb, v in ended if lb.get("outcome") == "cancelled"),
            router_ended=sum(v for _, v in ended),
        )


def build_repository(dst: Path, seats: int, src: Path = ROOT / "model_repository") -> list[str]:
    """The shipped repository with a one-instance fleet whose seats are capped, and a router that
    lets a wave of long prompts into the engine; returns the models to load."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    fleet_file = dst / "fleet.json"
    fleet = json.loads(fleet_file.read_text())
    # One instance: one engine's counters, and no model swap the planner could start meanwhile.
    fleet["instances"] = [
        {**inst, "max_in_flight": seats}
        for inst in fleet["instances"]
        if inst["instance_id"] == INSTANCE
    ]
    fleet["default_model"] = MODEL
    fleet_file.write_text(json.dumps(fleet, indent=2) + "\n")
    # The router keeps at most 10% of the tightest class SLO (2 s) of prefill queued in an engine
    # and holds the rest back: a wave of long prompts would then wait in the router, not in the
    # engine's prefill, which is the phase the engine case is about. 20 s lets a wave through.
    router_file = dst / ROUTER / "1" / "router.json"
    router = json.loads(router_file.read_text())
    router["manager"] = {**router.get("manager", {}), "pull_prefill_backlog_share": 1.0}
    router_file.write_text(json.dumps(router, indent=2) + "\n")
    return [ENGINE, ROUTER]


def start_openai(repo: Path, grpc_url: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """qlm-openai as qlm-serve starts it, but in its own process group (stopped by that group)."""
    port = free_port()
    ns = argparse.Namespace(host="127.0.0.1", openai_port=port, fleet=None)
    cmd = [*openai_command(ns, repo, grpc_url), "--log-level", "info"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"qlm-openai exited with code {proc.returncode} (log: {log_path})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    stop_group(proc)
    raise RuntimeError(f"qlm-openai did not answer {url}/health within 60 s (log: {log_path})")


def stop_group(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


class LogTail:
    """What a log file gained since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def skip(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def peek(self) -> str:
        if not self.path.exists():
            return ""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode("utf-8", "replace")

    def take(self) -> str:
        text = self.peek()
        self.offset += len(text.encode("utf-8", "replace"))
        return text


def log_wall(line: str, now: float) -> float | None:
    """The wall time of a Triton log line (local time; the year is the current one's)."""
    m = _STAMP.match(line)
    if m is None:
        return None
    mon, day, hh, mm, ss, frac = m.groups()
    year = time.localtime(now).tm_year
    if int(mon) > time.localtime(now).tm_mon:  # a December line read in January
        year -= 1
    base = time.mktime((year, int(mon), int(day), int(hh), int(mm), int(ss), 0, 0, -1))
    return base + float(f"0.{frac}")


@dataclass(frozen=True)
class LogEvidence:
    """What the router and the engine logged about cancels in one wave."""

    router_cancels: tuple[tuple[str, str | None, float], ...]  # (rid, stream id or None, wall)
    router_stops: frozenset[str]  # stream ids stopped for a cancel
    engine_aborts: tuple[float, ...]  # walls of the engine's aborts

    @classmethod
    def parse(cls, text: str) -> LogEvidence:
        now = time.time()
        cancels, stops, aborts = [], set(), []
        for line in text.splitlines():
            if m := _ROUTER_CANCEL.search(line):
                cancels.append((m.group(1), m.group(2), log_wall(line, now) or 0.0))
            elif m := _ROUTER_STOP.search(line):
                stops.add(m.group(1))
            elif _ENGINE_ABORT.search(line):
                aborts.append(log_wall(line, now) or 0.0)
        return cls(tuple(cancels), frozenset(stops), tuple(aborts))


# ---------------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Wave:
    """One wave's figures; a case sums its waves."""

    sent: int
    cancelled: int  # streams the client cancelled (the others ended before it left)
    phase_misses: int  # cancelled outside the phase the case is about (see `phase_miss`)
    completed_early: int  # a final response before the client left
    lost: int  # neither a final response nor an explicit error, and not cancelled
    errors: int  # explicit errors before the client left
    fillers_lost: int
    router_saw: int
    router_cancelled_metric: int
    router_stopped: int
    router_faults: tuple[str, ...]  # rids: seen on a stream that was then not stopped
    engine_aborted: int
    ran_on: int
    ran_on_tokens: int  # generated for the ran-on requests after their clients left
    wasted_tokens: float
    router_seen_s: tuple[float, ...]
    abort_s: tuple[float, ...]
    idle_s: float | None
    settled: bool


@dataclass(frozen=True)
class CaseResult:
    path: str
    phase: str
    sent: int
    cancelled: int
    phase_misses: int
    completed_early: int
    errors: int
    lost: int
    router_saw: int | None  # None: no router on this path
    router_cancelled_metric: int | None
    router_stopped: int | None
    router_faults: tuple[str, ...]
    engine_aborted: int
    ran_on: int
    lost_client_to_server: int
    lost_router_to_engine: int | None
    ran_on_tokens: int
    wasted_tokens: float
    router_seen_s_p50: float | None
    abort_s_p50: float | None
    abort_s_max: float | None
    idle_s_max: float | None
    unsettled_waves: int
    wall_s: float
    waves: tuple[Wave, ...]  # the JSON's detail (per wave: latencies, settling)


def _p50(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def combine(path: str, phase: str, waves: list[Wave], wall_s: float) -> CaseResult:
    routed = path in ROUTER_PATHS
    total = {k: sum(getattr(w, k) for w in waves) for k in (
        "sent", "cancelled", "phase_misses", "completed_early", "errors", "lost", "fillers_lost",
        "router_saw", "router_cancelled_metric", "router_stopped", "engine_aborted", "ran_on",
        "ran_on_tokens", "wasted_tokens",
    )}  # fmt: skip
    if routed:
        client_lost = max(0, total["cancelled"] - total["router_saw"])
        router_lost: int | None = max(0, total["router_stopped"] - total["engine_aborted"])
    else:  # the engine is the server: a cancel it never saw is the frontend's
        client_lost = max(0, total["cancelled"] - total["engine_aborted"])
        router_lost = None
    abort_s = [x for w in waves for x in w.abort_s]
    idle = [w.idle_s for w in waves if w.idle_s is not None]
    return CaseResult(
        path=path,
        phase=phase,
        sent=total["sent"],
        cancelled=total["cancelled"],
        phase_misses=total["phase_misses"],
        completed_early=total["completed_early"],
        errors=total["errors"],
        lost=total["lost"] + total["fillers_lost"],
        router_saw=total["router_saw"] if routed else None,
        router_cancelled_metric=total["router_cancelled_metric"] if routed else None,
        router_stopped=total["router_stopped"] if routed else None,
        router_faults=tuple(r for w in waves for r in w.router_faults),
        engine_aborted=total["engine_aborted"],
        ran_on=total["ran_on"],
        lost_client_to_server=client_lost,
        lost_router_to_engine=router_lost,
        ran_on_tokens=total["ran_on_tokens"],
        wasted_tokens=round(total["wasted_tokens"], 1),
        router_seen_s_p50=_p50([x for w in waves for x in w.router_seen_s]),
        abort_s_p50=_p50(abort_s),
        abort_s_max=max(abort_s) if abort_s else None,
        idle_s_max=max(idle) if idle else None,
        unsettled_waves=sum(not w.settled for w in waves),
        wall_s=round(wall_s, 2),
        waves=tuple(waves),
    )


class Bench:
    def __init__(self, a: argparse.Namespace, server: TritonServer, openai_url: str | None) -> None:
        self.a, self.server = a, server
        self.clients = Clients(server.grpc_url, server.http_url, openai_url)
        assert server.log_path is not None
        self.log = LogTail(server.log_path)
        self.seq = 0

    def request(self, path: str, phase: str, role: str) -> Request:
        a = self.a
        self.seq += 1
        tokens = a.engine_prompt_tokens if phase == "engine" and role == "test" else a.prompt_tokens
        # Distinct prompts: the engine's prefix cache keys requests by their prompt's head.
        head = f"{role} {self.seq} "
        prompt = head + "x" * max(0, BYTES_PER_TOKEN * tokens - 1 - len(head))
        filler = role == "filler"
        direct = path not in ROUTER_PATHS
        return Request(
            prompt,
            model=None if direct else MODEL,
            slo_class=None if direct else (FILLER_CLASS if filler else a.slo_class),
            max_tokens=a.filler_tokens if filler else a.max_tokens,
            ignore_eos=True,  # a request that runs on runs exactly max_tokens
            router=ENGINE if direct else ROUTER,
        )

    async def counters(self) -> Counters:
        return await asyncio.to_thread(Counters.read, self.server.metrics_url)

    async def wave(self, path: str, phase: str, n: int) -> Wave:
        a = self.a
        routed = path in ROUTER_PATHS
        self.log.skip()
        before = await self.counters()
        fillers: list[Probe] = []
        tasks: list[asyncio.Task[None]] = []
        if phase == "queued":
            # Every seat of the instance taken (through the router's gRPC path, whatever the
            # case's path: the seats are the router's), so the test requests wait in its queue.
            fillers = [Probe("filler") for _ in range(a.wave)]
            tasks += [
                asyncio.create_task(
                    self.clients.run(p, "qlm-grpc", self.request(path, phase, "filler"))
                )
                for p in fillers
            ]
            deadline = time.monotonic() + 30
            while any(p.tokens == 0 and p.end == "open" for p in fillers):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(POLL_S)
        mid = a.mid_tokens if phase == "mid" else None
        probes = [Probe("test", cancel_after_tokens=mid) for _ in range(n)]
        tests = [
            asyncio.create_task(self.clients.run(p, path, self.request(path, phase, "test")))
            for p in probes
        ]
        if phase == "mid":
            # Each client leaves after its tokens; one that never gets them leaves at the bound.
            await asyncio.wait(tests, timeout=a.mid_timeout_s)
        else:
            await asyncio.sleep(a.queued_delay_s if phase == "queued" else a.engine_delay_s)
        for p in probes:
            p.leave.set()
        await asyncio.gather(*tests)
        last_cancel = max((p.cancel_wall for p in probes if p.cancel_wall), default=time.time())
        errors = sum(p.end == "error" for p in [*probes, *fillers])
        settled, idle_s, after = await self.settle(
            before, len(fillers), len(probes), errors, routed, last_cancel
        )
        if phase == "queued":
            idle_s = None  # the engine was busy with the fillers, not with the cancelled requests
        await asyncio.gather(*tasks)  # fillers end by themselves (before the settle does)
        ev = await self.evidence(after, before, routed)
        return self.judge(path, phase, probes, fillers, before, after, ev, idle_s, settled)

    async def settle(
        self,
        before: Counters,
        fillers: int,
        tests: int,
        errors: int,
        routed: bool,
        last_cancel: float,
    ) -> tuple[bool, float | None, Counters]:
        """Wait until every request of the wave has ended where it should: in the router (each
        accepted request ends once) and in the engine (each request it got ends once, aborted or
        finished: one whose cancel was lost runs to its end first). The engine's gauges alone
        cannot say so: the simulated engine pushes them at the end of a step, so a request that
        arrives during a step and is aborted at its end never shows. A request answered with an
        error (none expected) may not have reached the engine: it is not waited for there."""
        a = self.a
        deadline = time.monotonic() + a.settle_timeout_s
        idle_wall: float | None = None
        now_c = before
        while time.monotonic() < deadline:
            now_c = await self.counters()
            finished = (now_c.engine_aborted + now_c.engine_finished_other) - (
                before.engine_aborted + before.engine_finished_other
            )
            if routed:
                # Requests the router dropped while they were queued never reached the engine.
                queued = sum(
                    sid is None for _, sid, _ in LogEvidence.parse(self.log.peek()).router_cancels
                )
                router_done = now_c.router_ended - before.router_ended >= fillers + tests
                engine_done = finished >= fillers + tests - queued - errors
            else:
                router_done, engine_done = True, finished >= tests - errors
            if router_done and engine_done and now_c.engine_busy == 0:
                idle_wall = idle_wall or time.time()
                if time.time() - idle_wall >= a.quiet_s:
                    return True, max(0.0, idle_wall - last_cancel), await self.counters()
            else:
                idle_wall = None
            await asyncio.sleep(POLL_S)
        return False, None, now_c

    async def evidence(self, after: Counters, before: Counters, routed: bool) -> LogEvidence:
        """The wave's log lines; Triton may write them a little after the counters moved."""
        deadline = time.monotonic() + 3.0
        want_aborts = after.engine_aborted - before.engine_aborted
        want_cancels = after.router_cancelled - before.router_cancelled if routed else 0
        while True:
            ev = LogEvidence.parse(self.log.peek())
            enough = len(ev.engine_aborts) >= want_aborts and len(ev.router_cancels) >= want_cancels
            if enough or time.monotonic() > deadline:
                self.log.take()
                return ev
            await asyncio.sleep(0.1)

    def judge(
        self,
        path: str,
        phase: str,
        probes: list[Probe],
        fillers: list[Probe],
        before: Counters,
        after: Counters,
        ev: LogEvidence,
        idle_s: float | None,
        settled: bool,
    ) -> Wave:
        routed = path in ROUTER_PATHS
        left = [p for p in probes if p.end == "cancelled"]
        cancel_walls = [p.cancel_wall for p in left if p.cancel_wall is not None]
        mean_cancel = statistics.fmean(cancel_walls) if cancel_walls else 0.0
        router_cancels = ev.router_cancels if routed else ()
        where = [sid for _, sid, _ in router_cancels]
        misses = phase_miss(phase, left, fillers, where, self.a.mid_tokens)
        stopped = sum(1 for sid in where if sid is not None and sid in ev.router_stops)
        faults = tuple(
            rid for rid, sid, _ in router_cancels if sid is not None and sid not in ev.router_stops
        )
        aborted = round(after.engine_aborted - before.engine_aborted)
        filler_done = [p for p in fillers if p.end == "final"]
        ran_on = max(
            0, round(after.engine_finished_other - before.engine_finished_other) - len(filler_done)
        )
        # The engine counts a request's tokens when it finishes (never an aborted one's): what
        # the fillers did not generate, the requests that ran on did; less what their clients had.
        got = statistics.fmean([p.tokens_at_cancel for p in left]) if left else 0.0
        full = after.engine_tokens - before.engine_tokens - sum(p.tokens for p in filler_done)
        ran_on_tokens = max(0, round(full - ran_on * got))
        # Aborted mid-stream requests decoded from their client's cancel to their abort.
        steps = [s for p in left if (s := p.step_s()) is not None]
        step_s = statistics.median(steps) if steps else None
        abort_s = [max(0.0, t - mean_cancel) for t in ev.engine_aborts] if cancel_walls else []
        decoding = sum(abort_s) / step_s if phase == "mid" and step_s else 0.0
        wasted = ran_on_tokens + decoding
        return Wave(
            sent=len(probes),
            cancelled=len(left),
            phase_misses=misses,
            completed_early=sum(p.end == "final" for p in probes),
            lost=sum(p.end == "lost" for p in probes),
            errors=sum(p.end == "error" for p in probes),
            fillers_lost=sum(p.end not in ("final", "error") for p in fillers),
            router_saw=len(router_cancels),
            router_cancelled_metric=round(after.router_cancelled - before.router_cancelled),
            router_stopped=stopped,
            router_faults=faults,
            engine_aborted=aborted,
            ran_on=ran_on,
            ran_on_tokens=ran_on_tokens,
            wasted_tokens=wasted,
            router_seen_s=tuple(max(0.0, t - mean_cancel) for _, _, t in router_cancels),
            abort_s=tuple(abort_s),
            idle_s=idle_s,
            settled=settled,
        )

    async def case(self, path: str, phase: str) -> CaseResult:
        t0 = time.monotonic()
        waves: list[Wave] = []
        left = self.a.n
        # The queued phase sends its requests at once (they all wait in the router); the engine
        # phases in waves no larger than the instance's seats, so that none waits in the router.
        size = left if phase == "queued" else self.a.wave
        while left > 0:
            k = min(size, left)
            w = await self.wave(path, phase, k)
            waves.append(w)
            left -= k
            print(
                f"  {path:11s} {phase:6s} wave {len(waves)}: {w.cancelled}/{w.sent} cancelled, "
                f"router saw {w.router_saw if path in ROUTER_PATHS else '-'}, engine aborted "
                f"{w.engine_aborted}, ran on {w.ran_on}"
                + ("" if w.settled else ", NOT SETTLED")
                + (f", ROUTER FAULT {list(w.router_faults)}" if w.router_faults else ""),
                file=sys.stderr,
                flush=True,
            )
        return combine(path, phase, waves, time.monotonic() - t0)


def phase_miss(
    phase: str, left: list[Probe], fillers: list[Probe], where: list[str | None], mid_tokens: int
) -> int:
    """Cancelled streams that were not where the case says when their client left.
    mid: fewer than `mid_tokens` tokens. engine: a token already, or the router logged the cancel
    as `queued` (it was not dispatched yet). queued: a token already, or a filler had ended (its
    seat was free, so the request may have been dispatched). The router's line does not tell for
    the queued phase: a frontend that passes the cancel on late lets the router dispatch the
    request first (then the line names a stream)."""
    if phase == "mid":
        return sum(p.tokens_at_cancel < mid_tokens for p in left)
    if phase == "engine":
        return sum(p.tokens_at_cancel > 0 for p in left) + sum(sid is None for sid in where)

    def seat_free(p: Probe) -> bool:
        at = p.cancel_wall or 0.0
        return any(f.tokens == 0 or (f.end_wall is not None and f.end_wall <= at) for f in fillers)

    return sum(p.tokens_at_cancel > 0 or seat_free(p) for p in left)


def cases(a: argparse.Namespace) -> list[tuple[str, str]]:
    return [
        (path, phase)
        for path in a.paths
        for phase in a.phases
        if phase != "queued" or path in ROUTER_PATHS
    ]


# ---------------------------------------------------------------------------------- report
COLUMNS = (  # (header, CaseResult field); docs/benchmarks.md says what each means
    ("path", "path"),
    ("phase", "phase"),
    ("cancelled", "cancelled"),
    ("miss", "phase_misses"),
    ("err", "errors"),
    ("r_saw", "router_saw"),
    ("r_stop", "router_stopped"),
    ("e_abort", "engine_aborted"),
    ("ran_on", "ran_on"),
    ("lost_c>s", "lost_client_to_server"),
    ("lost_r>e", "lost_router_to_engine"),
    ("fault", "router_faults"),
    ("lost_req", "lost"),
    ("waste_tok", "wasted_tokens"),
    ("seen_s", "router_seen_s_p50"),
    ("abort_s", "abort_s_p50"),
    ("abort_max", "abort_s_max"),
    ("idle_s", "idle_s_max"),
)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, tuple | list):
        return str(len(v))
    if isinstance(v, float):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return str(v)


def table(results: list[CaseResult]) -> str:
    """One row per case; text columns left-aligned, figures right-aligned."""
    cells = [[_cell(getattr(r, key)) for _, key in COLUMNS] for r in results]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, (h, _) in enumerate(COLUMNS)]

    def line(values: list[str]) -> str:
        return " ".join(
            v.ljust(w) if i < 2 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    return "\n".join([line([h for h, _ in COLUMNS]), *(line(row) for row in cells)])


def totals(results: list[CaseResult]) -> dict[str, Any]:
    """Cancels lost per hop, over every case that has the hop."""

    def share(lost: int, of: int) -> dict[str, Any]:
        return {"lost": lost, "of": of, "rate": lost / of if of else None}

    out: dict[str, Any] = {}
    for path in PATHS:
        mine = [r for r in results if r.path == path]
        if mine:
            out[f"client_to_server/{path}"] = share(
                sum(r.lost_client_to_server for r in mine), sum(r.cancelled for r in mine)
            )
    routed = [r for r in results if r.router_stopped is not None]
    if routed:
        out["router_to_engine"] = share(
            sum(r.lost_router_to_engine or 0 for r in routed),
            sum(r.router_stopped or 0 for r in routed),
        )
    out["ran_on"] = sum(r.ran_on for r in results)
    out["wasted_tokens"] = round(sum(r.wasted_tokens for r in results), 1)
    out["router_faults"] = sum(len(r.router_faults) for r in results)
    out["lost_requests"] = sum(r.lost for r in results)
    return out


# ---------------------------------------------------------------------------------- main
def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {','.join(choices)}")
        return items

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlm-bench cancel", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20, help="cancelled streams per case")
    p.add_argument("--paths", type=_csv(PATHS), default=list(PATHS), help=",".join(PATHS))
    p.add_argument("--phases", type=_csv(PHASES), default=list(PHASES), help=",".join(PHASES))
    p.add_argument(
        "--wave",
        type=int,
        default=10,
        help="the instance's seats (max_in_flight); streams per wave",
    )
    p.add_argument("--mid-tokens", type=int, default=4, help="mid phase: leave after N tokens")
    p.add_argument("--max-tokens", type=int, default=128, help="of a test request")
    p.add_argument("--filler-tokens", type=int, default=120, help="of a queued phase's filler")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument(
        "--engine-prompt-tokens",
        type=int,
        default=3000,
        help="engine phase: a prompt whose prefill outlasts the client (A10: ~0.5 s each)",
    )
    p.add_argument("--engine-delay-s", type=float, default=0.4, help="engine phase: leave after")
    p.add_argument("--queued-delay-s", type=float, default=0.5, help="queued phase: leave after")
    p.add_argument("--mid-timeout-s", type=float, default=20.0)
    p.add_argument("--slo-class", default="batch-1", help="of the test requests (router paths)")
    p.add_argument("--settle-timeout-s", type=float, default=30.0)
    p.add_argument("--quiet-s", type=float, default=0.3, help="settled this long to end a wave")
    p.add_argument("--out", type=Path, help="JSON with the full numbers")
    p.add_argument(
        "--model-repository",
        type=Path,
        default=ROOT / "model_repository",
        help=f"copied, with its fleet cut to {ENGINE} (default: the checkout's)",
    )
    p.add_argument(
        "--workdir", type=Path, help="where the repository copy and the logs go (default: /tmp)"
    )
    return p


async def _run(
    a: argparse.Namespace, server: TritonServer, openai_url: str | None
) -> list[CaseResult]:
    bench = Bench(a, server, openai_url)
    results: list[CaseResult] = []
    try:
        todo = cases(a)
        for k, (path, phase) in enumerate(todo, 1):
            print(f"case {k}/{len(todo)}: {path} {phase}", file=sys.stderr, flush=True)
            results.append(await bench.case(path, phase))
            if server.crash_report():
                break
    finally:
        await bench.clients.close()
    return results


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.n < 1 or a.wave < 1 or a.mid_tokens < 1 or a.mid_tokens >= a.max_tokens:
        print(
            "qlm-bench cancel: need --n, --wave >= 1 and 1 <= --mid-tokens < --max-tokens",
            file=sys.stderr,
        )
        return 2
    if a.workdir is not None:
        a.workdir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="qlm-bench-cancel-", dir=a.workdir))
    loads = build_repository(base / "repo", a.wave, a.model_repository)
    server = TritonServer(
        base / "repo",
        load_models=loads,
        log_path=base / "server.log",
        exit_on_error=True,  # a model that fails to load ends the start at once
        admin_key=secrets.token_urlsafe(24),  # restricted, as qlm-serve runs it
    )
    print(
        f"cancel bench: cases {len(cases(a))} x {a.n} streams; server log {server.log_path}",
        file=sys.stderr,
    )
    front = None
    try:
        server.start(timeout_s=180)
        openai_url = None
        if "openai" in a.paths:
            front, openai_url = start_openai(
                base / "repo", server.grpc_url, base / "qlm-openai.log"
            )
        t0 = time.monotonic()
        results = asyncio.run(_run(a, server, openai_url))
        wall_s = time.monotonic() - t0
        crashed = server.crash_report()
    except (RuntimeError, TimeoutError) as e:
        print(f"qlm-bench cancel: cannot run: {e}", file=sys.stderr)
        return 2
    finally:
        stop_group(front)
        server.stop()
    sums = totals(results)
    out = {
        "bench": "cancel",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "engine": ENGINE,
        "wall_s": wall_s,
        "server_crash": crashed,
        "cases": [asdict(r) for r in results],
        "totals": sums,
        "server_log": str(server.log_path),
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(table(results))
    lost_hops = "; ".join(
        f"{k} {v['lost']}/{v['of']}" for k, v in sums.items() if isinstance(v, dict) and v["of"]
    )
    print(
        f"cancel bench ({len(results)} cases, {wall_s:.0f} s): cancels lost {lost_hops}; ran on "
        f"{sums['ran_on']}, wasted {sums['wasted_tokens']:g} tokens; router faults "
        f"{sums['router_faults']}, lost requests {sums['lost_requests']}"
    )
    unsettled = sum(r.unsettled_waves for r in results)
    for r in results:
        if r.router_saw is not None and r.router_saw != r.router_cancelled_metric:
            # The log lines are the evidence per hop; the counter says whether one was missed.
            print(
                f"warning: {r.path}/{r.phase}: the router logged {r.router_saw} cancels but counted "
                f'{r.router_cancelled_metric} (qlm_requests_total{{outcome="cancelled"}})'
            )
    for r in results:
        if r.router_faults:
            print(
                f"ROUTER FAULT: {r.path}/{r.phase}: the router saw the cancel of {list(r.router_faults)} "
                f"on a stream and did not stop it (log: {server.log_path})"
            )
    if crashed:
        print(f"INVALID RUN: {crashed}")
    if unsettled:
        print(f"INVALID RUN: {unsettled} wave(s) never settled (log: {server.log_path})")
    bad = sums["router_faults"] or sums["lost_requests"] or crashed or unsettled
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
