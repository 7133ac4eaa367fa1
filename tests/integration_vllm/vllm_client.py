"""A small tritonclient gRPC client for the real-engine tests: one stream per request, replies
timed as they arrive."""

from __future__ import annotations

import json
import queue
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

ENGINE = "tiny-llama__cpu-0"


@dataclass
class Reply:
    t: float  # seconds since the request was sent
    outputs: dict[str, Any]
    final: bool


@dataclass
class Result:
    replies: list[Reply]
    error: str | None

    def text(self) -> str:
        return "".join(
            r.outputs["text_output"][0].decode("utf-8", "replace")
            for r in self.replies
            if "text_output" in r.outputs
        )

    @property
    def first_token_s(self) -> float:
        return self.replies[0].t


ALL_OUTPUTS = (
    "text_output",
    "finish_reason",
    "cumulative_logprob",
    "logprobs",
    "num_input_tokens",
    "num_output_tokens",
)


def make_inputs(
    prompt: str,
    stream: bool,
    sampling: dict[str, Any] | None = None,
    priority: int | None = None,
    **flags: bool,
) -> list[grpcclient.InferInput]:
    ins = []

    def add(name: str, arr: np.ndarray, dt: str) -> None:
        t = grpcclient.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr)
        ins.append(t)

    add("text_input", np.array([prompt.encode()], dtype=np.object_), "BYTES")
    add("stream", np.array([stream]), "BOOL")
    if sampling is not None:
        add(
            "sampling_parameters",
            np.array([json.dumps(sampling).encode()], dtype=np.object_),
            "BYTES",
        )
    for k, v in flags.items():
        add(k, np.array([v]), "BOOL")
    if priority is not None:
        add("priority", np.array([priority], dtype=np.int32), "INT32")
    return ins


class Stream:
    """One gRPC bidirectional stream carrying one request; replies are collected as they come."""

    def __init__(
        self,
        url: str,
        inputs: list[grpcclient.InferInput],
        outputs: tuple[str, ...] = ("text_output",),
        parameters: dict[str, Any] | None = None,
        model: str = ENGINE,
        send: bool = True,
    ) -> None:
        self.q: queue.Queue[tuple[Any, Any, float]] = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=self._cb)
        self.outputs = outputs
        self._request = (model, inputs, parameters)
        self.t0 = 0.0
        if send:
            self.send()

    def send(self) -> None:
        """Sends the request (connecting takes time on a busy machine: a caller that needs several
        requests to arrive together connects them all first, then sends)."""
        model, inputs, parameters = self._request
        self.t0 = time.monotonic()
        self.client.async_stream_infer(
            model,
            inputs,
            outputs=[grpcclient.InferRequestedOutput(o) for o in self.outputs],
            parameters=parameters,
            enable_empty_final_response=True,
        )

    def _cb(self, result: Any, error: Any) -> None:
        self.q.put((result, error, time.monotonic()))

    def next(self, timeout: float = 60) -> Reply | str:
        r, e, t = self.q.get(timeout=timeout)
        if e is not None:
            return str(e)
        final = r.get_response().parameters["triton_final_response"].bool_param
        outs = {o: r.as_numpy(o) for o in self.outputs if r.as_numpy(o) is not None}
        return Reply(t - self.t0, outs, final)

    def collect(self, timeout: float = 120) -> Result:
        replies: list[Reply] = []
        try:
            while True:
                r = self.next(timeout)
                if isinstance(r, str):
                    return Result(replies, r)
                if r.outputs:
                    replies.append(r)
                if r.final:
                    return Result(replies, None)
        finally:
            self.close()

    def cancel(self) -> None:
        self.client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def generate(
    url: str,
    prompt: str,
    stream: bool,
    sampling: dict[str, Any] | None = None,
    *,
    outputs: tuple[str, ...] = ("text_output",),
    parameters: dict[str, Any] | None = None,
    priority: int | None = None,
    **flags: bool,
) -> Result:
    return Stream(
        url, make_inputs(prompt, stream, sampling, priority, **flags), outputs, parameters
    ).collect()
