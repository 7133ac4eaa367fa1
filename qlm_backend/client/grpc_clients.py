"""gRPC streaming clients, sync and asyncio (tritonclient), one request per stream."""

from __future__ import annotations

import asyncio
import json
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from qlm_backend.client._common import (
    DEFAULT_GRPC_URL,
    Request,
    Result,
    _Accumulator,
    _silent,
    _SyncClient,
    _timed_out,
)
from qlm_backend.contract import router_request_tensors


def grpc_inputs(req: Request, module: Any) -> list[Any]:
    """The request as tritonclient InferInputs (`module`: tritonclient.grpc or .grpc.aio)."""
    fields: dict[str, Any] = {
        "text_input": req.prompt,
        "stream": bool(req.stream),
        "sampling_parameters": json.dumps(req.sampling_dict()),
        "return_num_output_tokens": True,
        "return_finish_reason": True,
        **req.router_fields(),
    }
    inputs = []
    for name, arr, dtype in router_request_tensors(fields):
        inp = module.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def _decode_grpc(result: Any) -> tuple[dict[str, Any], bool]:
    resp = result.get_response()
    out: dict[str, Any] = {}
    for o in resp.outputs:
        arr = result.as_numpy(o.name)
        if arr is None or arr.size == 0:
            continue
        v = arr.reshape(-1)[0]
        out[o.name] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v.item()
    p = resp.parameters
    final = "triton_final_response" in p and p["triton_final_response"].bool_param
    return out, bool(final)


def _grpc_error(e: Any) -> tuple[str, str | None]:
    status = e.status() if hasattr(e, "status") else None
    msg = str(e.message() if hasattr(e, "message") else e)
    if status:
        status = str(status).removeprefix("StatusCode.")
    elif "request shed" in msg:
        # Errors inside a gRPC stream carry only a message; the router sheds with UNAVAILABLE.
        status = "UNAVAILABLE"
    else:
        status = "SERVER_ERROR"
    return msg, status


def _is_connection_error(status: str | None) -> bool:
    # UNAVAILABLE is also how the router sheds, so only a transport failure counts as lost.
    return status in ("DEADLINE_EXCEEDED",)


class GrpcClient(_SyncClient):
    """Synchronous gRPC streaming client; one request at a time per client (tritonclient's rule)."""

    def __init__(self, url: str = DEFAULT_GRPC_URL, timeout_s: float = 600.0) -> None:
        import tritonclient.grpc as grpcclient

        self._mod = grpcclient
        self.url = url
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url)

    def _events(self, req: Request, acc: _Accumulator) -> Iterator[str]:
        q: queue.Queue[tuple[Any, Any]] = queue.Queue()
        try:
            self._client.start_stream(callback=lambda result, error: q.put((result, error)))
            acc.t0 = time.monotonic()
            self._client.async_stream_infer(
                req.router, grpc_inputs(req, self._mod), enable_empty_final_response=True
            )
        except Exception as e:  # noqa: BLE001 - connection refused and the like: no answer at all
            # tritonclient reports the cause through the callback and raises a generic error.
            try:
                _, cause = q.get(timeout=1.0)
            except queue.Empty:
                cause = e
            msg, status = _grpc_error(cause if cause is not None else e)
            acc.fail(msg, status or "CONNECTION", "lost")
            self._stop(cancel=True)
            return
        cancel = True
        try:
            deadline = time.monotonic() + self.timeout_s
            silence = req.silence_s
            while True:
                left = max(0.0, deadline - time.monotonic())
                try:
                    result, error = q.get(timeout=left if silence is None else min(left, silence))
                except queue.Empty:
                    if silence is not None and silence < left:
                        _silent(acc, silence)
                    else:
                        _timed_out(acc, self.timeout_s)
                    return
                if error is not None:
                    msg, status = _grpc_error(error)
                    acc.fail(msg, status, "lost" if _is_connection_error(status) else "error")
                    cancel = False
                    return
                out, final = _decode_grpc(result)
                text = acc.add(out) if out else ""
                if text:
                    yield text
                if final:
                    acc.complete()
                    cancel = False
                    return
        finally:
            # An abandoned iteration (the caller stopped reading) cancels the request server-side.
            self._stop(cancel=cancel)
            if acc.r.total_s == 0.0:
                acc.fail("the caller stopped reading the stream", "CANCELLED", "error")

    def _stop(self, cancel: bool) -> None:
        try:
            self._client.stop_stream(cancel_requests=cancel)
        except Exception:  # noqa: BLE001, S110 - a dead stream has nothing to stop
            pass

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGrpcClient:
    """asyncio gRPC client: many concurrent requests over one channel, each on its own stream."""

    def __init__(self, url: str = DEFAULT_GRPC_URL, timeout_s: float = 600.0) -> None:
        import tritonclient.grpc.aio as grpcaio

        self._mod = grpcaio
        self.url = url
        self.timeout_s = timeout_s
        self._client = grpcaio.InferenceServerClient(url)

    async def stream(self, req: Request, result: Result | None = None) -> AsyncIterator[str]:
        """Text chunks as they arrive; pass `result` to read the outcome when the iteration ends."""
        acc = _Accumulator()
        if result is not None:
            acc.r = result
        done = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": req.router,
                "inputs": grpc_inputs(req, self._mod),
                "enable_empty_final_response": True,
            }
            await done.wait()  # the stream stays open until the request has ended

        it = self._client.stream_infer(inputs_iterator=requests())
        loop = asyncio.get_running_loop()
        timed_out = silent = False

        def on_timeout() -> None:
            nonlocal timed_out
            timed_out = True
            it.cancel()

        def on_silence() -> None:
            nonlocal silent
            silent = True
            it.cancel()

        timer = loop.call_later(self.timeout_s, on_timeout)
        silence = req.silence_s
        watch = None if silence is None else loop.call_later(silence, on_silence)
        finished = False

        def ended_by_a_timer() -> bool:
            """Our own timers cancel the call: say which, if one did."""
            if silent and silence is not None:
                _silent(acc, silence)
            elif timed_out:
                _timed_out(acc, self.timeout_s)
            return silent or timed_out

        try:
            async for res, error in it:
                if watch is not None and silence is not None:
                    watch.cancel()
                    watch = loop.call_later(silence, on_silence)
                if error is not None:
                    msg, status = _grpc_error(error)
                    acc.fail(msg, status, "lost" if _is_connection_error(status) else "error")
                    finished = True
                    return
                out, final = _decode_grpc(res)
                text = acc.add(out) if out else ""
                if text:
                    yield text
                if final:
                    acc.complete()
                    finished = True
                    return
            finished = True
            if not ended_by_a_timer():
                acc.fail("the stream ended without a final response", "INCOMPLETE", "lost")
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError when our timers cancel the call; anything else
            # cancelling is the caller's business.
            if not ended_by_a_timer():
                raise
            finished = True
        except Exception as e:  # noqa: BLE001 - transport failure or our timeout: no answer
            finished = True
            if not ended_by_a_timer():
                msg, status = _grpc_error(e)
                acc.fail(msg, status, "lost")
        finally:
            timer.cancel()
            if watch is not None:
                watch.cancel()
            done.set()
            if not finished:
                # The caller left early (break, task cancelled): cancel the request server-side.
                it.cancel()
                acc.fail("the caller stopped reading the stream", "CANCELLED", "error")

    async def generate(self, req: Request, on_text: Callable[[str], None] | None = None) -> Result:
        result = Result()
        async for text in self.stream(req, result):
            if on_text is not None:
                on_text(text)
        return result

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
