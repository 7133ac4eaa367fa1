"""OpenAI's error object, and what each error of the router becomes over HTTP.

OpenAI answers every error with `{"error": {"message", "type", "param", "code"}}`, `param` naming the
request field at fault; the SDKs map the HTTP status to an exception class (400 BadRequestError,
401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError).

The router's errors arrive inside its gRPC stream as a message only (no status code): the router
names the field at fault first (`qlm: max_tokens: must be ...`), sheds with `request shed: <why>`
(429 with Retry-After: this request's deadline cannot be met), refuses a request when its queue is
at `max_pending_requests` with `request refused: the router's queue is full ...` (503 with
Retry-After: the server as a whole is overloaded), ends a request not finished within its
`request_timeout_s` with `request timed out: ...` (504), and reports an unknown model as
`model: unknown model ...` (404).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from qlm_backend.contract import ROUTER_INPUT_NAMES, SAMPLING_KEYS

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "requests",
}

# Fields the router names in its errors: its inputs and the sampling keys.
ROUTER_FIELDS = frozenset(ROUTER_INPUT_NAMES) | SAMPLING_KEYS
_FIELD_RE = re.compile(r"^(?:[\w.-]+: )?([a-z_]+): (.*)$", re.DOTALL)
_SHED_RE = re.compile(r"deadline in (-?[\d.]+) s cannot be met \(first token in ~(-?[\d.]+) s")


class OpenAIError(Exception):
    """An error answer: HTTP status and OpenAI's error object (and headers, e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(param: str | None, message: str) -> OpenAIError:
    return OpenAIError(400, message, param)


def unknown_model(model: str, served: list[str]) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist; served models: {', '.join(sorted(served))}",
        "model",
        "model_not_found",
    )


def retry_after_s(reason: str, default_s: float, max_s: float) -> int:
    """Retry-After for a shed request: the router's shed reason says when the request's first token
    would come (W) and when its deadline is (D); the work ahead drains by roughly W - D seconds
    before the same request would be admitted. Unparseable: `default_s`. Whole seconds, >= 1."""
    m = _SHED_RE.search(reason)
    s = default_s
    if m:
        deadline, first = float(m.group(1)), float(m.group(2))
        s = first - deadline
    return int(min(max_s, max(1.0, math.ceil(s))))


def from_router(
    message: str,
    status: str | None,
    params: Mapping[str, str],
    retry_default_s: float = 1.0,
    retry_max_s: float = 300.0,
) -> OpenAIError:
    """The OpenAI error for an error of the router. `status`: the gRPC status name when the call
    itself failed (None for an error inside the stream); `params`: router field -> request field
    (text_input -> messages, max_tokens -> max_completion_tokens, ...)."""
    if "request shed" in message:
        retry = retry_after_s(message, retry_default_s, retry_max_s)
        return OpenAIError(
            429,
            f"{message}; retry in about {retry} s",
            None,
            "rate_limit_exceeded",
            {"Retry-After": str(retry)},
        )
    if "queue is full" in message:
        retry = int(min(retry_max_s, max(1.0, math.ceil(retry_default_s))))
        return OpenAIError(
            503,
            f"the router is overloaded: {message}; retry in about {retry} s",
            None,
            "queue_full",
            {"Retry-After": str(retry)},
        )
    if "request timed out" in message:
        return OpenAIError(504, message, None, "timeout")
    # Triton's words while the router model is unloaded (qlm-serve's supervisor reloading it, an
    # operator's reload) or its stub is dead: the router is down, not the request wrong.
    down = ("unloading", "has no available versions", "is not healthy")
    if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INCOMPLETE") or any(
        d in message for d in down
    ):
        return OpenAIError(503, f"the router is unavailable: {message}", code="service_unavailable")
    m = _FIELD_RE.match(message)
    if m and m.group(1) in ROUTER_FIELDS:
        field, rest = m.group(1), m.group(2)
        if field == "model" and "unknown model" in rest:
            return OpenAIError(404, rest, "model", "model_not_found")
        return OpenAIError(400, rest, params.get(field, field))
    if status == "INVALID_ARGUMENT":
        return OpenAIError(400, message)
    if status == "NOT_FOUND":
        return OpenAIError(503, f"the router model is not loaded: {message}")
    return OpenAIError(500, message)
