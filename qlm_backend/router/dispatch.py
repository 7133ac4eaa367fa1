"""One dispatcher for local and remote engines: tritonclient's gRPC asyncio streaming.

Measured on Triton 2.51 (docs/triton-vllm-facts.md section 1): BLS `async_exec(decoupled=True)` returns a blocking
iterator and cannot cancel its child request, so eviction and client cancellation would not stop the
engine. A gRPC aio stream to the engine's server (this server over loopback, or another server)
streams concurrently and its `cancel()` reaches the engine's `is_cancelled()` within a step. The same
client performs model control (load with a config override, unload) on that server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from qlm_backend.contract import ROUTER_PASS_THROUGH, engine_request_tensors
from qlm_backend.router.flight import Chunk
from qlm_backend.router.stream_driver import EngineError
from qlm_backend.vllm_engine.control import ControlOp, ControlReply, control_parameters


class EngineStream:
    """One request streaming from an engine model; `cancel()` stops the engine's work."""

    def __init__(
        self,
        client: grpcaio.InferenceServerClient,
        model: str,
        fields: Mapping[str, Any],
        request_id: str,
        parameters: Mapping[str, str] | None = None,
    ):
        self._done = asyncio.Event()
        # Built here, from the contract's engine table: a bad field is the caller's error, raised
        # at once, not an engine stream failure later.
        inputs = []
        for name, arr, dtype in engine_request_tensors(fields):
            t = InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr)
            inputs.append(t)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            req: dict[str, Any] = {"model_name": model, "inputs": inputs, "request_id": request_id}
            if parameters:
                req["parameters"] = dict(parameters)
            yield req
            # Keep the request side open until the response side ends: closing it early would
            # half-close the stream, which some servers treat as the end of the request.
            await self._done.wait()

        self._it = client.stream_infer(inputs_iterator=requests())
        self.model = model

    def cancel(self) -> None:
        self._done.set()
        self._it.cancel()

    async def finish(self, timeout_s: float = 5.0) -> None:
        """End a stream whose request has had its last response without cancelling the call:
        close the request side and let the server end it. Triton 2.51's gRPC frontend races a
        client's cancel against the stream's end (docs/reliability.md, Known issues); a cancel
        that loses may leave the request, and with it the model, held, so that an unload of the
        model never begins. Cancelled after `timeout_s` if the server does not end it."""
        self._done.set()
        try:
            async with asyncio.timeout(timeout_s):
                async for _ in self._it:
                    pass
        except asyncio.CancelledError:
            self._it.cancel()
            raise
        except Exception:  # noqa: BLE001 - timed out or failed: end it the other way
            self._it.cancel()

    async def chunks(self) -> AsyncIterator[Chunk]:
        try:
            async for result, error in self._it:
                if error is not None:
                    raise _engine_error(error, self.model)
                text = result.as_numpy("text_output")
                n = result.as_numpy("num_output_tokens")
                reason = result.as_numpy("finish_reason")
                fr = None
                if reason is not None:
                    r = reason.reshape(-1)[0]
                    fr = r.decode() if isinstance(r, bytes) else str(r)
                    fr = None if fr == "None" else fr
                cached = result.as_numpy("num_cached_tokens")  # our engines, when asked
                extras = {}
                for name in ROUTER_PASS_THROUGH:
                    arr = result.as_numpy(name)
                    if arr is not None:
                        extras[name] = arr
                chunk = Chunk(
                    b"".join(text.reshape(-1)).decode("utf-8", "replace")
                    if text is not None
                    else "",
                    int(n.reshape(-1)[0]) if n is not None else 0,
                    fr,
                    extras,
                    cached_tokens=int(cached.reshape(-1)[0]) if cached is not None else None,
                )
                yield chunk
                if fr is not None:
                    return
        except InferenceServerException as e:
            raise _engine_error(e, self.model) from None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # grpc channel errors surface as various exception types
            raise EngineError(f"{self.model}: stream failed: {e}", unavailable=True) from None
        finally:
            self._done.set()
        raise EngineError(f"{self.model}: stream ended without a final response", unavailable=True)


def _engine_error(error: Any, model: str) -> EngineError:
    msg = str(error)
    status = getattr(error, "status", lambda: None)() or ""
    gone = any(
        s in status or s in msg
        for s in (
            "UNAVAILABLE",
            "NOT_FOUND",
            "not found",
            "unloaded",
            "is not ready",
            "StatusCode.UNAVAILABLE",
            "unavailable",
            # Its stub died (Triton 2.51 still lists it READY): queue the request elsewhere.
            "is not healthy",
        )
    )
    return EngineError(f"{model}: {msg}", unavailable=gone)


class EngineServer:
    """A Triton server holding engine models: streams, loads, unloads."""

    def __init__(
        self, url: str, admin_headers: dict[str, str] | None = None, admin_key: str | None = None
    ) -> None:
        self.url = url
        self.client = grpcaio.InferenceServerClient(url)
        # The model repository API may be restricted (Triton's --grpc-restricted-protocol); the
        # engines' control requests then carry the same key.
        self.headers, self.admin_key = admin_headers, admin_key

    def stream(self, model: str, fields: Mapping[str, Any], request_id: str) -> EngineStream:
        return EngineStream(self.client, model, fields, request_id)

    async def load(self, model: str, config: Mapping[str, Any] | None = None) -> None:
        """Load an engine model, with `config` overriding its config.pbtxt if given."""
        if config is None:
            await self.client.load_model(model, headers=self.headers)
            return
        await self.client.load_model(model, config=json.dumps(config), headers=self.headers)

    async def unload(self, model: str) -> None:
        await self.client.unload_model(model, headers=self.headers)

    async def control(self, model: str, op: ControlOp) -> ControlReply:
        """Sleep, wake or ask the state of a running engine (vllm_engine/control.py)."""
        params = control_parameters(op, self.admin_key)
        stream = EngineStream(self.client, model, {"text_input": "-"}, f"control-{op}", params)
        reply: ControlReply | None = None
        try:
            # One response (FINAL, no finish_reason): the first chunk is the whole reply.
            async for ch in stream.chunks():
                reply = ControlReply.from_json(ch.text)
                break
        except BaseException:
            stream.cancel()
            raise
        if reply is None:
            stream.cancel()
            raise EngineError(f"{model}: no reply to {op}", unavailable=True)
        await stream.finish()
        return reply

    async def wait_unloaded(self, model: str, timeout_s: float, poll_s: float = 0.2) -> float:
        """Seconds until the repository index shows `model` neither loaded nor unloading.

        Triton 2.51's unload returns when the unload begins; the engine's process then takes
        seconds to stop and free its memory (docs/engines.md). On a GPU the incoming engine needs
        that memory, so a cold swap waits for it before loading."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            index = await self.client.get_model_repository_index(headers=self.headers, as_json=True)
            states = {m.get("state") for m in index.get("models", []) if m.get("name") == model}
            if not states & {"READY", "UNLOADING"}:
                return loop.time() - t0
            if loop.time() - t0 >= timeout_s:
                raise EngineError(
                    f"{model}: still {sorted(s for s in states if s)} {timeout_s:g} s after "
                    "its unload",
                    unavailable=True,
                )
            await asyncio.sleep(poll_s)

    async def is_ready(self, model: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(model))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self.client.close()
