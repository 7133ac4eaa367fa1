"""The relay: responses leave the router from a sender thread, joined when they back up.

Measured with `qlm-bench router` and py-spy (docs/benchmarks.md): with engines fast enough to
saturate the machine, half of the router's loop time was spent inside the response sender's
`send()`, which is a synchronous round trip to the Triton server process (it releases the GIL and
waits for the server to take the response). On the loop thread that wait stalled every other
stream, the planner and admission. So the loop only hands responses to a `RelaySink`, and one
sender thread makes the round trips. While a stream's responses wait for the thread, the next ones
join them (text concatenated, token counts added, the final flag kept): a stream that the machine
keeps up with sends exactly what the engine sent, with no added delay, and one it cannot keep up
with sends fewer, larger responses instead of falling further behind. A request that returns
per-token logprobs is never joined. Per request the order is kept: data, then the final response or
an error (an error drops what had not left yet: the request ended).

Heartbeats: a request that asked for them (`qlm_heartbeat_s`) gets an empty response (no text, 0
tokens, no logprobs) whenever nothing was queued for it that long, while it waits in the router's
queue or for its first token. Only a live router sends them, one that drains during a reload
included, so a client (qlm-openai's router client) tells it from a dead one by silence alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from qlm_backend.router.flight import ClientSink, ErrorKind, Flight


@dataclass
class _Data:
    flight: Flight
    text: list[str]
    tokens: int
    reason: str | None
    final: bool
    joined: int = 1  # engine responses in it
    # The flight's other outputs (logprobs, cumulative_logprob, ...) as they were when this response
    # was queued: the loop updates the flight's own with each later chunk before this one leaves.
    extras: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Error:
    message: str
    kind: ErrorKind


class RelaySink:
    """A request's ClientSink on the loop side: queues responses for the relay's thread."""

    def __init__(
        self,
        relay: Relay,
        inner: ClientSink,
        on_gone: Callable[[], object],
        join: bool,
        heartbeat_s: float | None = None,
    ):
        self.relay, self.inner, self.on_gone, self.join = relay, inner, on_gone, join
        self.pending: list[_Data | _Error] = []
        self.queued = False
        self.gone = False
        self.started = False  # a response of it has been queued before
        self.heartbeat_s = heartbeat_s
        self.last_s = relay.clock()  # when a response for it was last queued (or it arrived)

    def send(self, f: Flight, text: str, num_tokens: int, reason: str | None, final: bool) -> bool:
        if self.gone:
            return False
        if self.heartbeat_s is not None:  # the clock only where a heartbeat may follow
            self.last_s = self.relay.clock()
        extras = dict(f.extras) if f is not None and f.extras else None
        with self.relay.lock:
            last = self.pending[-1] if self.pending else None
            if self.join and isinstance(last, _Data) and not last.final:
                last.text.append(text)
                last.tokens += num_tokens
                last.reason, last.final = reason, final
                last.joined += 1
                last.extras = extras  # cumulative values: the latest chunk's stand for all
            else:
                self.pending.append(_Data(f, [text], num_tokens, reason, final, extras=extras))
            self.relay.ready(self)
        return True

    def keepalive(self, f: Flight, now_s: float) -> None:
        """Queue a heartbeat if the request asked for them and has been silent that long."""
        if self.heartbeat_s is None or self.gone or now_s - self.last_s < self.heartbeat_s:
            return
        self.last_s = now_s
        with self.relay.lock:
            if self.pending:
                return  # something is on its way already
            # Empty extras: the flight's are the last chunk's (its logprobs would go out twice).
            self.pending.append(_Data(f, [""], 0, None, False, joined=0, extras={}))
            self.relay.heartbeats += 1
            self.relay.ready(self, heartbeat=True)

    def error(self, message: str, kind: ErrorKind) -> None:
        with self.relay.lock:
            self.pending = [_Error(message, kind)]  # what had not left yet is dropped
            self.relay.ready(self)

    def is_cancelled(self) -> bool:
        return self.inner.is_cancelled()


class Relay:
    """One sender thread for all of a router's requests."""

    def __init__(
        self,
        call_on_loop: Callable[[Callable[[], object]], object],
        name: str = "relay",
        clock: Callable[[], float] = time.monotonic,
    ):
        """`call_on_loop(fn)` runs fn on the executor's loop (loop.call_soon_threadsafe); `clock`
        (wall seconds) times heartbeats."""
        self.call_on_loop, self.clock = call_on_loop, clock
        self.lock = threading.Condition()
        self._ready: deque[RelaySink] = deque()
        self._closing = False
        self.responses = 0  # responses sent
        self.engine_responses = 0  # engine responses they carried
        self.heartbeats = 0  # heartbeats queued
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def sink(
        self,
        inner: ClientSink,
        on_gone: Callable[[], object],
        join: bool = True,
        heartbeat_s: float | None = None,
    ) -> RelaySink:
        return RelaySink(self, inner, on_gone, join, heartbeat_s)

    def keepalive(self, flights: Iterable[Flight]) -> None:
        """Heartbeats for the silent ones among `flights` (the loop calls it a few times a second)."""
        now = self.clock()
        for f in flights:
            if isinstance(f.sink, RelaySink) and f.sink.heartbeat_s is not None:
                f.sink.keepalive(f, now)

    def ready(self, s: RelaySink, heartbeat: bool = False) -> None:
        """Called with the lock held: `s` has something to send. A request's first response goes
        ahead of the others' next ones: its time to first token is what an SLO counts, and those
        others lose nothing but join one more token. A heartbeat goes behind them and is not the
        request's first response."""
        if not s.queued:
            s.queued = True
            if s.started or heartbeat:
                self._ready.append(s)
            else:
                s.started = True
                self._ready.appendleft(s)
            self.lock.notify()

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._ready and not self._closing:
                    self.lock.wait()
                if not self._ready:
                    return  # closing and drained
                s = self._ready.popleft()
                s.queued = False
                items, s.pending = s.pending, []
            for item in items:
                self._deliver(s, item)

    def _deliver(self, s: RelaySink, item: _Data | _Error) -> None:
        if isinstance(item, _Error):
            s.inner.error(item.message, item.kind)
            return
        if s.gone:
            return
        self.responses += 1
        self.engine_responses += item.joined
        text = item.text[0] if len(item.text) == 1 else "".join(item.text)
        flight = item.flight if item.extras is None else replace(item.flight, extras=item.extras)
        if not s.inner.send(flight, text, item.tokens, item.reason, item.final):
            s.gone = True
            self.call_on_loop(s.on_gone)  # the client left: the executor cancels the request

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued (errors of a shutdown included), then stop the thread."""
        with self.lock:
            self._closing = True
            self.lock.notify()
        self._thread.join(timeout=timeout_s)


__all__ = ["Relay", "RelaySink"]
