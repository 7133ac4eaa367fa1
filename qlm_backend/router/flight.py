"""What the executor works with: a request in flight (`Flight`), an engine's response (`Chunk`),
and the two sides it calls, the client (`ClientSink`) and the engines (`Driver`).

Kept apart from router/executor.py so that drivers and sinks (the router's stream driver and
Triton sink, qlm-eval's simulation driver) depend on these types, not on the executor's logic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Outcome = Literal["attained", "missed", "rejected", "cancelled", "failed"]
OUTCOMES: tuple[Outcome, ...] = ("attained", "missed", "rejected", "cancelled", "failed")
# Why a stream is stopped: the driver charges an eviction with KV swap, and only that, differently.
StopKind = Literal["evict-recompute", "evict-swap", "cancel"]
ErrorKind = Literal["invalid", "unavailable", "cancelled", "internal"]


@dataclass(frozen=True)
class Chunk:
    """One engine response: new text and its token count; `finish_reason` on the last one."""

    text: str
    num_output_tokens: int
    finish_reason: str | None
    extras: Mapping[str, Any] = field(default_factory=dict)  # other outputs, passed through
    scheduled_s: float | None = None  # virtual engines: when the engine first scheduled it
    cached_tokens: int | None = None  # prompt tokens the engine's prefix cache held, if reported


class ClientSink(Protocol):
    """Where a request's responses go (a Triton response sender, a simulation record)."""

    def send(
        self, flight: Flight, text: str, num_tokens: int, reason: str | None, final: bool
    ) -> bool:
        """Send one response; False if the client is gone (the executor then cancels)."""
        ...

    def error(self, message: str, kind: ErrorKind) -> None: ...

    def is_cancelled(self) -> bool: ...


class Driver(Protocol):
    """How the executor reaches engines. Calls return at once; results come back as events."""

    def open(self, flight: Flight, instance_id: str, priority: int, now: float) -> None:
        """Start `flight` (resumed at flight.tokens_done) as stream `flight.stream_id`."""
        ...

    def stop(self, flight: Flight, stream_id: str, kind: StopKind, now: float) -> None:
        """Stop stream `stream_id` of `flight` in its engine (a no-op if it already ended)."""
        ...

    def swap(
        self,
        instance_id: str,
        from_model: str | None,
        to_model: str,
        warm: bool,
        keep_from: bool,
        now: float,
    ) -> None:
        """Replace `from_model` by `to_model`: `warm` if its weights are in the host's memory,
        `keep_from` if the outgoing model stays there (KeepWarm). Ends with on_loaded(..., warm=
        what really happened) or on_load_failed."""
        ...

    def release(self, instance_id: str, model: str, now: float) -> None:
        """The host no longer keeps `model` warm: free what this instance kept of it."""
        ...

    def recover(self, instance_id: str, model: str, now: float) -> None:
        """Bring a failed instance back with `model` (retrying as the driver sees fit)."""
        ...


@dataclass(eq=False)
class Flight:
    """One accepted request, from admission to its outcome."""

    rid: str
    model: str
    slo_class: str
    arrival_s: float
    deadline_s: float
    prompt_tokens: int
    max_tokens: int
    stream: bool  # a response per chunk; else one response with the whole text at the end
    payload: Any  # the front's request (RouterRequest, WorkloadRequest): drivers read it
    sink: ClientSink
    text: list[str] = field(default_factory=list)
    tokens_done: int = 0
    gen: int = 0
    streaming: bool = False  # stream `stream_id` is open
    instance: str | None = None  # of the current or last stream
    pulled_s: float | None = None  # first Pull
    token_pull_s: float | None = None  # the Pull that led to the first token
    first_token_s: float | None = None
    scheduled_s: float | None = None  # when the engine first scheduled it (where known)
    evictions: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    # Not streamed: every chunk's `logprobs` output, in order, for its one response (extras keeps
    # only the latest chunk's, which is what a streamed response needs).
    logprob_parts: list[Any] = field(default_factory=list)
    resume_context: int = 0  # tokens the open stream resumed with, until its engine reports hits

    @property
    def stream_id(self) -> str:
        return f"{self.rid}.{self.gen}"


__all__ = [
    "OUTCOMES",
    "Chunk",
    "ClientSink",
    "Driver",
    "ErrorKind",
    "Flight",
    "Outcome",
    "StopKind",
]
