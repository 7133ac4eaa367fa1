"""The executor and its real-time stream driver against fake engines: no Triton, no core planner.

The core is a recorder (the executor's job is to carry out actions and report events, whatever the
policy); the engine server is a fake with a deterministic "model": the next token of a text of n
words is " w<n>", so a resumed request (prompt + text so far) continues exactly where it stopped
and any duplicate or missing token shows in the text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from qlm_backend.contract import ContractError, join_logprobs, logprobs_text, parse_generate
from qlm_backend.core.actions import Evict, KeepWarm, Pull, Reject, Release, SwapModel
from qlm_backend.core.api import parse_fleet
from qlm_backend.router.executor import Executor
from qlm_backend.router.flight import Chunk, Flight
from qlm_backend.router.stall_watch import StallWatch
from qlm_backend.router.stream_driver import EngineError, StreamDriver, WarmMode, engine_fields
from qlm_backend.vllm_engine.control import ControlReply

STEP_S = 0.002  # fake engine's time per token


# ------------------------------------------------------------------ fakes
@dataclass
class RecordingCore:
    """Stands in for QueueManager: records every event the executor reports."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    shed: set[str] = field(default_factory=set)

    def add_request(self, req: Any, now: float) -> Reject | None:
        self.calls.append(("add", req.request_id))
        return Reject(req.request_id, "overloaded") if req.request_id in self.shed else None

    def plan(self, now: float) -> list[Any]:
        return []

    def __getattr__(self, name: str) -> Callable[..., None]:
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args, **_: self.calls.append((name, *args[:-1]))  # drop `now`

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


class FakeStream:
    def __init__(self, server: FakeServer, model: str, fields: Mapping[str, Any], rid: str) -> None:
        self.server, self.model, self.fields, self.request_id = server, model, dict(fields), rid
        self.cancelled = False
        self.produced = 0
        self.stopped = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled = True
        self.stopped.set()

    async def chunks(self) -> AsyncIterator[Chunk]:
        if self.model not in self.server.ready:
            raise EngineError(f"{self.model}: not found", unavailable=True)
        if self.model in self.server.asleep:
            raise EngineError(f"{self.model}: model is asleep", unavailable=True)
        if self.model in self.server.dead:
            msg = f"{self.model}: Stub process '{self.model}_0_0' is not healthy."
            raise EngineError(msg, unavailable=True)
        n0 = len(self.fields["text_input"].split())
        todo = json.loads(self.fields["sampling_parameters"])["max_tokens"]
        for i in range(todo):
            await asyncio.sleep(STEP_S)
            if self.produced == self.server.gate_after:
                await self.server.gate.wait()  # held here until the test lets it go on
            if self.model in self.server.hung:
                await self.stopped.wait()  # its stub died: nothing more, ever (until cancelled)
            if self.cancelled:
                return
            if self.model not in self.server.ready:
                raise EngineError(f"{self.model}: unavailable", unavailable=True)
            self.produced += 1
            # As an engine sees it: its prompt is this stream's text_input, its cumulative
            # log-probability counts this stream's tokens only (-0.5 each).
            extras = {
                "num_input_tokens": np.array([n0], dtype=np.uint32),
                "cumulative_logprob": np.array([-0.5 * self.produced], dtype=np.float32),
            }
            if self.fields.get("return_logprobs"):
                entry = {str(n0 + i): {"logprob": -0.5, "rank": 1, "decoded_token": f" w{n0 + i}"}}
                extras["logprobs"] = np.array([json.dumps([entry]).encode()], dtype=np.object_)
            # An engine that reports its prefix cache does so when asked (a resume).
            cached = None
            if self.fields.get("return_num_cached_tokens"):
                cached = self.server.cached_tokens
            yield Chunk(
                f" w{n0 + i}", 1, "length" if i == todo - 1 else None, extras, cached_tokens=cached
            )


