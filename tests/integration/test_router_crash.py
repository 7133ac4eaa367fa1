"""The router's own crash (issue 18 item 2): SIGKILL of the `qlm` stub under `qlm-serve` while 20
streams are in flight (some queued in the router, some streaming from engines).

Checked: the engines stop the orphaned work within ENGINES_IDLE_S; the supervisor in qlm-serve
notices, the router's readiness (and the server's) turns false, the router is loaded again by itself
and serves a new request; its metrics carry on cleanly (one family each, counters consistent, the
queue gauges the new router's). The OpenAI endpoint's streams (qlm-openai, started by qlm-serve)
each end with an explicit error event within OPENAI_ERROR_S of the kill (its router client watches
the router's readiness). The Triton clients' orphaned streams end explicitly or stay silent: none
ends as if complete. Triton 2.51 cannot end them (docs/triton-vllm-facts.md section 8: their
response factories are never released, the unload and the load do not touch them), so each client
bounds its own wait and cancels; the test checks that the cancel is clean. Three more Triton
streams go through `qlm-client` with heartbeats (`qlm_heartbeat_s`; asyncio gRPC, sync gRPC, sync
HTTP): they end with outcome `lost` (status SILENT) within HEARTBEAT_LOST_S of the kill instead of
hanging.

Runs the real `qlm-serve` on a copy of the shipped repository, its instances capped at 4 requests
each (12 streaming, the rest queued in the router), in real time (time_scale 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tritonclient.grpc.aio as grpcaio
from conftest import ADMIN_KEY, REPO
from streams import TimedStream, metric_value, timed_stream

from qlm_backend.client import AsyncGrpcClient, GrpcClient, HttpClient, Request, Result
from qlm_backend.triton.server import free_port
from qlm_backend.triton.supervisor import stub_pids

pytestmark = pytest.mark.timeout(120)

ROUTER = "qlm"
ENGINES = ("mistral-7b__a10-0", "mistral-7b__a10-1", "llama-2-13b__a100-0")
N_GRPC, N_SSE, N_OPENAI = 14, 4, 2
HEARTBEAT_CLIENTS = ("asyncio-grpc", "grpc", "http")  # further streams: qlm-client, heartbeats
N_HEARTBEAT = len(HEARTBEAT_CLIENTS)
HEARTBEAT_S = 0.5
# ~10 s of generation at the simulated A10's ~30 tokens/s: nothing completes before the kill.
MAX_TOKENS = 300
# The supervisor checks the stub's pid every 0.1 s and unloads with one local HTTP call; 1 s
# leaves room for a loaded 2-core machine (measured: 0.09-0.10 s).
DETECT_S = 1.0
# The 1 s hold-down plus the router's load: 0.2-0.5 s here, but a new stub imports the router's
# code first, and this shared 2-core VM runs other suites at the same time (one run here, beside
# two other suites, did not see the router back within 10 s; its cause was not captured, the
# failure message now carries qlm-serve's log). The time measured is printed.
BACK_S = 30.0
# The dead stub's gRPC connection to the engines closes with its process: Triton cancels the
# engines' requests, and the simulated engine polls cancellation every 50 ms (measured: 0.05 s).
ENGINES_IDLE_S = 2.0
# How long the orphaned streams are watched after the kill before their clients give up.
WATCH_S = 4.0
# qlm-openai's router client polls readiness every 0.25 s and needs two "not ready" answers: the
# supervisor's unload (DETECT_S) plus 0.5 s, with room for a loaded machine.
OPENAI_ERROR_S = 3.0
# qlm-client gives up after 3 heartbeats missed (1.5 s from the last response before the kill).
HEARTBEAT_LOST_S = 3.0


def get(url: str, timeout_s: float = 2.0) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (OSError, http.client.HTTPException) as e:
        return None, repr(e)


def group_of(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def child_named(parent: int, name: str) -> int | None:
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and name.encode() in (entry / "cmdline").read_bytes():
                return int(entry.name)
    return None


@dataclass
class Serve:
    """`qlm-serve` (with qlm-openai) on free ports; stopped by process group (its own and
    Triton's, qlm-openai being in qlm-serve's)."""

    base: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    triton_pid: int | None = None

    @property
    def out(self) -> Path:
        return self.base / "qlm-serve.out"

    def url(self, port: str) -> str:
        return f"127.0.0.1:{self.ports[port]}"

    def start(self, repo: Path, timeout_s: float = 120.0) -> None:
        self.ports = {p: free_port() for p in ("http", "grpc", "metrics", "openai")}
        cmd = [sys.executable, "-m", "qlm_backend.triton.launcher"]
        cmd += ["--model-repository", str(repo), "--admin-key", ADMIN_KEY]
        cmd += ["--log-file", str(self.base / "server.log")]
        for p, port in self.ports.items():
            cmd += [f"--{p}-port", str(port)]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while "QLM is ready" not in self.out.read_text(errors="replace"):
            assert self.proc.poll() is None, f"qlm-serve exited:\n{self.out.read_text()}"
            assert time.monotonic() < deadline, f"qlm-serve not ready:\n{self.out.read_text()}"
            time.sleep(0.2)
        self.triton_pid = child_named(self.proc.pid, "tritonserver")
        assert self.triton_pid is not None

    def stop(self) -> None:
        """SIGKILL both groups. A graceful stop after a router crash waits Triton's whole exit
        timeout (30 s): the dead router's model never finishes unloading (facts, section 8)."""
        for pgid in (self.triton_pid, self.proc.pid if self.proc else None):
            if pgid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)
            # qlm-serve's TritonServer names the Python backend's shared memory after its pid.
            for leftover in Path("/dev/shm").glob(f"qlm{self.proc.pid}_*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        deadline = time.monotonic() + 10
        while self.triton_pid and group_of(self.triton_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.triton_pid or group_of(self.triton_pid) == [], "processes left behind"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo)
    fleet = json.loads((repo / "fleet.json").read_text())
    for inst in fleet["instances"]:
        inst["max_in_flight"] = 4  # 3 instances: 12 of the 20 stream, 8 wait in the router
    (repo / "fleet.json").write_text(json.dumps(fleet))
    s = Serve(tmp_path)
    try:
        s.start(repo)
        yield s
    finally:
        s.stop()


def fields(max_tokens: int, slo_class: str, text: str) -> dict:
    return {
        "text_input": text,
        "model": "mistral-7b",
        "slo_class": slo_class,
        "stream": True,
        "sampling_parameters": json.dumps({"max_tokens": max_tokens, "ignore_eos": True}),
        "return_num_output_tokens": True,
        "return_finish_reason": True,
    }


@dataclass
class SseStream:
    """One HTTP generate_stream client in a thread; `close()` is the client giving up."""

    events: int = 0
    error: str | None = None
    final: bool = False
    ended: threading.Event = field(default_factory=threading.Event)
    conn: http.client.HTTPConnection | None = None

    def run(self, url: str, body: dict) -> None:
        host, port = url.split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            self.conn.request("POST", f"/v2/models/{ROUTER}/generate_stream", json.dumps(body))
            r = self.conn.getresponse()
            while line := r.readline():
                if not line.startswith(b"data:"):
                    continue
                ev = json.loads(line[5:])
                if "error" in ev:
                    self.error = ev["error"]
                    return
                self.events += 1
                if ev.get("finish_reason") not in (None, "None", ""):
                    self.final = True
                    return
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.error = self.error or f"client: {e!r}"
        finally:
            self.ended.set()

    def close(self) -> None:
        if self.conn is not None and self.conn.sock is not None:
            with contextlib.suppress(OSError):
                self.conn.sock.shutdown(socket.SHUT_RDWR)


@dataclass
class OpenAiStream:
    """One streamed chat completion through qlm-openai, read in a thread."""

    chunks: int = 0
    status: int | None = None
    error: str | None = None
    error_at: float | None = None
    done: bool = False
    ended: threading.Event = field(default_factory=threading.Event)

    def run(self, url: str, text: str) -> None:
        host, port = url.split(":")
        body = {
            "model": "mistral-7b",
            "messages": [{"role": "user", "content": text}],
            "stream": True,
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
        }
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                json.dumps(body),
                {"Content-Type": "application/json", "x-slo-class": "batch-2"},
            )
            r = conn.getresponse()
            self.status = r.status
            if r.status != 200:  # the error came before the first token: no stream began
                self.error, self.error_at = r.read().decode(errors="replace"), time.monotonic()
                return
            while line := r.readline():
                if line.startswith(b"data: [DONE]"):
                    self.done = True
                    return
                if not line.startswith(b"data:"):
                    continue
                ev = json.loads(line[5:])
                if "error" in ev:
                    self.error, self.error_at = str(ev["error"]), time.monotonic()
                    continue
                self.chunks += 1
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.error = self.error or f"client: {e!r}"
        finally:
            conn.close()
            self.ended.set()


