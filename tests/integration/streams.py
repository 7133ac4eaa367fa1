"""Client-side helpers for integration tests: real tritonclient gRPC streams and HTTP SSE."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

BOOL_FIELDS = {
    "stream",
    "exclude_input_in_output",
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
}


def make_inputs(fields: dict[str, Any]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in fields.items():
        if name in BOOL_FIELDS:
            arr = np.array([bool(value)], dtype=bool)
            dtype = "BOOL"
        elif isinstance(value, bool):
            arr, dtype = np.array([value], dtype=bool), "BOOL"
        elif isinstance(value, int):
            arr, dtype = np.array([value], dtype=np.int32), "INT32"
        elif isinstance(value, float):
            arr, dtype = np.array([value], dtype=np.float64), "FP64"
        else:
            raw = value if isinstance(value, bytes) else str(value).encode()
            arr, dtype = np.array([raw], dtype=np.object_), "BYTES"
        inp = grpcclient.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


@dataclass
class StreamResult:
    responses: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(r.get("text_output", "") for r in self.responses)


def _decode(result: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    resp = result.get_response()
    for o in resp.outputs:
        arr = result.as_numpy(o.name)
        if arr is None:
            continue
        if arr.dtype == np.object_:
            out[o.name] = b"".join(arr.reshape(-1)).decode()
        else:
            out[o.name] = arr.reshape(-1).tolist()
    return out


def is_final(result: Any) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


def raw_responses(
    url: str,
    model: str,
    fields: dict[str, Any],
    timeout_s: float = 60.0,
    parameters: dict | None = None,
) -> tuple[list[Any], str | None]:
    """Every response (tritonclient InferResult) of one request over a gRPC stream, up to the one
    with the FINAL flag, and the error if one came instead."""
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    results: list[Any] = []
    try:
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        client.async_stream_infer(
            model, make_inputs(fields), enable_empty_final_response=True, parameters=parameters
        )
        while True:
            result, error = q.get(timeout=timeout_s)
            if error is not None:
                return results, str(error)
            results.append(result)
            if is_final(result):
                return results, None
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def grpc_stream(
    url: str,
    model: str,
    fields: dict[str, Any],
    timeout_s: float = 60.0,
    parameters: dict | None = None,
) -> StreamResult:
    """One request over a gRPC stream; the decoded responses that carry outputs, or the error."""
    results, error = raw_responses(url, model, fields, timeout_s, parameters)
    decoded = (_decode(r) for r in results)
    return StreamResult([d for d in decoded if d], error)


def http_post(url: str, path: str, body: bytes | dict, timeout_s: float = 60.0) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{url}{path}", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sse_events(body: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: ")
    ]


def metric_value(metrics_text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample whose labels include `labels`."""
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


@dataclass
class TimedStream:
    """An asyncio gRPC stream with arrival-relative timings, cancellable from outside."""

    texts: list[str] = field(default_factory=list)
    tokens: int = 0
    first_token_s: float | None = None
    done_s: float | None = None
    error: str | None = None
    final: dict[str, Any] = field(default_factory=dict)
    _it: Any = None

    def cancel(self) -> None:
        if self._it is not None and self.done_s is None:
            self._it.cancel()


async def timed_stream(
    client: Any, model: str, fields: dict[str, Any], out: TimedStream
) -> TimedStream:
    """Send one request on its own stream; record first-token and completion times (monotonic)."""
    import asyncio
    import time

    t0 = time.monotonic()
    done = asyncio.Event()

    async def requests():
        yield {"model_name": model, "inputs": make_inputs(fields)}
        await done.wait()

    out._it = client.stream_infer(inputs_iterator=requests())
    try:
        async for result, error in out._it:
            if error is not None:
                out.error = str(error)
                break
            text = result.as_numpy("text_output")
            n = result.as_numpy("num_output_tokens")
            if text is not None:
                out.texts.append(b"".join(text.reshape(-1)).decode())
            if n is not None:
                out.tokens += int(n.reshape(-1)[0])
                if out.first_token_s is None and int(n.reshape(-1)[0]) > 0:
                    out.first_token_s = time.monotonic() - t0
            fr = result.as_numpy("finish_reason")
            if fr is not None and fr.reshape(-1)[0] not in (b"None", "None"):
                out.final = {k: result.as_numpy(k) for k in ("qlm_queue_s", "qlm_instance")}
                out.done_s = time.monotonic() - t0
                break
    except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - cancelled streams end so
        out.error = out.error or repr(e)
    finally:
        done.set()
    # After the last response, let the server end the call rather than cancel it when the client
    # closes: Triton 2.51 races a cancel against a stream's end (docs/reliability.md).
    try:
        async with asyncio.timeout(5):
            async for _ in out._it:
                pass
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this task is being cancelled, not just the call
    except Exception:  # noqa: BLE001, S110 - a failed or cancelled call has ended too
        pass
    return out
