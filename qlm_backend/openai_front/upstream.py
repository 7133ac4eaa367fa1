"""The router's client: one request, one gRPC stream (tritonclient's asyncio client).

A `RouterStream` reads its gRPC stream in a task of its own into a queue, so a reader may wait on it
with a timeout, or give up, without losing a response. `cancel()` cancels the gRPC call: Triton
marks the request cancelled, the router sees it (`cancel_poll_s`) and removes it from its queue or
aborts it in its engine. A stream ends with its final response (the Triton final flag) or a
`RouterError`: an error the router sent (message only, as Triton's stream carries it) or a failed
call (gRPC status name).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qlm_backend.contract import router_request_tensors


@dataclass
class Piece:
    """One response of the router."""

    text: str = ""
    tokens: int = 0  # num_output_tokens: the tokens this response carries
    prompt_tokens: int | None = None  # num_input_tokens
    finish_reason: str | None = None
    final: bool = False
    queue_s: float | None = None  # qlm_queue_s (final response)
    instance: str | None = None  # qlm_instance (final response)


class RouterError(Exception):
    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status  # gRPC status name when the call failed; None for a router error


def _scalar(result: Any, name: str) -> Any:
    arr = result.as_numpy(name)
    if arr is None or arr.size == 0:
        return None
    v = arr.reshape(-1)[0]
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v.item()


def decode(result: Any) -> Piece:
    text = result.as_numpy("text_output")
    reason = _scalar(result, "finish_reason")
    n_in, n_out = _scalar(result, "num_input_tokens"), _scalar(result, "num_output_tokens")
    queue_s, instance = _scalar(result, "qlm_queue_s"), _scalar(result, "qlm_instance")
    params = result.get_response().parameters
    final = "triton_final_response" in params and params["triton_final_response"].bool_param
    return Piece(
        text=b"".join(text.reshape(-1)).decode("utf-8", "replace") if text is not None else "",
        tokens=int(n_out or 0),
        prompt_tokens=int(n_in) if n_in is not None else None,
        finish_reason=None if reason in (None, "", "None") else str(reason),
        final=bool(final),
        queue_s=float(queue_s) if queue_s is not None else None,
        instance=str(instance) if instance else None,
    )


class RouterStream:
    def __init__(self, client: Any, module: Any, router: str, fields: Mapping[str, Any]) -> None:
        inputs = []
        for name, arr, dtype in router_request_tensors(fields):
            inp = module.InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        self._request = {
            "model_name": router,
            "inputs": inputs,
            "enable_empty_final_response": True,
        }
        self._queue: asyncio.Queue[Piece | RouterError] = asyncio.Queue()
        self._ended = asyncio.Event()  # the request has ended: the stream may close
        self.finished = False  # the final response or an error arrived
        self.cancelled = False
        # Called once, when the first response with a token arrives (the front's TTFT metric).
        self.on_first_token: Callable[[], object] | None = None
        self._it = client.stream_infer(inputs_iterator=self._requests())
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _requests(self) -> AsyncIterator[dict[str, Any]]:
        yield self._request
        await self._ended.wait()  # the stream stays open until the request has ended

    async def _pump(self) -> None:
        try:
            async for result, error in self._it:
                if error is not None:
                    self._end(
                        RouterError(str(error.message() if hasattr(error, "message") else error))
                    )
                    return
                piece = decode(result)
                if piece.tokens > 0 and self.on_first_token is not None:
                    self.on_first_token()
                    self.on_first_token = None
                if piece.final:
                    self._end(piece)
                    return
                self._queue.put_nowait(piece)
            self._end(
                RouterError("the router's stream ended without a final response", "INCOMPLETE")
            )
        except asyncio.CancelledError:
            if not self.cancelled:
                raise
        except Exception as e:  # noqa: BLE001 - a failed call (router down, channel closed)
            if not self.cancelled:
                code = getattr(e, "code", None)
                status = code().name if callable(code) else getattr(e, "status", lambda: None)()
                details = getattr(e, "details", None)
                msg = details() if callable(details) else str(e)
                self._end(
                    RouterError(str(msg), str(status or "UNAVAILABLE").removeprefix("StatusCode."))
                )
        finally:
            self._ended.set()

    def _end(self, item: Piece | RouterError) -> None:
        self.finished = True
        self._queue.put_nowait(item)

    async def get(self) -> Piece:
        """The next response; raises RouterError for the router's error or a failed call."""
        item = await self._queue.get()
        if isinstance(item, RouterError):
            raise item
        return item

    def cancel(self) -> None:
        """Cancel the request in the router (and its engine), unless it has already ended."""
        if self.finished or self.cancelled:
            return
        self.cancelled = True
        self._ended.set()
        self._it.cancel()
        self._task.cancel()


class RouterClient:
    """One gRPC channel to the Triton server that runs the router; many concurrent streams."""

    def __init__(self, url: str, router: str = "qlm") -> None:
        import tritonclient.grpc.aio as grpcaio

        self._mod = grpcaio
        self.url, self.router = url, router
        self._client = grpcaio.InferenceServerClient(url)

    def open(self, fields: Mapping[str, Any]) -> RouterStream:
        return RouterStream(self._client, self._mod, self.router, fields)

    async def ready(self) -> bool:
        try:
            return bool(await self._client.is_model_ready(self.router))
        except Exception:  # noqa: BLE001 - unreachable server: not ready
            return False

    async def close(self) -> None:
        await self._client.close()
