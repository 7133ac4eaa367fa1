"""A small client for QLM on Triton: gRPC streaming and HTTP generate_stream, sync and asyncio.

Every call returns a `Result` with what a user of an SLO-aware server wants to see: time to first
token, total time, tokens, the time the request waited in QLM's queue (`qlm_queue_s`) and the
instance that served it, or the server's error. Tokens can be consumed as they arrive (`stream()`,
or an `on_text` callback). The same client calls engine models directly (leave `model` unset and
name the engine as `router`), which is what `qlm-bench router` compares against.

Outcomes, the distinction load tests need: `completed` (the final response arrived), `error` (the
server answered with an explicit error: shed, bad input, cancelled), `lost` (neither: a timeout, a
dropped connection, a stream that ended without its final response).

A streamed request may ask the router for heartbeats (`Request.heartbeat_s`: an empty response
whenever the stream has been silent that long, docs/request-contract.md). A router whose stub died
sends nothing more and Triton 2.51 never ends its streams, so with heartbeats the client counts the
router gone after MISSED_HEARTBEATS of them (outcome `lost`, status `SILENT`) instead of waiting
for its own `timeout_s`.

CLI: `qlm-client [--url URL] [--protocol grpc|http] --model M [--slo-class C | --ttft-slo-s S]
[--max-tokens N] [--stream | --no-stream] [--router qlm] "prompt"`.
"""

from qlm_backend.client._common import (
    DEFAULT_GRPC_URL,
    DEFAULT_HTTP_URL,
    MISSED_HEARTBEATS,
    Generation,
    Outcome,
    Request,
    Result,
)
from qlm_backend.client.cli import client_for, main
from qlm_backend.client.grpc_clients import AsyncGrpcClient, GrpcClient, grpc_inputs
from qlm_backend.client.http_clients import AsyncHttpClient, HttpClient, http_body

__all__ = [
    "DEFAULT_GRPC_URL",
    "DEFAULT_HTTP_URL",
    "MISSED_HEARTBEATS",
    "AsyncGrpcClient",
    "AsyncHttpClient",
    "Generation",
    "GrpcClient",
    "HttpClient",
    "Outcome",
    "Request",
    "Result",
    "client_for",
    "grpc_inputs",
    "http_body",
    "main",
]
