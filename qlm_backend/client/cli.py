"""`qlm-client`: one request from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qlm_backend.client._common import (
    DEFAULT_GRPC_URL,
    DEFAULT_HTTP_URL,
    MISSED_HEARTBEATS,
    Request,
)
from qlm_backend.client.grpc_clients import GrpcClient
from qlm_backend.client.http_clients import HttpClient


def client_for(protocol: str, url: str | None = None, timeout_s: float = 600.0) -> Any:
    """A sync client for `protocol` ("grpc" or "http") at `url` (default: the usual local port)."""
    if protocol == "grpc":
        return GrpcClient(url or DEFAULT_GRPC_URL, timeout_s)
    if protocol == "http":
        return HttpClient(url or DEFAULT_HTTP_URL, timeout_s)
    raise ValueError(f"protocol must be grpc or http, got {protocol!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlm-client",
        description="Send one request to QLM on Triton; print tokens as they arrive, then timings.",
    )
    p.add_argument("prompt")
    p.add_argument(
        "--url", help=f"server address (default {DEFAULT_GRPC_URL} gRPC, {DEFAULT_HTTP_URL} HTTP)"
    )
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--model", required=True, help="logical model (e.g. mistral-7b)")
    cls = p.add_mutually_exclusive_group()
    cls.add_argument("--slo-class", help="SLO class (interactive, batch-1, batch-2, ...)")
    cls.add_argument("--ttft-slo-s", type=float, help="TTFT deadline in seconds instead of a class")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens")
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream tokens (default) or get one response at the end",
    )
    p.add_argument("--router", default="qlm", help="the router model to call (default qlm)")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument(
        "--heartbeat-s",
        type=float,
        help="ask the router for a heartbeat after this much silence (streaming); give up after "
        f"{MISSED_HEARTBEATS} missed (the router is gone)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    req = Request(
        prompt=args.prompt,
        model=args.model,
        slo_class=args.slo_class,
        ttft_slo_s=args.ttft_slo_s,
        max_tokens=args.max_tokens,
        stream=args.stream,
        ignore_eos=args.ignore_eos,
        router=args.router,
        heartbeat_s=args.heartbeat_s,
    )
    try:
        client = client_for(args.protocol, args.url, args.timeout_s)
    except Exception as e:  # noqa: BLE001 - a bad URL is one line, not a traceback
        print(f"qlm-client: cannot connect to {args.url}: {e}", file=sys.stderr)
        return 2
    try:
        result = client.generate(req, on_text=lambda t: print(t, end="", flush=True))
    finally:
        client.close()
    if result.text:
        print()
    if args.json:
        d = {k: v for k, v in vars(result).items() if k not in ("text", "token_times_s")}
        print(json.dumps(d))
    if not result.ok:
        where = args.url or (DEFAULT_GRPC_URL if args.protocol == "grpc" else DEFAULT_HTTP_URL)
        print(f"qlm-client: {where}: {result.summary()}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