@dataclass
class FakeServer:
    ready: set[str] = field(default_factory=set)
    log: list[tuple[Any, ...]] = field(default_factory=list)
    streams: list[FakeStream] = field(default_factory=list)
    load_s: float = 0.01
    failing_loads: set[str] = field(default_factory=set)
    # Streams stop after this many tokens until `gate` is set: a test acts at an exact point.
    gate_after: int | None = None
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    asleep: set[str] = field(default_factory=set)  # loaded engines put to sleep
    cached_tokens: int = 0  # what its prefix cache reports to a resumed request
    dead: set[str] = field(default_factory=set)  # stub killed: still "ready", fails every request
    hung: set[str] = field(default_factory=set)  # ... and its open streams never answer again
    failing_wakes: set[str] = field(default_factory=set)

    def stream(self, model: str, fields: Mapping[str, Any], request_id: str) -> FakeStream:
        s = FakeStream(self, model, fields, request_id)
        self.streams.append(s)
        self.log.append(("stream", model, request_id))
        return s

    async def load(self, model: str, config: Mapping[str, Any] | None) -> None:
        self.log.append(("load", model, config))
        await asyncio.sleep(self.load_s)
        if model in self.failing_loads:
            raise RuntimeError(f"{model}: load failed")
        self.ready.add(model)
        self.log.append(("loaded", model))

    async def unload(self, model: str) -> None:
        self.log.append(("unload", model))
        self.ready.discard(model)
        self.asleep.discard(model)
        self.dead.discard(model)
        self.hung.discard(model)

    async def wait_unloaded(self, model: str, timeout_s: float) -> float:
        self.log.append(("unloaded", model))
        return 0.0

    async def control(self, model: str, op: str) -> ControlReply:
        self.log.append((op, model))
        if model not in self.ready:
            raise EngineError(f"{model}: not found", unavailable=True)
        if op == "sleep":
            self.asleep.add(model)
        elif op == "wake" and model not in self.failing_wakes:
            self.asleep.discard(model)
        return ControlReply(op, model in self.asleep)  # type: ignore[arg-type]

    async def is_ready(self, model: str) -> bool:
        return model in self.ready

    async def close(self) -> None:
        return None


