"""The FastAPI app of `qlm-openai`: routes, API key, errors in OpenAI's shape.

Each generate request is validated and translated (translate.py), then sent to the router as one
gRPC stream (upstream.py). A streamed answer waits up to `status_wait_s` for the router's first
response before it commits to HTTP 200, so that a request the router refuses at once (shed: 429
with Retry-After; bad input: 400; unavailable: 503) gets its real status; after that, an error
arrives inside the stream. A client that leaves, streamed or not, cancels the router's stream.

Routes: GET /health (no key needed), GET /v1/models, GET /v1/models/{model},
POST /v1/completions, POST /v1/chat/completions.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from qlm_backend.openai_front.config import FrontConfig
from qlm_backend.openai_front.errors import OpenAIError, from_router, unknown_model
from qlm_backend.openai_front.metrics import FrontMetrics
from qlm_backend.openai_front.shapes import Shapes, Tally, model_card, model_list
from qlm_backend.openai_front.sse import STOPPING, SSEResponse, stream_events, until_disconnect
from qlm_backend.openai_front.translate import RouterCall, parse_body, parse_chat, parse_completion
from qlm_backend.openai_front.upstream import Piece, RouterClient, RouterError, RouterStream

log = logging.getLogger("qlm.openai")
Parser = Callable[[Mapping[str, Any], Mapping[str, str], FrontConfig], RouterCall]
_TIMEOUT = object()


class ClientGone(Exception):
    pass


class TrackRequests:
    """ASGI middleware: the tasks of the HTTP requests in progress (the shutdown waits for them)."""

    def __init__(self, app: ASGIApp, tasks: set[asyncio.Task[Any]]) -> None:
        self.app, self.tasks = app, tasks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        self.tasks.add(task)
        try:
            await self.app(scope, receive, send)
        finally:
            self.tasks.discard(task)


async def _race(work: Awaitable[Any], request: Request, timeout: float | None = None) -> Any:
    """`work`'s result, or ClientGone if the client leaves first, or _TIMEOUT."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait(
            {task, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    if gone in done:
        raise ClientGone
    return _TIMEOUT


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 past `max_bytes`: at once when Content-Length says so,
    else as soon as the bytes read pass it (a chunked body), so an oversized body is never held."""

    def too_large(size: str) -> OpenAIError:
        return OpenAIError(
            413,
            f"the request body is {size} bytes; this server allows at most {max_bytes}",
            code="request_too_large",
        )

    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large(length)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large(f"over {max_bytes}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _collect(stream: RouterStream) -> Tally:
    t = Tally()
    while True:
        p = await stream.get()
        t.add(p)
        if p.final:
            return t


def create_app(
    cfg: FrontConfig, client_factory: Callable[[str, str], Any] = RouterClient
) -> FastAPI:
    """`client_factory(grpc_url, router)`: the router's client (tests pass a fake one)."""
    started = int(time.time())

    inflight: set[asyncio.Task[Any]] = set()
    metrics = FrontMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.router = client_factory(cfg.grpc_url, cfg.router)
        try:
            yield
        finally:
            # Requests uvicorn cancelled at its graceful timeout still send their last error.
            if inflight:
                await asyncio.wait(set(inflight), timeout=3.0)
            await app.state.router.close()

    app = FastAPI(
        title="qlm-openai", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(TrackRequests, tasks=inflight)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        if request.url.path.startswith("/v1/") and request.method == "POST":
            model, slo_class = getattr(request.state, "labels", (None, None))
            metrics.answered(model, slo_class, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(OpenAIError(exc.status_code, str(exc.detail)).body(), exc.status_code)

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise OpenAIError(401, "You didn't provide an API key (Authorization: Bearer <key>).")
        if not secrets.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        ok = await request.app.state.router.ready()
        body = {"status": "ok" if ok else "unavailable", "router": cfg.router}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_key(request)
        return JSONResponse(model_list(cfg.fleet.models, started))

    @app.get("/v1/models/{model}")
    async def model(request: Request, model: str) -> JSONResponse:
        check_key(request)
        if model not in cfg.fleet.models:
            raise unknown_model(model, list(cfg.fleet.models))
        return JSONResponse(model_card(model, cfg.fleet.models[model], started))

    async def generate(request: Request, parse: Parser) -> Response:
        check_key(request)
        call = parse(parse_body(await read_body(request, cfg.max_body_bytes)), request.headers, cfg)
        slo_class = call.slo.slo_class or cfg.fleet.default_class
        shapes = Shapes(call, slo_class)
        headers = {"x-qlm-slo-class": slo_class}
        request.state.labels = (call.model, slo_class)
        t0 = time.monotonic()
        stream: RouterStream = request.app.state.router.open(call.fields())
        stream.on_first_token = lambda: metrics.first_token(
            call.model, slo_class, time.monotonic() - t0
        )
        resp = await answer(request, call, shapes, headers, stream)
        metrics.answered(call.model, slo_class, resp.status_code)
        return resp

    async def answer(
        request: Request,
        call: RouterCall,
        shapes: Shapes,
        headers: dict[str, str],
        stream: RouterStream,
    ) -> Response:

        def error_for(e: RouterError) -> OpenAIError:
            params = call.params or {}
            err = from_router(e.message, e.status, params, cfg.retry_after_s, cfg.max_retry_after_s)
            if err.status >= 500:
                log.warning("%s (%s): %s", shapes.id, e.status or "router", e.message)
            return err

        try:
            if call.stream:
                first = await _race(stream.get(), request, cfg.status_wait_s)
                first = None if first is _TIMEOUT else first
                assert first is None or isinstance(first, Piece)
                return SSEResponse(
                    stream_events(shapes, stream, first, error_for), stream.cancel, headers
                )
            tally = await _race(_collect(stream), request)
            return JSONResponse(shapes.response(tally), headers=headers)
        except RouterError as e:
            raise error_for(e) from None
        except ClientGone:
            stream.cancel()
            log.info("%s: the client left before the answer; request cancelled", shapes.id)
            return Response(status_code=499)
        except asyncio.CancelledError:  # the server is stopping: an explicit answer all the same
            stream.cancel()
            return JSONResponse(STOPPING.body(), status_code=STOPPING.status)
        except BaseException:
            stream.cancel()
            raise

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, parse_chat)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, parse_completion)

    return app
