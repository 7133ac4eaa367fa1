"""The vLLM engine model answers a request cancelled before its first step (no vLLM, no Triton).

A sleep control request that runs in the same loop turn as a generate request's admission cancels
that request's task before its body ever ran; the engine must still answer it (UNAVAILABLE, FINAL).
Unanswered, its response sender also kept the model alive: Triton unloads a model only once every
request it handed over had its last response (docs/engines.md).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from typing import Any

import pytest


class _TritonError(Exception):
    UNAVAILABLE, CANCELLED, INVALID_ARG, INTERNAL, NOT_FOUND = range(5)

    def __init__(self, message: str, code: int = 3) -> None:
        super().__init__(message)
        self.code = code


def _fake_pb_utils() -> types.ModuleType:
    """The few pb_utils names the engine's request path uses, recording what is sent."""
    m = types.ModuleType("triton_python_backend_utils")
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # type: ignore[attr-defined]
    m.TritonError = _TritonError  # type: ignore[attr-defined]
    m.InferenceResponse = lambda output_tensors=None, error=None: {  # type: ignore[attr-defined]
        "outputs": output_tensors,
        "error": error,
    }
    m.Tensor = lambda name, value: (name, value)  # type: ignore[attr-defined]
    return m


@pytest.fixture
def engine_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    for name in ("qlm_backend.triton.glue", "qlm_backend.vllm_engine.model"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import qlm_backend.vllm_engine.model as model

    yield model
    for name in ("qlm_backend.triton.glue", "qlm_backend.vllm_engine.model"):
        sys.modules.pop(name, None)


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, int]] = []
        self.done = threading.Event()

    def send(self, response: Any = None, flags: int = 0) -> None:
        self.sent.append((response, flags))
        if flags:
            self.done.set()

    def is_cancelled(self) -> bool:
        return False


class FakeEngine:
    """vLLM's AsyncLLM as far as a sleep goes; generate() must never be reached here."""

    async def sleep(self, level: int = 1) -> None:
        await asyncio.sleep(0)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a request cancelled before its first step reached vLLM")


class FakeLogger:
    def log_info(self, msg: str) -> None:
        pass

    log_warn = log_error = log_info


def make_engine(model: Any) -> Any:
    """The engine model's state after initialize(), without Triton or vLLM."""
    eng = model.VllmEngineModel.__new__(model.VllmEngineModel)
    eng.name = "tiny__cpu-0"
    eng.logger = FakeLogger()
    eng.engine = FakeEngine()
    eng.metrics = None
    eng.loop = model.LoopThread("test-vllm")
    eng._io = model._IoThread(lambda: None)
    eng._active = {}
    eng._closing = eng._asleep = eng._sleeping_now = False
    eng._waiting = eng._running = 0
    eng._trace = False
    eng._resume = None
    return eng


def test_a_request_cancelled_by_a_sleep_before_its_first_step_gets_unavailable(
    engine_module: Any,
) -> None:
    model = engine_module
    eng = make_engine(model)
    gen_sender, ctl_sender = FakeSender(), FakeSender()
    params = types.SimpleNamespace(prompt="hi", priority=0, stream=True)
    try:
        # One loop turn: the sleep's task is created first, so its first step runs before the
        # generate task's first step and cancels a task whose body has not run yet.
        def same_turn() -> None:
            eng._control_task(ctl_sender, model.Control("sleep"))
            eng._admit(gen_sender, params, object(), "req-1")

        eng.loop.call(same_turn)
        assert gen_sender.done.wait(10), "the cancelled request was never answered"
        assert ctl_sender.done.wait(10)
        [(response, flags)] = gen_sender.sent
        assert flags == 1  # FINAL
        err = response["error"]
        assert err.code == _TritonError.UNAVAILABLE
        assert "put to sleep" in str(err)
        # The counts came down and nothing is held: an unload would not wait for it.
        assert eng._active == {} and eng._waiting == 0
    finally:
        eng.loop.stop()
        eng._io.stop()
