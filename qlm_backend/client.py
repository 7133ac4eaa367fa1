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

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import queue
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from qlm_backend.contract import router_request_tensors

Outcome = Literal["completed", "error", "lost"]
# Heartbeats missed before the router counts as gone: a live router's loop may lag one on a busy
# machine (the router checks every 0.1 s), a dead one sends none.
MISSED_HEARTBEATS = 3
DEFAULT_GRPC_URL = "127.0.0.1:8001"
DEFAULT_HTTP_URL = "127.0.0.1:8000"


@dataclass
class Request:
    prompt: str
    model: str | None = None  # QLM's logical model; None when `router` names an engine model
    slo_class: str | None = None
    ttft_slo_s: float | None = None
    max_tokens: int = 64
    stream: bool = True
    ignore_eos: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)  # further vLLM sampling keys
    router: str = "qlm"  # the Triton model to call
    heartbeat_s: float | None = None  # qlm_heartbeat_s: streamed requests to a QLM router only

    @property
    def silence_s(self) -> float | None:
        """Silence after which the router counts as gone (None: no heartbeats asked)."""
        return None if self.heartbeat_s is None else MISSED_HEARTBEATS * self.heartbeat_s

    def sampling_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"max_tokens": self.max_tokens, **self.sampling}
        if self.ignore_eos:
            d["ignore_eos"] = True
        return d


@dataclass
class Result:
    text: str = ""
    tokens: int = 0
    ttft_s: float | None = None  # wall seconds from send to the first response carrying tokens
    total_s: float = 0.0
    queue_s: float | None = None  # qlm_queue_s: seconds waited in the router before dispatch
    instance: str | None = None  # qlm_instance
    finish_reason: str | None = None
    outcome: Outcome = "lost"
    error: str | None = None
    status: str | None = None  # the server's status for an error (UNAVAILABLE, INVALID_ARG, 503...)
    responses: int = 0
    token_times_s: list[float] = field(default_factory=list)  # arrival of each tokened response

    @property
    def ok(self) -> bool:
        return self.outcome == "completed"

    def summary(self) -> str:
        if not self.ok:
            return f"error ({self.status or self.outcome}): {self.error}"
        ttft = f"{self.ttft_s * 1e3:.1f} ms" if self.ttft_s is not None else "n/a"
        q = f"{self.queue_s * 1e3:.1f} ms" if self.queue_s is not None else "n/a"
        inst = f", instance {self.instance}" if self.instance else ""
        return (
            f"TTFT {ttft}, total {self.total_s * 1e3:.1f} ms, {self.tokens} tokens, "
            f"queue {q}{inst}, finish {self.finish_reason}"
        )


def _final_reason(value: str | None) -> str | None:
    # Engines send finish_reason "None" on every response but the last (vllm_backend's str(None)).
    return None if value in (None, "", "None") else value