@dataclass
class FakeClient:
    """A client's response sender: what it received, and whether it went away."""

    responses: list[tuple[str, int, str | None, bool]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    gone: bool = False
    cancelled: bool = False

    def send(self, f: Flight, text: str, num_tokens: int, reason: str | None, final: bool) -> bool:
        if self.gone:
            return False
        self.responses.append((text, num_tokens, reason, final))
        return True

    def error(self, message: str, kind: str) -> None:
        self.errors.append((message, kind))

    def is_cancelled(self) -> bool:
        return self.cancelled

    @property
    def text(self) -> str:
        return "".join(r[0] for r in self.responses)


def gen_params(prompt: str, stream: bool, flags: tuple[str, ...] = (), **sampling: Any) -> Any:
    inputs = {
        "text_input": np.array([prompt.encode()], dtype=np.object_),
        "stream": np.array([stream]),
        **{flag: np.array([True]) for flag in flags},
    }
    return parse_generate(inputs, json.dumps(sampling))


def engine(model: str, instance: str) -> str:
    return f"{model}__{instance}"


def expected_text(prompt: str, n: int) -> str:
    n0 = len(prompt.split())
    return "".join(f" w{n0 + i}" for i in range(n))


class Rig:
    """Executor + stream driver + fake server on one asyncio loop, with a fake clock."""

    def __init__(
        self,
        instances: int = 1,
        initial: str = "m-a",
        backend_config: bool = False,
        warm_mode: WarmMode = "load",
        stall_s: float = 60.0,
    ):
        self.fleet = parse_fleet(
            {
                "instances": [
                    {
                        "instance_id": "i-0" if instances == 1 else "i",
                        "count": instances,
                        "gpu": "A100-80G",
                        "models_allowed": ["mistral-7b", "llama-2-13b"],
                        "initial_model": "mistral-7b",
                    }
                ],
                "warm_slots_per_host": 2,
            }
        )
        self.ids = [s.instance_id for s in self.fleet.instances]
        self.server = FakeServer(ready={engine("mistral-7b", i) for i in self.ids})
        self.core = RecordingCore()
        self.now = 0.0
        self.outcomes: list[tuple[str, str]] = []
        self.driver = StreamDriver(
            lambda iid: self.server,
            engine,
            lambda f, iid, prio: engine_fields(
                f.payload, "".join(f.text), f.tokens_done, prio, ask_cached=True
            ),
            lambda name, iid, warm: (
                {"load_mode": "warm" if warm else "cold"} if backend_config else None
            ),
            lambda: self.now,
            warm_mode=lambda iid: warm_mode,
            retry_s=(0.005, 0.02),
            stall_s=stall_s,
            probe_s=0.2,
        )
        self.ex = Executor(
            self.core,  # type: ignore[arg-type]
            self.driver,
            self.fleet.instances,
            on_outcome=lambda f, o, now: self.outcomes.append((f.rid, o)),
        )
        self.driver.bind(self.ex)

    def admit(
        self,
        rid: str,
        prompt: str = "tell me a story",
        max_tokens: int = 8,
        stream: bool = True,
        model: str = "mistral-7b",
        deadline_s: float = 10.0,
        flags: tuple[str, ...] = (),
    ) -> FakeClient:
        params = gen_params(prompt, stream, flags, max_tokens=max_tokens, ignore_eos=True)
        client = FakeClient()
        f = Flight(
            rid, model, "interactive", self.now, deadline_s, len(prompt.split()), max_tokens,
            stream=stream, payload=params, sink=client,
        )  # fmt: skip
        self.ex.admit(f, _Req(rid), self.now)
        return client

    async def until(self, cond: Callable[[], bool], timeout_s: float = 2.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while not cond():
            if loop.time() > end:
                raise AssertionError("condition not reached")
            await asyncio.sleep(STEP_S / 2)

    async def settle(self, n: int = 5) -> None:
        await asyncio.sleep(STEP_S * n)


@dataclass
class _Req:
    request_id: str


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def pull(rid: str, iid: str = "i-0") -> Pull:
    return Pull(iid, "g", (rid,), 0)


# ------------------------------------------------------------------ tests
def test_a_pulled_request_streams_every_token_then_ends_attained() -> None:
    async def main() -> None:
        rig = Rig()
        client = rig.admit("r1", max_tokens=5)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert client.text == expected_text("tell me a story", 5)
        assert client.responses[-1][2:] == ("length", True)
        assert [r[3] for r in client.responses].count(True) == 1  # one FINAL
        assert rig.outcomes == [("r1", "attained")]
        assert ("on_finished", "r1", 5) in rig.core.calls
        assert rig.ex.counters["attained"] == 1 and rig.ex.counters["pull"] == 1

    run(main())


def test_a_non_streaming_request_gets_one_response_with_the_whole_text() -> None:
    async def main() -> None:
        rig = Rig()
        client = rig.admit("r1", max_tokens=4, stream=False)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert client.responses == [(expected_text("tell me a story", 4), 4, "length", True)]

    run(main())


def test_a_first_token_after_the_deadline_counts_missed() -> None:
    async def main() -> None:
        rig = Rig()
        rig.admit("r1", max_tokens=2, deadline_s=1.0)
        rig.now = 5.0  # the clock the driver stamps events with
        rig.ex.execute(pull("r1"), 5.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert rig.outcomes == [("r1", "missed")]

    run(main())


def test_a_shed_request_gets_an_unavailable_error_and_no_stream() -> None:
    async def main() -> None:
        rig = Rig()
        rig.core.shed.add("r1")
        client = rig.admit("r1")
        assert client.errors == [("request shed: overloaded", "unavailable")]
        assert rig.outcomes == [("r1", "rejected")] and not rig.ex.flights

    run(main())


def test_an_evicted_request_resumes_with_its_text_and_only_the_tokens_still_owed() -> None:
    async def main() -> None:
        rig = Rig()
        rig.server.gate_after = 4
        client = rig.admit("r1", max_tokens=12)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: rig.ex.flights["r1"].tokens_done == 4)
        done = 4
        rig.ex.execute(Evict("r1", "i-0"), 0.0)
        rig.server.gate.set()
        first = rig.server.streams[0]
        assert first.cancelled  # the engine's request stops
        assert ("on_evicted", "r1", done) in rig.core.calls
        await rig.settle()
        assert rig.ex.flights["r1"].tokens_done == done  # the stale stream adds nothing
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        second = rig.server.streams[1]
        assert second.fields["text_input"] == "tell me a story" + expected_text(
            "tell me a story", done
        )
        assert json.loads(second.fields["sampling_parameters"])["max_tokens"] == 12 - done
        # One continuous stream for the client: no duplicate, no gap, exact count.
        assert client.text == expected_text("tell me a story", 12)
        assert sum(r[1] for r in client.responses) == 12
        assert ("on_finished", "r1", 12) in rig.core.calls
        assert rig.ex.flights == {} and rig.outcomes == [("r1", "attained")]

    run(main())


def test_a_resumed_request_tells_the_core_what_its_engine_still_cached() -> None:
    async def main() -> None:
        rig = Rig()
        rig.server.gate_after, rig.server.cached_tokens = 4, 6
        rig.admit("r1", max_tokens=12)  # a prompt of 4 words: 4 "tokens" for the fake
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: rig.ex.flights["r1"].tokens_done == 4)
        rig.ex.execute(Evict("r1", "i-0"), 0.0)
        rig.server.gate.set()
        await rig.settle()
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        first, second = rig.server.streams
        # Only the resume asks (a first dispatch has nothing to find), and it is reported once,
        # against its context: prompt 4 + 4 tokens done.
        assert "return_num_cached_tokens" not in first.fields
        assert second.fields["return_num_cached_tokens"] is True
        reported = [c for c in rig.core.calls if c[0] == "on_resume_cached"]
        assert reported == [("on_resume_cached", "i-0", 6, 8)]
        assert rig.ex.counters["resume_tokens"] == 8
        assert rig.ex.counters["resume_cached_tokens"] == 6

    run(main())


def test_cancel_while_queued_ends_it_with_a_cancelled_error_and_opens_nothing() -> None:
    async def main() -> None:
        rig = Rig()
        client = rig.admit("r1")
        rig.ex.cancel("r1", 0.0)
        await rig.settle()
        assert client.errors == [("Request was cancelled", "cancelled")]
        assert ("on_cancelled", "r1") in rig.core.calls
        assert rig.server.streams == [] and rig.outcomes == [("r1", "cancelled")]

    run(main())


def test_a_pull_cancelled_before_its_dispatch_ran_opens_no_stream() -> None:
    async def main() -> None:
        rig = Rig()
        client = rig.admit("r1")
        rig.ex.execute(pull("r1"), 0.0)  # the driver's task has not run yet
        rig.ex.cancel("r1", 0.0)
        await rig.settle()
        assert rig.server.streams == []
        assert client.errors == [("Request was cancelled", "cancelled")]
        assert client.responses == []

    run(main())


def test_cancel_while_streaming_stops_the_engine_and_sends_nothing_more() -> None:
    async def main() -> None:
        rig = Rig()
        rig.server.gate_after = 2
        client = rig.admit("r1", max_tokens=50)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: len(client.responses) == 2)
        rig.ex.cancel("r1", 0.0)
        rig.server.gate.set()
        n = len(client.responses)
        await rig.settle(10)
        stream = rig.server.streams[0]
        assert stream.cancelled and stream.produced < 50
        assert len(client.responses) == n and not any(r[3] for r in client.responses)
        assert client.errors == [("Request was cancelled", "cancelled")]
        assert rig.outcomes == [("r1", "cancelled")]

    run(main())


