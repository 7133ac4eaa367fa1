"""Replays of Azure trace slices through the real vLLM engine (tiny-llama__cpu-0) in a real
tritonserver, timed by the engine itself, and the same arrivals through the simulated engine.

Shared by `qlm-bench fidelity` (sim vs real, one slice or the load sweep) and `qlm-bench
calibrate` (fits the CPU profile on such replays). The real engine is timed on its own
per-request trace (model parameter TRACE_REQUESTS: the glue's arrival, vLLM's scheduler and token
timestamps): what a Python client sees on a busy 2-core machine adds the client's own stalls.
"""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from qlm_backend.engine.perf import PerfModel
from qlm_backend.engine.sim import EngineRequest, SimEngine

ROOT = Path(__file__).resolve().parents[2]
ENGINE = "tiny-llama__cpu-0"
TRACE_NAMES = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}


@dataclass(frozen=True)
class Arrival:
    t_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Outcome:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float  # arrival -> first token
    e2e_s: float  # arrival -> last token
    queue_s: float  # arrival -> first scheduled by the engine


def trace_path(kind: str) -> Path:
    name = TRACE_NAMES[kind]
    for d in (
        ROOT / "qlm_backend" / "data" / "traces",
        ROOT.parent / "shared" / "data" / "azure-llm-2023",
    ):
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(f"trace {name} not found in qlm_backend/data/traces or ../shared/data")