class Readiness(threading.Thread):
    """Polls the router's and the server's readiness every 20 ms; keeps each change."""

    def __init__(self, http_url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.halt = http_url, threading.Event()
        self.changes: list[tuple[float, int | None, int | None]] = []

    def run(self) -> None:
        while not self.halt.is_set():
            model = get(f"http://{self.url}/v2/models/{ROUTER}/ready", 1.0)[0]
            server = get(f"http://{self.url}/v2/health/ready", 1.0)[0]
            if not self.changes or self.changes[-1][1:] != (model, server):
                self.changes.append((time.monotonic(), model, server))
            time.sleep(0.02)


def metric_families(text: str) -> list[str]:
    return [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE qlm_")]


def total(text: str, name: str, **labels: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


def test_router_stub_killed_with_20_streams_in_flight(serve: Serve):
    http_url, grpc_url, metrics_url, openai_url = (
        serve.url("http"),
        serve.url("grpc"),
        f"http://{serve.url('metrics')}/metrics",
        serve.url("openai"),
    )

    async def scenario() -> dict:
        client = grpcaio.InferenceServerClient(grpc_url)
        # Two short requests first: the router's counters have something to carry across.
        for i in range(2):
            warm = await timed_stream(
                client, ROUTER, fields(3, "interactive", f"w{i}"), TimedStream()
            )
            assert warm.error is None and warm.tokens == 3, warm.error
        before = get(metrics_url)[1]
        # One OpenAI stream first, so that it streams at the kill; the other last, so that it waits
        # in the router's queue then.
        oai = [OpenAiStream() for _ in range(N_OPENAI)]
        threading.Thread(target=oai[0].run, args=(openai_url, "o0"), daemon=True).start()
        while not oai[0].chunks:
            assert not oai[0].ended.is_set(), oai[0]
            await asyncio.sleep(0.05)
        grpc = [TimedStream() for _ in range(N_GRPC)]
        tasks = [
            asyncio.create_task(
                timed_stream(client, ROUTER, fields(MAX_TOKENS, "batch-2", f"g{i}"), s)
            )
            for i, s in enumerate(grpc)
        ]
        sse = [SseStream() for _ in range(N_SSE)]
        for i, h in enumerate(sse):
            body = fields(MAX_TOKENS, "batch-2", f"h{i}")
            threading.Thread(target=h.run, args=(http_url, body), daemon=True).start()
        hb_client = AsyncGrpcClient(grpc_url, timeout_s=120)
        hb = [Result() for _ in range(N_HEARTBEAT)]
        hb_chunks = [0] * N_HEARTBEAT  # text chunks so far (the sync clients' Result comes last)
        hb_end: list[float] = [0.0] * N_HEARTBEAT

        async def with_heartbeats(i: int, kind: str) -> None:
            req = Request(
                f"k{i}", model="mistral-7b", slo_class="batch-2", max_tokens=MAX_TOKENS,
                ignore_eos=True, heartbeat_s=HEARTBEAT_S,
            )  # fmt: skip

            def chunk(_text: str) -> None:
                hb_chunks[i] += 1

            if kind == "asyncio-grpc":
                async for text in hb_client.stream(req, hb[i]):
                    chunk(text)
            else:
                c = GrpcClient(grpc_url, 120) if kind == "grpc" else HttpClient(http_url, 120)
                try:
                    hb[i] = await asyncio.to_thread(c.generate, req, chunk)
                finally:
                    c.close()
            hb_end[i] = time.monotonic()

        hb_tasks = [
            asyncio.create_task(with_heartbeats(i, kind))
            for i, kind in enumerate(HEARTBEAT_CLIENTS)
        ]
        await asyncio.sleep(0.5)
        for i, o in enumerate(oai[1:], start=1):
            threading.Thread(target=o.run, args=(openai_url, f"o{i}"), daemon=True).start()
        # Until every request is either streaming (at most 4 per instance) or queued in the router.
        deadline = time.monotonic() + 20
        while True:
            text = get(metrics_url)[1]
            running = sum(
                metric_value(text, "vllm:num_requests_running", model=e) or 0 for e in ENGINES
            )
            queued = total(text, "qlm_queue_length", router=ROUTER)
            streaming = (
                sum(bool(s.tokens) for s in grpc)
                + sum(bool(h.events) for h in sse)
                + sum(bool(o.chunks) for o in oai)
                + sum(bool(n) for n in hb_chunks)
            )
            n_all = N_GRPC + N_SSE + N_OPENAI + N_HEARTBEAT
            if running + queued == n_all and queued and streaming == running:
                break
            assert time.monotonic() < deadline, f"running {running}, queued {queued}"
            await asyncio.sleep(0.1)
        print(f"at the kill: {running:g} streaming, {queued:g} queued in the router")

        [victim] = stub_pids(group_of(serve.triton_pid or 0), ROUTER)
        watcher = Readiness(http_url)
        watcher.start()
        await asyncio.sleep(0.1)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        # The engines' orphaned work stops.
        while True:
            text = get(metrics_url)[1]
            busy = {
                e: (metric_value(text, "vllm:num_requests_running", model=e) or 0)
                + (metric_value(text, "vllm:num_requests_waiting", model=e) or 0)
                for e in ENGINES
            }
            if not any(busy.values()):
                idle_s = time.monotonic() - killed
                break
            assert time.monotonic() - killed < ENGINES_IDLE_S, f"engines still busy: {busy}"
            await asyncio.sleep(0.05)
        # Snapshot just after the kill: responses already in transit may still land.
        await asyncio.sleep(0.3)
        at_kill = ([s.tokens for s in grpc], [s.events for s in sse])

        # The router goes unready and comes back by itself.
        while not (
            len(watcher.changes) >= 3
            and watcher.changes[-1][1] == 200
            and watcher.changes[-1][0] > killed
        ):
            assert time.monotonic() - killed < BACK_S, (
                f"router not back: {watcher.changes}, killed at {killed}; qlm-serve said:\n"
                + serve.out.read_text(errors="replace")[-3000:]
            )
            await asyncio.sleep(0.02)
        back = time.monotonic()
        fresh = await timed_stream(client, ROUTER, fields(3, "interactive", "after"), TimedStream())
        served_s = time.monotonic() - back

        # The orphaned streams: watched until WATCH_S after the kill, then their clients give up.
        await asyncio.sleep(max(0.0, killed + WATCH_S - time.monotonic()))
        after = ([s.tokens for s in grpc], [s.events for s in sse])
        # An error each stream had before its client gave up (None: none).
        ended = [s.error for s in grpc] + [h.error if h.ended.is_set() else None for h in sse]
        t_cancel = time.monotonic()
        for s in grpc:
            s.cancel()
        for h in sse:
            h.close()
        done, pending = await asyncio.wait(tasks, timeout=5)
        cancel_s = time.monotonic() - t_cancel
        # qlm-client's streams ended by themselves (WATCH_S > HEARTBEAT_LOST_S): nothing to cancel.
        hb_pending = [i for i, t in enumerate(hb_tasks) if not t.done()]
        for t in hb_tasks:
            t.cancel()
        await asyncio.gather(*hb_tasks, return_exceptions=True)
        await hb_client.close()
        sse_left = [i for i, h in enumerate(sse) if not h.ended.wait(5)]
        oai_left = [i for i, o in enumerate(oai) if not o.ended.wait(5)]
        await client.close()
        watcher.halt.set()
        watcher.join(timeout=5)
        return {
            "before": before, "after_metrics": get(metrics_url), "killed": killed,
            "idle_s": idle_s, "changes": watcher.changes, "fresh": fresh, "served_s": served_s,
            "grpc": grpc, "sse": sse, "at_kill": at_kill, "after": after, "ended": ended,
            "pending": pending, "cancel_s": cancel_s, "sse_left": sse_left,
            "oai": oai, "oai_left": oai_left, "hb": hb, "hb_end": hb_end, "hb_pending": hb_pending,
        }  # fmt: skip

    r = asyncio.run(scenario())
    changes = [(t - r["killed"], m, s) for t, m, s in r["changes"]]
    print(f"engines idle {r['idle_s']:.2f} s after the kill; readiness {changes}")

    # Readiness: ready at the kill; both the router's and the server's false within DETECT_S
    # (strict readiness: an unloading model makes the server unready too); ready again.
    assert changes[0][1:] == (200, 200) and changes[0][0] <= 0, changes
    down = [c for c in changes if c[0] > 0 and c[1] != 200]
    assert down and down[0][0] < DETECT_S and down[0][2] != 200, changes
    back_s = next(t for t, m, s in changes if t > down[0][0] and m == 200 and s == 200)
    assert back_s < BACK_S, changes
    print(f"router unready {down[0][0]:.2f} s after the kill, back after {back_s:.2f} s")

    # The router serves again.
    fresh = r["fresh"]
    assert fresh.error is None and fresh.tokens == 3, fresh.error
    print(f"a new request served in {r['served_s']:.2f} s once the router was ready")

    # Through the OpenAI endpoint: an explicit error for every stream, promptly: an error event and
    # [DONE] for the one streaming, HTTP 503 for the one queued (no status was sent yet).
    assert not r["oai_left"], "an OpenAI stream was left hanging"
    streaming, queued = r["oai"]
    assert streaming.status == 200 and streaming.chunks and streaming.done, streaming
    assert queued.status == 503 and not queued.chunks, queued
    for o in r["oai"]:
        assert o.error and "went down" in o.error, o
        assert o.error_at is not None and o.error_at - r["killed"] < OPENAI_ERROR_S, o
    oai_s = [round(o.error_at - r["killed"], 2) for o in r["oai"]]
    print(f"OpenAI streams ended with an error {oai_s} s after the kill")

    # qlm-client with heartbeats: the router's silence tells it the router is gone.
    assert not r["hb_pending"], [vars(h) for h in r["hb"]]
    for h, end in zip(r["hb"], r["hb_end"], strict=True):
        assert (h.outcome, h.status) == ("lost", "SILENT"), h
        assert end - r["killed"] < HEARTBEAT_LOST_S, (end - r["killed"], h)
    hb_s = [round(end - r["killed"], 2) for end in r["hb_end"]]
    print(f"qlm-client streams with heartbeats ended lost (SILENT) {hb_s} s after the kill")

    # The Triton clients' streams: explicit errors, or silent since the kill (Triton 2.51); none
    # complete.
    for s in r["grpc"]:
        assert s.done_s is None, "an orphaned stream ended as if complete"
    assert not any(h.final for h in r["sse"]), "an orphaned SSE stream ended as if complete"
    received = r["at_kill"][0] + r["at_kill"][1]
    later = r["after"][0] + r["after"][1]
    for i, (error, k, a) in enumerate(zip(r["ended"], received, later, strict=True)):
        assert error or k == a, f"stream {i}: no error, yet {a - k} more responses after the kill"
    errors = sum(bool(e) for e in r["ended"])
    print(f"orphaned streams: {errors} ended with an error, {N_GRPC + N_SSE - errors} silent")
    # Giving up is clean: every client's cancel ends its stream at once.
    assert not r["pending"] and not r["sse_left"] and r["cancel_s"] < 5

    # Metrics: one family each, counters carried across (Triton keeps the dead router's families:
    # the reloaded router's same-named series continue them), queue gauges the new router's.
    status, text = r["after_metrics"]
    assert status == 200
    families = metric_families(text)
    assert len(families) == len(set(families)) and families, families
    assert set(families) == set(metric_families(r["before"]))
    key = {"router": ROUTER, "slo_class": "interactive", "outcome": "attained"}
    assert (
        total(text, "qlm_requests_total", **key)
        == total(r["before"], "qlm_requests_total", **key) + 1
    )
    assert total(text, "qlm_queue_length", router=ROUTER) == 0

    # The supervisor said what it did, with timestamps.
    out = serve.out.read_text(errors="replace")
    for what in (
        "died while Triton lists it READY",
        "unloaded: readiness is false",
        "the router is back",
    ):
        assert f"supervisor: {ROUTER}: " in out and what in out, out
    log = (serve.base / "server.log").read_text(errors="replace")
    assert "Segfault encountered" not in log