def test_a_client_gone_mid_stream_is_cancelled_in_the_engine() -> None:
    async def main() -> None:
        rig = Rig()
        rig.server.gate_after = 1
        client = rig.admit("r1", max_tokens=50)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: len(client.responses) == 1)
        client.gone = True
        rig.server.gate.set()
        await rig.until(lambda: "r1" not in rig.ex.flights)
        await rig.settle()
        assert rig.server.streams[0].cancelled and rig.outcomes == [("r1", "cancelled")]

    run(main())


def test_polling_finds_clients_that_cancelled_queued_or_running() -> None:
    async def main() -> None:
        rig = Rig()
        rig.server.gate_after = 1
        queued, running = rig.admit("q"), rig.admit("r", max_tokens=50)
        rig.ex.execute(pull("r"), 0.0)
        await rig.until(lambda: len(running.responses) == 1)
        queued.cancelled = running.cancelled = True
        rig.ex.poll_cancelled(0.0)
        assert sorted(rig.outcomes) == [("q", "cancelled"), ("r", "cancelled")]
        await rig.settle()
        assert rig.server.streams[0].cancelled

    run(main())


def test_engine_failure_mid_stream_requeues_and_completes_elsewhere_exactly() -> None:
    async def main() -> None:
        rig = Rig(instances=2)
        rig.server.gate_after = 3
        client = rig.admit("r1", max_tokens=12)
        rig.ex.execute(pull("r1", "i-0"), 0.0)
        await rig.until(lambda: rig.ex.flights["r1"].tokens_done == 3)
        rig.server.ready.discard(engine("mistral-7b", "i-0"))  # the engine dies
        rig.server.gate.set()
        await rig.until(lambda: not rig.ex.flights["r1"].streaming)
        assert ("on_engine_failed", "i-0") in rig.core.calls
        assert "r1" in rig.ex.flights and rig.ex.flights["r1"].tokens_done == 3  # queued again
        rig.ex.execute(pull("r1", "i-1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert client.text == expected_text("tell me a story", 12) and not client.errors
        # Recovery reloads the failed instance's model by itself and tells the core.
        await rig.until(lambda: rig.ex.model_of["i-0"] == "mistral-7b")
        assert ("on_model_loaded", "i-0", "mistral-7b") in rig.core.calls
        assert ("load", engine("mistral-7b", "i-0"), None) in rig.server.log

    run(main())


def test_a_non_unavailable_engine_error_fails_the_request_with_its_message() -> None:
    async def main() -> None:
        rig = Rig()
        client = rig.admit("r1")

        async def broken() -> AsyncIterator[Chunk]:
            raise EngineError("mistral-7b__i-0: bad sampling", unavailable=False)
            yield  # pragma: no cover

        orig = rig.server.stream

        def stream(model: str, fields: Mapping[str, Any], rid: str) -> FakeStream:
            s = orig(model, fields, rid)
            s.chunks = broken  # type: ignore[method-assign]
            return s

        rig.server.stream = stream  # type: ignore[method-assign]
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert client.errors == [("mistral-7b__i-0: bad sampling", "internal")]
        assert rig.outcomes == [("r1", "failed")]
        assert "on_engine_failed" not in rig.core.names()

    run(main())


def test_a_stream_that_ended_before_its_eviction_was_processed_is_left_alone() -> None:
    async def main() -> None:
        rig = Rig()
        client = rig.admit("r1", max_tokens=3)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        rig.ex.execute(Evict("r1", "i-0"), 0.0)  # planned before the finish was seen
        await rig.settle()
        assert [r[3] for r in client.responses].count(True) == 1 and not client.errors
        assert "on_evicted" not in rig.core.names()
        assert rig.outcomes == [("r1", "attained")]

    run(main())


def test_swap_unloads_then_loads_and_serves_the_waiting_request_only_once_loaded() -> None:
    async def main() -> None:
        rig = Rig(backend_config=True)
        client = rig.admit("r1", model="llama-2-13b", max_tokens=3)
        rig.ex.execute(SwapModel("i-0", "mistral-7b", "llama-2-13b", warm=False), 0.0)
        assert rig.ex.model_of["i-0"] is None
        rig.ex.execute(pull("r1"), 0.0)  # too early: the instance serves nothing while loading
        assert rig.ex.counters["pull_to_wrong_model"] == 1
        assert ("on_dispatch_failed", ["r1"], "i-0") in rig.core.calls
        await rig.until(lambda: rig.ex.model_of["i-0"] == "llama-2-13b")
        assert rig.server.log == [
            ("unload", "mistral-7b__i-0"),
            ("load", "llama-2-13b__i-0", {"load_mode": "cold"}),
            ("loaded", "llama-2-13b__i-0"),
        ]
        assert ("on_model_loaded", "i-0", "llama-2-13b") in rig.core.calls
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert client.text == expected_text("tell me a story", 3)
        assert rig.ex.counters["swap_model_cold"] == 1

    run(main())


def test_a_swap_is_warm_only_when_the_host_keeps_the_model_warm() -> None:
    async def main() -> None:
        rig = Rig(backend_config=True)
        # The plan claims warm, but nothing put the model in the host's memory: cold, counted.
        rig.ex.execute(SwapModel("i-0", "mistral-7b", "llama-2-13b", warm=True), 0.0)
        await rig.until(lambda: rig.ex.model_of["i-0"] == "llama-2-13b")
        assert rig.ex.counters["warm_flag_mismatch"] == 1
        rig.ex.execute(KeepWarm("mistral-7b", "i-0"), 0.0)
        rig.ex.execute(SwapModel("i-0", "llama-2-13b", "mistral-7b", warm=True), 0.0)
        await rig.until(lambda: rig.ex.model_of["i-0"] == "mistral-7b")
        loads = [e[2] for e in rig.server.log if e[0] == "load"]
        assert loads == [{"load_mode": "cold"}, {"load_mode": "warm"}]
        assert rig.ex.counters["swap_model_warm"] == 1

    run(main())


M, L = "mistral-7b__i-0", "llama-2-13b__i-0"


def test_a_sleeping_engine_swap_puts_the_outgoing_to_sleep_and_wakes_the_incoming() -> None:
    async def main() -> None:
        rig = Rig(warm_mode="sleep")
        # The plan keeps the outgoing model warm (KeepWarm before SwapModel, as the core emits).
        rig.ex.execute(KeepWarm("mistral-7b", "i-0"), 0.0)
        rig.ex.execute(SwapModel("i-0", "mistral-7b", "llama-2-13b", warm=False), 0.0)
        await rig.until(lambda: rig.ex.model_of["i-0"] == "llama-2-13b")
        # llama was never loaded: its first start is a plain (cold) load; no config override.
        assert rig.server.log == [("sleep", M), ("load", L, None), ("loaded", L)]
        assert rig.ex.counters["swap_model_cold"] == 1
        client = rig.admit("r1", model="llama-2-13b", max_tokens=3)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert client.text == expected_text("tell me a story", 3)
        # Back: llama to sleep, mistral woken (no load at all), counted warm.
        del rig.server.log[:]
        rig.ex.execute(KeepWarm("llama-2-13b", "i-0"), 0.0)
        rig.ex.execute(SwapModel("i-0", "llama-2-13b", "mistral-7b", warm=True), 0.0)
        await rig.until(lambda: rig.ex.model_of["i-0"] == "mistral-7b")
        assert rig.server.log == [("sleep", L), ("wake", M)]
        assert rig.ex.counters["swap_model_warm"] == 1
        assert rig.ex.counters["swap_model_cold"] == 1
        assert rig.server.asleep == {L} and rig.driver.asleep == {("i-0", "llama-2-13b")}
        # Counted as what happened, also in the core's measured load costs.
        loaded = [c for c in rig.core.calls if c[0] == "on_model_loaded"]
        assert loaded == [
            ("on_model_loaded", "i-0", "llama-2-13b"),
            ("on_model_loaded", "i-0", "mistral-7b"),
        ]

    run(main())


def test_an_engine_that_does_not_wake_is_loaded_cold_and_counted_cold() -> None:
    async def main() -> None:
        rig = Rig(warm_mode="sleep")
        rig.ex.execute(KeepWarm("mistral-7b", "i-0"), 0.0)
        rig.ex.execute(SwapModel("i-0", "mistral-7b", "llama-2-13b", warm=False), 0.0)
        await rig.until(lambda: rig.ex.model_of["i-0"] == "llama-2-13b")
        rig.server.ready.discard(M)  # the sleeping engine died meanwhile
        del rig.server.log[:]
        rig.ex.execute(SwapModel("i-0", "llama-2-13b", "mistral-7b", warm=True), 0.0)
        await rig.until(lambda: rig.ex.model_of["i-0"] == "mistral-7b")
        # Not kept warm this time (no KeepWarm): llama is unloaded; mistral's wake fails: a load.
        assert rig.server.log == [
            ("unload", L),
            ("unloaded", L),  # fully gone before the incoming engine starts
            ("wake", M),
            ("load", M, None),
            ("loaded", M),
        ]
        assert rig.ex.counters["swap_model_warm"] == 0
        assert rig.ex.counters["swap_model_cold"] == 2

    run(main())


def test_release_unloads_the_sleeping_engine_of_that_model_only() -> None:
    async def main() -> None:
        rig = Rig(warm_mode="sleep")
        rig.ex.execute(KeepWarm("mistral-7b", "i-0"), 0.0)
        rig.ex.execute(SwapModel("i-0", "mistral-7b", "llama-2-13b", warm=False), 0.0)
        await rig.until(lambda: rig.ex.model_of["i-0"] == "llama-2-13b")
        del rig.server.log[:]
        rig.ex.execute(Release("llama-2-13b", "i-0"), 0.0)  # the serving model: left alone
        rig.ex.execute(Release("mistral-7b", "i-0"), 0.0)
        await rig.until(lambda: rig.server.log == [("unload", M)])
        await rig.settle()
        assert rig.server.log == [("unload", M)] and not rig.driver.asleep
        assert rig.server.ready == {L}

    run(main())


def test_recovery_reloads_an_engine_whose_stub_died_although_it_reads_ready() -> None:
    async def main() -> None:
        rig = Rig()
        rig.server.dead.add(M)  # Triton 2.51: the index says READY, every request fails
        client = rig.admit("r1", max_tokens=3)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "on_engine_failed" in rig.core.names())
        await rig.until(lambda: rig.ex.model_of["i-0"] == "mistral-7b")
        assert rig.server.log[-3:] == [("unload", M), ("load", M, None), ("loaded", M)]
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert client.text == expected_text("tell me a story", 3) and not client.errors

    run(main())


def test_recovery_wakes_an_engine_that_is_ready_but_asleep() -> None:
    async def main() -> None:
        rig = Rig(warm_mode="sleep")
        # Left asleep by an earlier router: Triton's index says READY, the engine refuses work.
        rig.server.asleep.add(M)
        client = rig.admit("r1", max_tokens=3)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "on_engine_failed" in rig.core.names())
        await rig.until(lambda: rig.ex.model_of["i-0"] == "mistral-7b")
        assert ("wake", M) in rig.server.log and not rig.server.asleep
        assert not [e for e in rig.server.log if e[0] == "load"]  # no cold reload needed
        assert rig.ex.counters["swap_model_warm"] == rig.ex.counters["swap_model_cold"] == 0
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert client.text == expected_text("tell me a story", 3)

    run(main())


