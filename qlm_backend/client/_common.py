"""What every transport of the client shares: the request, its result, the fold of responses into
a result, and the heartbeat rule."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

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

    def router_fields(self) -> dict[str, Any]:
        """The router's optional inputs this request sets (same names over gRPC and HTTP)."""
        d: dict[str, Any] = {}
        if self.model is not None:
            d["model"] = self.model
        if self.slo_class is not None:
            d["slo_class"] = self.slo_class
        if self.ttft_slo_s is not None:
            d["ttft_slo_s"] = float(self.ttft_slo_s)
        if self.heartbeat_s is not None:
            d["qlm_heartbeat_s"] = float(self.heartbeat_s)
        return d

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


def _timed_out(acc: _Accumulator, timeout_s: float) -> None:
    acc.fail(f"no final response within {timeout_s:.0f} s", "TIMEOUT", "lost")


def _silent(acc: _Accumulator, silence_s: float) -> None:
    acc.fail(
        f"the router sent nothing, not even a heartbeat, for {silence_s:.1f} s: it is gone "
        "(the request is lost; send it again)",
        "SILENT",
        "lost",
    )


class Generation:
    """Iterate to get text chunks as they arrive; `result` is set when the iteration ends."""

    def __init__(self, events: Iterator[str], acc: _Accumulator) -> None:
        self._events = events
        self._acc = acc
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._events
        self.result = self._acc.r


class _SyncClient:
    """What the two sync clients share: a request's events as a Generation, or run to its end."""

    def _events(self, req: Request, acc: _Accumulator) -> Iterator[str]:
        raise NotImplementedError

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