def load_slice(
    path: Path, start: int, n: int, rate: float, token_scale: float, max_prompt: int, max_out: int
) -> list[Arrival]:
    """Rows start..start+n; arrivals rescaled to a mean of `rate` requests/s (the trace's burst
    shape kept), token counts x token_scale, clamped to what the tiny engine's context holds."""
    rows: list[tuple[datetime, int, int]] = []
    with path.open() as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i < start:
                continue
            if len(rows) == n:
                break
            ts = datetime.fromisoformat(row["TIMESTAMP"][:26])
            rows.append((ts, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    t0 = rows[0][0]
    raw = [(r[0] - t0).total_seconds() for r in rows]
    span = raw[-1] or 1.0
    scale = (len(rows) - 1) / rate / span  # compress to the requested mean rate
    return [
        Arrival(
            round(t * scale, 4),
            max(1, min(max_prompt, round(p * token_scale))),
            max(2, min(max_out, round(g * token_scale))),
        )
        for (_, p, g), t in zip(rows, raw, strict=True)
    ]


def rescale(arrivals: list[Arrival], rate: float) -> list[Arrival]:
    """The same requests at another mean rate (the burst shape kept)."""
    span = arrivals[-1].t_s or 1.0
    k = (len(arrivals) - 1) / rate / span
    return [Arrival(round(a.t_s * k, 4), a.prompt_tokens, a.output_tokens) for a in arrivals]


# --- real engine through Triton ------------------------------------------------------------------
async def replay_client(grpc_url: str, arrivals: list[Arrival], salt: int = 0) -> None:
    """Sends the arrivals on their schedule as streaming gRPC requests; waits for every end."""
    import numpy as np
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.grpc import InferInput

    client = grpcaio.InferenceServerClient(grpc_url)

    def inputs(a: Arrival, i: int) -> list[Any]:
        # " the" is one token of the tiny model's BPE; the engine reports the exact count.
        # A request-unique head: vLLM's prefix cache hashes blocks from the start, so prompts
        # that all begin alike were served from cache, unlike a trace's. The salt keeps replays
        # of the same arrivals apart for the cache too.
        head = f"{salt} {i} {i * 7919 % 1009} {i * 104729 % 997}"
        prompt = head + " the" * max(1, a.prompt_tokens - 7)
        sp = json.dumps({"max_tokens": a.output_tokens, "ignore_eos": True})
        vals = [
            ("text_input", np.array([prompt.encode()], dtype=np.object_), "BYTES"),
            ("sampling_parameters", np.array([sp.encode()], dtype=np.object_), "BYTES"),
            ("stream", np.array([True]), "BOOL"),
            ("exclude_input_in_output", np.array([True]), "BOOL"),
        ]
        ins = []
        for name, arr, dt in vals:
            t = InferInput(name, list(arr.shape), dt)
            t.set_data_from_numpy(arr)
            ins.append(t)
        return ins

    async def one(a: Arrival, i: int, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + a.t_s - time.monotonic()))

        async def reqs() -> Any:
            yield {"model_name": ENGINE, "inputs": inputs(a, i)}

        async for result, error in client.stream_infer(reqs()):
            if error is not None:
                raise RuntimeError(f"request failed: {error}")
            if result.get_response().parameters["triton_final_response"].bool_param:
                break

    try:
        t0 = time.monotonic() + 0.2
        await asyncio.gather(*(one(a, i, t0) for i, a in enumerate(arrivals)))
    finally:
        await client.close()


def engine_outcomes(
    log_text: str, arrivals: list[Arrival], since: float = -1.0, until: float = float("inf")
) -> list[Outcome]:
    """The replay's requests as the engine timed them (its trace lines), in arrival order: TTFT
    from the glue's arrival to vLLM's first token, end at vLLM's last token, queueing until vLLM
    first scheduled the request."""
    from qlm_backend.vllm_engine.trace import parse_trace_lines

    rows = sorted(
        (t for t in parse_trace_lines(log_text).values() if since <= t["arrival"] < until),
        key=lambda t: t["arrival"],
    )
    if len(rows) != len(arrivals):
        raise RuntimeError(f"{len(rows)} engine trace lines for {len(arrivals)} requests")
    t0 = rows[0]["arrival"]
    # Requests sent a few ms apart can reach the engine in either order: match each arrival to
    # the unmatched trace line with its output length that arrived closest to its time.
    free = list(rows)
    out = []
    for a in sorted(arrivals, key=lambda x: x.t_s):
        same = [t for t in free if int(t["output_tokens"]) == a.output_tokens]
        if not same:
            raise RuntimeError(f"no engine trace line for {a}")
        t = min(same, key=lambda t: abs(t["arrival"] - t0 - a.t_s))
        free.remove(t)
        out.append(
            Outcome(
                round(t["arrival"] - t0, 4),
                int(t["prompt_tokens"]),
                int(t["output_tokens"]),
                t["engine_first_token"] - t["arrival"],
                t["engine_last_token"] - t["arrival"],
                max(0.0, t["scheduled"] - t["arrival"]),
            )
        )
    return out


class RealEngine:
    """One tritonserver with the real vLLM engine, kept up across replays."""

    def __init__(
        self, venv: Path, model_dir: Path, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.venv, self.model_dir = venv, model_dir
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.load_s = 0.0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: Any = None
        self._salt = 0

    def __enter__(self) -> RealEngine:
        from qlm_backend.triton.server import TritonServer

        self._tmp = tempfile.TemporaryDirectory(prefix="qlm-real-engine-")
        repo = Path(self._tmp.name) / "repo"
        src = ROOT / "model_repository" / ENGINE
        shutil.copytree(src, repo / ENGINE)
        args = json.loads((src / "1" / "model.json").read_text())
        args.update(
            model=str(self.model_dir),
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
        )
        (repo / ENGINE / "1" / "model.json").write_text(json.dumps(args))
        cfg = (repo / ENGINE / "config.pbtxt").read_text()
        cfg = cfg.replace("$$TRITON_MODEL_DIRECTORY/../../.venv-vllm", str(self.venv))
        cfg += '\nparameters { key: "TRACE_REQUESTS" value { string_value: "true" } }\n'
        (repo / ENGINE / "config.pbtxt").write_text(cfg)
        self._log = Path(self._tmp.name) / "triton.log"
        self._server = TritonServer(repo, load_models=[ENGINE], log_path=self._log)
        try:
            self.load_s = self._server.start(timeout_s=300)
            # One request first: the engine's first batches pay one-off costs.
            asyncio.run(replay_client(self._server.grpc_url, [Arrival(0.0, 8, 8)]))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def replay(self, arrivals: list[Arrival]) -> list[Outcome]:
        time.sleep(1.0)  # the engine idle between replays
        self._salt += 1
        start = time.monotonic()
        asyncio.run(replay_client(self._server.grpc_url, arrivals, salt=self._salt))
        time.sleep(0.5)  # trace lines are logged after each final response
        return engine_outcomes(self._log.read_text(errors="replace"), arrivals, start)


# --- simulated engine ----------------------------------------------------------------------------
def run_sim(
    perf: PerfModel,
    arrivals: list[Arrival],
    max_num_seqs: int,
    max_num_batched_tokens: int,
    prompts: list[int] | None = None,
) -> list[Outcome]:
    """The arrivals through SimEngine in virtual time (`prompts`: the exact token counts the real
    engine saw, where it ran)."""
    eng = SimEngine(perf, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    reqs = [
        EngineRequest(
            f"r{i}",
            prompts[i] if prompts else a.prompt_tokens,
            a.output_tokens,
            a.output_tokens,
            0,
            a.t_s,
        )
        for i, a in enumerate(arrivals)
    ]
    first: dict[str, float] = {}
    sched: dict[str, float] = {}
    done: dict[str, float] = {}
    pending = sorted(reqs, key=lambda r: r.arrival_s)
    while len(done) < len(reqs):
        nxt = eng.next_event_s()
        if pending and (nxt is None or pending[0].arrival_s <= nxt):
            r = pending.pop(0)
            eng.add(r, r.arrival_s)
            continue
        assert nxt is not None, "simulated engine stalled"
        for ev in eng.advance(nxt):
            first.setdefault(ev.request_id, ev.time_s)
            if ev.scheduled_s is not None:
                sched[ev.request_id] = ev.scheduled_s
            if ev.finished:
                done[ev.request_id] = ev.time_s
    return [
        Outcome(
            r.arrival_s,
            r.prompt_tokens,
            r.output_tokens,
            first[r.request_id] - r.arrival_s,
            done[r.request_id] - r.arrival_s,
            sched[r.request_id] - r.arrival_s,
        )
        for r in reqs
    ]