def test_an_engine_without_warm_start_swaps_cold_whatever_the_plan_says() -> None:
    async def main() -> None:
        rig = Rig(warm_mode="none")
        rig.ex.execute(KeepWarm("llama-2-13b", "i-0"), 0.0)  # the host claims it keeps it
        rig.ex.execute(SwapModel("i-0", "mistral-7b", "llama-2-13b", warm=True), 0.0)
        await rig.until(lambda: rig.ex.model_of["i-0"] == "llama-2-13b")
        # A real engine: the incoming one loads only once the outgoing one is fully unloaded.
        assert rig.server.log == [("unload", M), ("unloaded", M), ("load", L, None), ("loaded", L)]
        assert rig.ex.counters["swap_model_cold"] == 1
        assert rig.ex.counters["swap_model_warm"] == 0

    run(main())


def test_a_failed_swap_load_fails_the_instance_and_recovery_retries_until_it_loads() -> None:
    async def main() -> None:
        rig = Rig()
        rig.server.failing_loads.add("llama-2-13b__i-0")
        rig.ex.execute(SwapModel("i-0", "mistral-7b", "llama-2-13b", warm=False), 0.0)
        await rig.until(lambda: "on_engine_failed" in rig.core.names())
        rig.server.failing_loads.clear()  # the next try succeeds
        await rig.until(lambda: rig.ex.model_of["i-0"] == "llama-2-13b")
        assert rig.core.names().count("on_model_loaded") == 1
        assert [e[0] for e in rig.server.log].count("load") >= 2

    run(main())