class _Accumulator:
    """Folds responses (decoded to plain dicts) into a Result; shared by all transports."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.r = Result()

    def add(self, out: dict[str, Any]) -> str:
        now = time.monotonic() - self.t0
        r = self.r
        r.responses += 1
        text = out.get("text_output") or ""
        n = out.get("num_output_tokens")
        n_new = int(n) if n is not None else (1 if text else 0)
        if n_new > 0:
            r.token_times_s.append(now)
            if r.ttft_s is None:
                r.ttft_s = now
        r.tokens += n_new
        r.text += text
        if out.get("qlm_queue_s") is not None:
            r.queue_s = float(out["qlm_queue_s"])
        if out.get("qlm_instance"):
            r.instance = str(out["qlm_instance"])
        reason = _final_reason(out.get("finish_reason"))
        if reason is not None:
            r.finish_reason = reason
        return str(text)

    def complete(self) -> Result:
        self.r.outcome = "completed"
        return self.done()

    def fail(self, message: str, status: str | None, outcome: Outcome = "error") -> Result:
        self.r.outcome, self.r.error, self.r.status = outcome, message, status
        return self.done()

    def done(self) -> Result:
        self.r.total_s = time.monotonic() - self.t0
        return self.r


# --- gRPC -------------------------------------------------------------------------------------
def grpc_inputs(req: Request, module: Any) -> list[Any]:
    """The request as tritonclient InferInputs (`module`: tritonclient.grpc or .grpc.aio)."""
    fields: dict[str, Any] = {
        "text_input": req.prompt,
        "stream": bool(req.stream),
        "sampling_parameters": json.dumps(req.sampling_dict()),
        "return_num_output_tokens": True,
        "return_finish_reason": True,
    }
    if req.model is not None:
        fields["model"] = req.model
    if req.slo_class is not None:
        fields["slo_class"] = req.slo_class
    if req.ttft_slo_s is not None:
        fields["ttft_slo_s"] = float(req.ttft_slo_s)
    if req.heartbeat_s is not None:
        fields["qlm_heartbeat_s"] = float(req.heartbeat_s)
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


def _silent(acc: _Accumulator, silence_s: float) -> None:
    acc.fail(
        f"the router sent nothing, not even a heartbeat, for {silence_s:.1f} s: it is gone "
        "(the request is lost; send it again)",
        "SILENT",
        "lost",
    )


def _is_connection_error(status: str | None) -> bool:
    # UNAVAILABLE is also how the router sheds, so only a transport failure counts as lost.
    return status in ("DEADLINE_EXCEEDED",)


class Generation:
    """Iterate to get text chunks as they arrive; `result` is set when the iteration ends."""

    def __init__(self, events: Iterator[str], acc: _Accumulator) -> None:
        self._events = events
        self._acc = acc
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._events
        self.result = self._acc.r


class GrpcClient:
    """Synchronous gRPC streaming client; one request at a time per client (tritonclient's rule)."""

    def __init__(self, url: str = DEFAULT_GRPC_URL, timeout_s: float = 600.0) -> None:
        import tritonclient.grpc as grpcclient

        self._mod = grpcclient
        self.url = url
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url)

    def stream(self, req: Request) -> Generation:
        acc = _Accumulator()
        return Generation(self._events(req, acc), acc)

    def generate(self, req: Request, on_text: Callable[[str], None] | None = None) -> Result:
        gen = self.stream(req)
        for text in gen:
            if on_text is not None and text:
                on_text(text)
        assert gen.result is not None
        return gen.result

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
                        msg = f"no final response within {self.timeout_s:.0f} s"
                        acc.fail(msg, "TIMEOUT", "lost")
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
            if silent and silence is not None:
                _silent(acc, silence)
            elif timed_out:
                acc.fail(f"no final response within {self.timeout_s:.0f} s", "TIMEOUT", "lost")
            else:
                acc.fail("the stream ended without a final response", "INCOMPLETE", "lost")
        except asyncio.CancelledError:
            # Our own timers cancel the call (grpc.aio then raises CancelledError); anything
            # else cancelling is the caller's business.
            if not (silent or timed_out):
                raise
            finished = True
            if silent and silence is not None:
                _silent(acc, silence)
            else:
                acc.fail(f"no final response within {self.timeout_s:.0f} s", "TIMEOUT", "lost")
        except Exception as e:  # noqa: BLE001 - transport failure or our timeout: no answer
            finished = True
            if silent and silence is not None:
                _silent(acc, silence)
            elif timed_out:
                acc.fail(f"no final response within {self.timeout_s:.0f} s", "TIMEOUT", "lost")
            else:
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


# --- HTTP generate_stream ------------------------------------------------------------------
def http_body(req: Request) -> dict[str, Any]:
    """The generate_stream JSON body: inputs and sampling keys as top-level fields."""
    body: dict[str, Any] = {
        "text_input": req.prompt,
        "stream": req.stream,
        "return_num_output_tokens": True,
        "return_finish_reason": True,
        **req.sampling_dict(),
    }
    if req.model is not None:
        body["model"] = req.model
    if req.slo_class is not None:
        body["slo_class"] = req.slo_class
    if req.ttft_slo_s is not None:
        body["ttft_slo_s"] = float(req.ttft_slo_s)
    if req.heartbeat_s is not None:
        body["qlm_heartbeat_s"] = float(req.heartbeat_s)
    return body


def _http_status_name(code: int) -> str:
    return {400: "INVALID_ARG", 404: "NOT_FOUND", 500: "INTERNAL", 503: "UNAVAILABLE"}.get(
        code, f"HTTP {code}"
    )


def _error_text(raw: str) -> str:
    # generate_stream sends even its first (status-setting) error as an SSE event.
    raw = raw.strip().removeprefix("data:").strip()
    try:
        return str(json.loads(raw).get("error", raw))
    except (json.JSONDecodeError, AttributeError):
        return raw.strip()


def _sse_event(line: str) -> dict[str, Any] | None:
    line = line.strip()
    return json.loads(line[len("data:") :]) if line.startswith("data:") else None


def _fold_event(acc: _Accumulator, ev: dict[str, Any]) -> tuple[str, bool, str | None]:
    """Returns (text, final, error) for one SSE event."""
    if "error" in ev:
        return "", False, str(ev["error"])
    text = acc.add(ev)
    # SSE carries no final flag: the response with a finish reason is the last one.
    return text, _final_reason(ev.get("finish_reason")) is not None, None


