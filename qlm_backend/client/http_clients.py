"""HTTP generate_stream clients (server-sent events), sync (http.client) and asyncio (aiohttp)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from qlm_backend.client._common import (
    DEFAULT_HTTP_URL,
    Request,
    Result,
    _Accumulator,
    _final_reason,
    _silent,
    _SyncClient,
)


def http_body(req: Request) -> dict[str, Any]:
    """The generate_stream JSON body: inputs and sampling keys as top-level fields."""
    return {
        "text_input": req.prompt,
        "stream": req.stream,
        "return_num_output_tokens": True,
        "return_finish_reason": True,
        **req.sampling_dict(),
        **req.router_fields(),
    }


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


class HttpClient(_SyncClient):
    """Synchronous HTTP client over Triton's generate_stream (server-sent events)."""

    def __init__(self, url: str = DEFAULT_HTTP_URL, timeout_s: float = 600.0) -> None:
        self.url = url.removeprefix("http://")
        host, _, port = self.url.partition(":")
        self.host, self.port = host, int(port or 80)
        self.timeout_s = timeout_s

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