def test_shutdown_ends_every_request_with_an_unavailable_error() -> None:
    async def main() -> None:
        rig = Rig()
        rig.server.gate_after = 1
        a, b = rig.admit("a"), rig.admit("b", max_tokens=50)
        rig.ex.execute(pull("b"), 0.0)
        await rig.until(lambda: len(b.responses) == 1)
        rig.ex.shutdown(0.0, "unloading")
        await rig.driver.close()
        assert a.errors == [("unloading", "unavailable")] == b.errors
        assert rig.server.streams[0].cancelled and not rig.ex.flights

    run(main())


def test_engine_fields_resume_exactly_and_send_priority_only_when_asked() -> None:
    params = gen_params("hi", False, max_tokens=10, min_tokens=4, temperature=0.5)
    fields = engine_fields(params, " a b c", 3, None)
    sampling = json.loads(fields["sampling_parameters"])
    assert fields["text_input"] == "hi a b c" and fields["stream"] is True
    assert sampling["max_tokens"] == 7 and sampling["min_tokens"] == 1
    assert sampling["temperature"] == 0.5 and "priority" not in fields
    assert engine_fields(params, "", 0, 2)["priority"] == 2
    with pytest.raises(ContractError, match="max_tokens"):
        gen_params("hi", False, max_tokens=0)


