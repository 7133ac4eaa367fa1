"""The router's client: one request, one gRPC stream (tritonclient's asyncio client).

A `RouterStream` reads its gRPC stream in a task of its own into a queue, so a reader may wait on it
with a timeout, or give up, without losing a response. `cancel()` cancels the gRPC call: Triton
marks the request cancelled, the router sees it (`cancel_poll_s`) and removes it from its queue or
aborts it in its engine. A stream ends with its final response (the Triton final flag) or a
`RouterError`: an error the router sent (message only, as Triton's stream carries it) or a failed
call (gRPC status name).

A router whose stub dies leaves its streams open with nothing more to come: Triton 2.51 ends none
of them (docs/triton-vllm-facts.md section 8). Every stream asks the router for heartbeats
(`qlm_heartbeat_s`: an empty response whenever it has been silent that long), which a live router
sends, one that drains during a reload included, and a dead one cannot. While streams are open,
the client asks the server every `watch_s` whether the router model is ready; after two "not
ready" answers in a row (`qlm-serve`'s supervisor holds a dead router unloaded for a second before
loading it again), every open stream that has heard nothing, heartbeats included, since the first
of them and for `silent_s` ends with an UNAVAILABLE error and its call is cancelled, even once a
new router is ready. A failed readiness call (a busy or unreachable server) is not an answer: the
streams' own calls fail if the server is gone.
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
        self.last_piece_s = asyncio.get_running_loop().time()  # when it last heard from the router
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
                self.last_piece_s = asyncio.get_running_loop().time()
                if _is_heartbeat(piece):
                    continue
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

    def abandon(self, error: RouterError) -> None:
        """End the stream with `error` (the router is gone) and cancel its call."""
        if self.finished or self.cancelled:
            return
        self._end(error)  # queued first: the reader gets it, whatever the pump does now
        self.cancelled = True
        self._ended.set()
        self._it.cancel()
        self._task.cancel()


def _is_heartbeat(p: Piece) -> bool:
    return not p.final and p.tokens == 0 and not p.text and p.finish_reason is None


HEARTBEAT_S = 0.5  # asked of the router for every stream
# A stream counts as orphaned (once the router is not ready) after this many heartbeats missed:
# a live router's loop and relay may lag one on a loaded machine, a dead one sends none.
MISSED_HEARTBEATS = 3


class RouterClient:
    """One gRPC channel to the Triton server that runs the router; many concurrent streams."""

    def __init__(
        self, url: str, router: str = "qlm", watch_s: float = 0.25, heartbeat_s: float = HEARTBEAT_S
    ) -> None:
        import tritonclient.grpc.aio as grpcaio

        self._mod = grpcaio
        self.url, self.router, self.watch_s = url, router, watch_s
        self.heartbeat_s, self.silent_s = heartbeat_s, MISSED_HEARTBEATS * heartbeat_s
        self._client = grpcaio.InferenceServerClient(url)
        self._open: set[RouterStream] = set()
        self._watch: asyncio.Task[None] | None = None
        self.abandoned = 0  # streams ended because the router went down

    def open(self, fields: Mapping[str, Any]) -> RouterStream:
        fields = {**fields, "qlm_heartbeat_s": self.heartbeat_s}
        stream = RouterStream(self._client, self._mod, self.router, fields)
        self._open.add(stream)
        stream._task.add_done_callback(lambda _t: self._open.discard(stream))
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_router())
        return stream

    async def ready(self) -> bool:
        return await self._ready() is True

    async def _ready(self) -> bool | None:
        """The router model's readiness; None when the call itself failed."""
        try:
            return bool(await self._client.is_model_ready(self.router))
        except Exception:  # noqa: BLE001 - unreachable or busy server: no answer
            return None

    async def _watch_router(self) -> None:
        loop = asyncio.get_running_loop()
        not_ready, first_not_ready = 0, 0.0
        down_s: float | None = None  # when the router last went down (two "not ready" in a row)
        while self._open:
            await asyncio.sleep(self.watch_s)
            if not self._open:
                return
            state = await self._ready()
            if state is False and not_ready == 0:
                first_not_ready = loop.time()
            not_ready = not_ready + 1 if state is False else 0
            if not_ready >= 2:
                down_s = first_not_ready
            if down_s is None:
                continue
            # A router reloaded through the repository API drains: Triton keeps the old one until
            # its streams end, and it sends them tokens or heartbeats. A dead one's streams go
            # silent, and stay so after the supervisor has loaded a new router (ready again in
            # ~1.5 s): a stream is orphaned when it has heard nothing since the router went down,
            # for `silent_s`, whatever the router's readiness now.
            now = loop.time()
            before = [s for s in self._open if s.last_piece_s < down_s]
            if not before:
                down_s = None
                continue
            err = RouterError(
                f"the router {self.router!r} went down (its model is not ready); "
                "this request is lost, send it again",
                "UNAVAILABLE",
            )
            for stream in before:
                if now - stream.last_piece_s > self.silent_s:
                    stream.abandon(err)
                    self._open.discard(stream)
                    self.abandoned += 1

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self._client.close()