class HttpClient:
    """Synchronous HTTP client over Triton's generate_stream (server-sent events)."""

    def __init__(self, url: str = DEFAULT_HTTP_URL, timeout_s: float = 600.0) -> None:
        self.url = url.removeprefix("http://")
        host, _, port = self.url.partition(":")
        self.host, self.port = host, int(port or 80)
        self.timeout_s = timeout_s

    def stream(self, req: Request) -> Generation:
        acc = _Accumulator()
        return Generation(self._events(req, acc), acc)

    def generate(self, req: Request, on_text: Callable[[str], None] | None = None) -> Result:
        gen = self.stream(req)
        for text in gen:
            if on_text is not None and text:
                on_text(text)
        assert gen.result is not None
        return gen.result

    def _events(self, req: Request, acc: _Accumulator) -> Iterator[str]:
        # With heartbeats, a read waits at most the silence that means the router is gone.
        silence = req.silence_s
        wait_s = self.timeout_s if silence is None else min(self.timeout_s, silence)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=wait_s)
        try:
            acc.t0 = time.monotonic()
            conn.request(
                "POST",
                f"/v2/models/{req.router}/generate_stream",
                body=json.dumps(http_body(req)),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            if resp.status != 200:
                acc.fail(
                    _error_text(resp.read().decode("utf-8", "replace")),
                    _http_status_name(resp.status),
                )
                return
            while True:
                raw = resp.readline()
                if not raw:
                    acc.fail("the stream ended without a final response", "INCOMPLETE", "lost")
                    return
                ev = _sse_event(raw.decode("utf-8", "replace"))
                if ev is None:
                    continue
                text, final, err = _fold_event(acc, ev)
                if err is not None:
                    acc.fail(err, "ERROR")
                    return
                if text:
                    yield text
                if final:
                    acc.complete()
                    return
        except TimeoutError as e:
            if silence is not None and silence <= self.timeout_s:
                _silent(acc, silence)
            else:
                acc.fail(f"{type(e).__name__}: {e}", "CONNECTION", "lost")
        except (OSError, http.client.HTTPException) as e:
            acc.fail(f"{type(e).__name__}: {e}", "CONNECTION", "lost")
        finally:
            conn.close()
            if acc.r.total_s == 0.0:
                acc.fail("the caller stopped reading the stream", "CANCELLED", "error")

    def close(self) -> None:
        pass


class AsyncHttpClient:
    """asyncio HTTP generate_stream client (aiohttp, which tritonclient[http] brings)."""

    def __init__(self, url: str = DEFAULT_HTTP_URL, timeout_s: float = 600.0) -> None:
        self.url = url if url.startswith("http") else f"http://{url}"
        self.timeout_s = timeout_s
        self._session: Any = None

    async def _get_session(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        return self._session

    async def stream(self, req: Request, result: Result | None = None) -> AsyncIterator[str]:
        import aiohttp

        acc = _Accumulator()
        if result is not None:
            acc.r = result
        session = await self._get_session()
        finished = False
        try:
            acc.t0 = time.monotonic()
            timeout = None
            if req.silence_s is not None:
                timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_read=req.silence_s)
            async with session.post(
                f"{self.url}/v2/models/{req.router}/generate_stream",
                json=http_body(req),
                timeout=timeout,
            ) as resp:
                if resp.status != 200:
                    acc.fail(_error_text(await resp.text()), _http_status_name(resp.status))
                    finished = True
                    return
                async for raw in resp.content:
                    ev = _sse_event(raw.decode("utf-8", "replace"))
                    if ev is None:
                        continue
                    text, final, err = _fold_event(acc, ev)
                    if err is not None:
                        acc.fail(err, "ERROR")
                        finished = True
                        return
                    if text:
                        yield text
                    if final:
                        acc.complete()
                        finished = True
                        return
            acc.fail("the stream ended without a final response", "INCOMPLETE", "lost")
            finished = True
        except aiohttp.ServerTimeoutError as e:
            if req.silence_s is not None:  # a read waited past the heartbeats' silence
                _silent(acc, req.silence_s)
            else:
                acc.fail(f"{type(e).__name__}: {e}", "CONNECTION", "lost")
            finished = True
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            acc.fail(f"{type(e).__name__}: {e}", "CONNECTION", "lost")
            finished = True
        finally:
            if not finished:
                acc.fail("the caller stopped reading the stream", "CANCELLED", "error")

    async def generate(self, req: Request, on_text: Callable[[str], None] | None = None) -> Result:
        result = Result()
        async for text in self.stream(req, result):
            if on_text is not None:
                on_text(text)
        return result

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def client_for(protocol: str, url: str | None = None, timeout_s: float = 600.0) -> Any:
    """A sync client for `protocol` ("grpc" or "http") at `url` (default: the usual local port)."""
    if protocol == "grpc":
        return GrpcClient(url or DEFAULT_GRPC_URL, timeout_s)
    if protocol == "http":
        return HttpClient(url or DEFAULT_HTTP_URL, timeout_s)
    raise ValueError(f"protocol must be grpc or http, got {protocol!r}")


# --- CLI ----------------------------------------------------------------------------------------
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