def test_a_stream_that_cannot_even_be_built_fails_the_request_loudly() -> None:
    async def main() -> None:
        rig = Rig()
        client = rig.admit("r1")

        def broken(model: str, fields: Mapping[str, Any], rid: str) -> FakeStream:
            raise KeyError("bogus")  # e.g. a field the engine's contract does not have

        rig.server.stream = broken  # type: ignore[method-assign]
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert client.errors == [("internal error: 'bogus'", "internal")]
        assert rig.outcomes == [("r1", "failed")]

    run(main())


async def evict_at_5_and_finish(rig: Rig, rid: str) -> Any:
    """Run `rid`, evict it after 5 tokens, resume it and wait for its end; returns its flight."""
    rig.ex.execute(pull(rid), 0.0)
    await rig.until(lambda: rig.ex.flights[rid].tokens_done == 5)
    rig.ex.execute(Evict(rid, "i-0"), 0.0)
    rig.server.gate.set()
    rig.ex.execute(pull(rid), 0.0)
    f = rig.ex.flights[rid]
    await rig.until(lambda: rid not in rig.ex.flights)
    return f


def test_a_resumed_request_reports_its_first_prompt_count_and_a_running_logprob_sum() -> None:
    async def main() -> None:
        rig = Rig()
        rig.server.gate_after = 5
        rig.admit("r1", prompt="tell me a story", max_tokens=12)
        f = await evict_at_5_and_finish(rig, "r1")
        # The second engine saw 4 + 5 words of prompt and 7 tokens; the client sees the request's.
        assert int(f.extras["num_input_tokens"][0]) == 4
        assert float(f.extras["cumulative_logprob"][0]) == pytest.approx(-0.5 * 12)

    run(main())


def test_a_resumed_non_streaming_request_keeps_every_chunks_logprobs_in_order() -> None:
    # Its one response carries the logprobs of all its tokens (vllm_backend answers a request
    # that is not streamed from a fresh state): the chunks' lists, across the resume.
    async def main() -> None:
        rig = Rig()
        rig.server.gate_after = 5
        rig.admit("r1", max_tokens=12, stream=False, flags=("return_logprobs",))
        f = await evict_at_5_and_finish(rig, "r1")
        joined = json.loads(join_logprobs(logprobs_text(a) for a in f.logprob_parts) or "")
        tokens = [next(iter(e.values()))["decoded_token"] for e in joined]
        assert "".join(tokens) == expected_text("tell me a story", 12)

    run(main())


def test_a_streaming_request_keeps_no_logprobs_parts() -> None:
    async def main() -> None:
        rig = Rig()
        rig.admit("r1", max_tokens=3, flags=("return_logprobs",))
        rig.ex.execute(pull("r1"), 0.0)
        f = rig.ex.flights["r1"]
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert f.logprob_parts == [] and "logprobs" in f.extras

    run(main())


# ------------------------------------------------------------------ the wall deadline
def test_a_request_no_engine_answers_fails_at_its_wall_deadline_and_its_stream_stops() -> None:
    async def main() -> None:
        rig = Rig()
        rig.ex.request_timeout_s = 5.0  # core seconds after arrival
        rig.server.gate_after = 0  # the engine takes the request and never answers
        client = rig.admit("r1", max_tokens=4)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: bool(rig.server.streams))
        rig.ex.step(4.9)
        assert "r1" in rig.ex.flights and not client.errors
        rig.ex.step(5.0)
        assert client.errors == [("request timed out", "unavailable")]
        assert rig.outcomes == [("r1", "failed")] and not rig.ex.flights
        assert rig.ex.counters["timed_out"] == 1 and rig.ex.counters["failed"] == 1
        assert ("on_cancelled", "r1") in rig.core.calls  # the core forgets it
        assert rig.server.streams[0].cancelled  # its engine request is stopped
        rig.server.gate.set()
        await rig.settle(10)
        assert not client.responses and rig.server.streams[0].produced == 0

    run(main())


