"""Pieces every Python-backend model of ours shares: tensors in, errors out, one asyncio loop thread.

Follows the good parts of Triton's vllm_backend: execute() only decodes, validates and enqueues; one
asyncio loop in one thread does the work; every error goes through one helper and always carries
the FINAL flag (an exception escaping a decoupled model is only logged: the client would hang).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Iterable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from qlm_backend.contract import ContractError


def read_inputs(request: Any, names: Iterable[str]) -> dict[str, np.ndarray | None]:
    out: dict[str, np.ndarray | None] = {}
    for name in names:
        t = pb_utils.get_input_tensor_by_name(request, name)
        out[name] = None if t is None else t.as_numpy()
    return out


def error_code(kind: str) -> Any:
    codes = {
        "invalid": "INVALID_ARG",
        "unavailable": "UNAVAILABLE",
        "cancelled": "CANCELLED",
        "internal": "INTERNAL",
        "not_found": "NOT_FOUND",
    }
    return getattr(pb_utils.TritonError, codes[kind])


def send_error(sender: Any, message: str, kind: str = "invalid") -> None:
    """The one way an error leaves our models: a TritonError with a code, and FINAL."""
    err = pb_utils.TritonError(message, error_code(kind))
    try:
        sender.send(
            pb_utils.InferenceResponse(error=err),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )
    except Exception:  # noqa: BLE001 - the sender may be closed (client gone); nothing else to do
        pass


def error_kind(exc: BaseException) -> str:
    return "invalid" if isinstance(exc, ContractError | ValueError) else "internal"


def make_response(arrays: dict[str, np.ndarray]) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()]
    )


def model_dir(args: dict[str, str]) -> str:
    return f"{args['model_repository']}/{args['model_version']}"


def model_config(args: dict[str, str]) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads(args["model_config"])
    return cfg


class LoopThread:
    """One asyncio loop in one daemon thread; coroutines are submitted from execute()."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=timeout_s)


def release_metrics(holder: object) -> None:
    """Drops an object's references to pb_utils metrics and families while the stub still talks to
    Triton (metrics before their families: a family's destructor clears its metrics)."""
    attrs = vars(holder)

    def is_family(v: object) -> bool:
        items = v if isinstance(v, list) else [v]
        return any(isinstance(x, pb_utils.MetricFamily) for x in items)

    for name in [k for k, v in attrs.items() if not is_family(v)]:
        attrs.pop(name)
    attrs.clear()


class Metrics:
    """The vllm: metric families vllm_backend reports, so existing vLLM dashboards read our engines."""

    TTFT_BUCKETS = [
        0.001,
        0.005,
        0.01,
        0.02,
        0.04,
        0.06,
        0.08,
        0.1,
        0.25,
        0.5,
        0.75,
        1.0,
        2.5,
        5.0,
        7.5,
        10.0,
        20.0,
        60.0,
    ]
    # vLLM's (vllm/v1/metrics/loggers.py) for its time-per-output-token histograms.
    TPOT_BUCKETS = [
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0,
    ]  # fmt: skip
    E2E_BUCKETS = [
        0.3,
        0.5,
        0.8,
        1.0,
        1.5,
        2.0,
        2.5,
        5.0,
        10.0,
        15.0,
        20.0,
        30.0,
        40.0,
        50.0,
        60.0,
        120.0,
        300.0,
    ]
    TOKEN_BUCKETS = [1.0, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]

    def __init__(self, model: str, version: str) -> None:
        labels = {"model": model, "version": version}

        self._labels = labels
        # Families are kept referenced: a dropped family unregisters its metrics.
        self._fams: list[Any] = []
        running = pb_utils.MetricFamily(
            name="vllm:num_requests_running",
            description="Number of requests in model execution batches.",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        waiting = pb_utils.MetricFamily(
            name="vllm:num_requests_waiting",
            description="Number of requests waiting to be processed.",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._success = pb_utils.MetricFamily(
            name="vllm:request_success_total",
            description="Count of finished requests by finish reason.",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._fams += [running, waiting, self._success]
        self.running, self.waiting = running.Metric(labels=labels), waiting.Metric(labels=labels)
        self._by_reason: dict[str, Any] = {}
        self._last_load = (-1, -1)
        self.prompt_tokens = self._counter(
            "vllm:prompt_tokens_total", "Number of prefill tokens processed."
        )
        self.generation_tokens = self._counter(
            "vllm:generation_tokens_total", "Number of generation tokens processed."
        )
        self.ttft = self._hist(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            self.TTFT_BUCKETS,
        )
        # One sample per request, that request's mean time per output token: vLLM's
        # vllm:request_time_per_output_token_seconds. Its per-token histograms
        # (vllm:inter_token_latency_seconds, formerly vllm:time_per_output_token_seconds) would
        # take one IPC call per token, so our engines do not export them.
        self.tpot = self._hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            self.TPOT_BUCKETS,
        )
        self.e2e = self._hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            self.E2E_BUCKETS,
        )
        self.req_prompt = self._hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", self.TOKEN_BUCKETS
        )
        self.req_gen = self._hist(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            self.TOKEN_BUCKETS,
        )

    def _counter(self, name: str, desc: str) -> Any:
        fam = pb_utils.MetricFamily(name=name, description=desc, kind=pb_utils.MetricFamily.COUNTER)
        self._fams.append(fam)
        return fam.Metric(labels=self._labels)

    def _hist(self, name: str, desc: str, buckets: list[float]) -> Any:
        fam = pb_utils.MetricFamily(
            name=name, description=desc, kind=pb_utils.MetricFamily.HISTOGRAM
        )
        self._fams.append(fam)
        return fam.Metric(labels=self._labels, buckets=buckets)

    def close(self) -> None:
        """Releases every metric and family now, from finalize(). For the vLLM engine only: left to
        the interpreter's exit there, their destructors ran after the stub's shared memory was gone
        and the 2.51 stub died with SIGSEGV (in MetricFamily::~MetricFamily; at 14 of 20 unloads
        here; 0 of 3 with this). Not for the simulated engine and the router, whose stubs exit
        cleanly as they are: in a stub the Python backend had restarted after a crash, these
        delete requests went unanswered and the unload hung until Triton's 30 s exit timeout."""
        release_metrics(self)

    def set_load(self, running: int, waiting: int) -> None:
        # Gauges are IPC calls: only send changes.
        if (running, waiting) != self._last_load:
            self._last_load = (running, waiting)
            self.running.set(running)
            self.waiting.set(waiting)

    def finished(self, reason: str) -> None:
        m = self._by_reason.get(reason)
        if m is None:
            m = self._by_reason[reason] = self._success.Metric(
                labels={**self._labels, "finished_reason": reason}
            )
        m.increment(1)

    def observe_request(
        self, prompt_tokens: int, output_tokens: int, ttft_s: float | None, e2e_s: float
    ) -> None:
        # TPOT: the request's mean (vllm:request_time_per_output_token_seconds), one IPC call per
        # request rather than per token.
        self.prompt_tokens.increment(prompt_tokens)
        self.generation_tokens.increment(output_tokens)
        self.req_prompt.observe(prompt_tokens)
        self.req_gen.observe(output_tokens)
        self.e2e.observe(e2e_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if output_tokens > 1:
                self.tpot.observe((e2e_s - ttft_s) / (output_tokens - 1))