def test_the_deadline_ends_queued_requests_and_leaves_finished_and_later_ones_alone() -> None:
    async def main() -> None:
        rig = Rig()
        rig.ex.request_timeout_s = 5.0
        rig.ex.timeout_message = "qlm: request timed out: not finished 5 s after receipt"
        queued = rig.admit("q1")  # never pulled
        done = rig.admit("d1", max_tokens=3)
        rig.ex.execute(pull("d1"), 0.0)
        await rig.until(lambda: "d1" not in rig.ex.flights)
        rig.now = 3.0
        later = rig.admit("l1", max_tokens=3)  # its deadline is 8.0
        rig.ex.step(6.0)
        assert queued.errors == [("qlm: request timed out: not finished 5 s after receipt", "unavailable")]  # fmt: skip
        assert not done.errors and done.responses[-1][3]
        assert "l1" in rig.ex.flights and not later.errors
        rig.ex.execute(pull("l1"), 6.0)
        await rig.until(lambda: "l1" not in rig.ex.flights)
        assert later.text == expected_text("tell me a story", 3) and not later.errors
        rig.ex.step(100.0)  # the finished ones' entries expire with nothing to end
        assert sorted(rig.outcomes) == [("d1", "attained"), ("l1", "attained"), ("q1", "failed")]
        assert rig.ex.counters["timed_out"] == 1 and not rig.ex._expiry

    run(main())


def test_without_a_timeout_nothing_expires_and_ended_entries_do_not_pile_up() -> None:
    async def main() -> None:
        rig = Rig()  # request_timeout_s None: the simulator's executor
        rig.admit("r1")
        rig.ex.step(1e12)
        assert "r1" in rig.ex.flights and not rig.ex._expiry
        rig.ex.request_timeout_s = 1e9
        for i in range(5000):  # admitted and cancelled: their entries are compacted away
            rig.admit(f"c{i}")
            rig.ex.cancel(f"c{i}", 0.0)
        assert len(rig.ex._expiry) <= 2 * len(rig.ex.flights) + 1025

    run(main())


def test_a_stub_that_died_under_open_streams_is_found_by_a_probe_and_its_requests_finish() -> None:
    # Triton 2.51: a dead stub's streams never end and its model reads READY; nothing new is sent
    # to it, so only the stall watch's probe (refused: "not healthy") fails the instance.
    async def main() -> None:
        rig = Rig(stall_s=0.1)
        client = rig.admit("r1", max_tokens=12)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: rig.ex.flights["r1"].tokens_done >= 3)
        rig.server.dead.add(M)
        rig.server.hung.add(M)
        await rig.until(lambda: "on_engine_failed" in rig.core.names())
        probes = [e for e in rig.server.log if e[0] == "stream" and "probe" in e[2]]
        assert len(probes) == 1 and rig.driver.stall_probes == 1
        # The hung stream that the probe condemned is cancelled too (it would never end by
        # itself, and the watch would go on probing the instance for it while it reloads).
        hung = next(st for st in rig.server.streams if st.request_id.startswith("r1."))
        await rig.until(lambda: hung.cancelled)
        await rig.until(lambda: not rig.driver.watch.watching)
        await rig.until(lambda: rig.ex.model_of["i-0"] == "mistral-7b")
        assert rig.server.log[-3:] == [("unload", M), ("load", M, None), ("loaded", M)]
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert client.text == expected_text("tell me a story", 12) and not client.errors

    run(main())


def test_a_slow_but_live_engine_answers_the_probe_and_keeps_its_requests() -> None:
    async def main() -> None:
        rig = Rig(stall_s=0.1)
        rig.server.gate_after = 2  # every stream holds after 2 tokens: silent, but alive
        client = rig.admit("r1", max_tokens=6)
        rig.ex.execute(pull("r1"), 0.0)
        await rig.until(lambda: rig.driver.stall_probes >= 2)  # probed, answered, probed again
        assert "on_engine_failed" not in rig.core.names()
        first_probe = next(s for s in rig.server.streams if "probe" in s.request_id)
        assert first_probe.cancelled  # answered, then cancelled: it takes no engine time
        rig.server.gate.set()
        await rig.until(lambda: "r1" not in rig.ex.flights)
        assert client.text == expected_text("tell me a story", 6) and not client.errors

    run(main())


def test_stall_watch_is_due_only_for_silent_instances_with_open_streams() -> None:
    w = StallWatch(stall_s=5.0)
    w.opened("a", 0.0)
    w.opened("b", 0.0)
    w.heard("b", 4.0)
    assert w.due(4.9) == []
    assert w.due(5.0) == ["a"]  # b answered at 4 s
    assert w.due(20.0) == ["b"]  # a is being probed: not due twice
    w.probed("a", 20.0)
    assert w.due(24.0) == []  # its silence counts again from the probe's end
    w.closed("a")
    assert w.due(100.0) == []  # no open stream: nothing to wait for
    w.closed("b")
    assert not w.watching
