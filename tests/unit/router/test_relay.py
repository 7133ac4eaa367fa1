"""The relay: responses leave from one sender thread, in order, joined only while they back up."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from qlm_backend.router.flight import Flight
from qlm_backend.router.relay import Relay


@dataclass
class SlowClient:
    """An inner sink whose first send blocks until `release` is set (a round trip in progress)."""

    release: threading.Event = field(default_factory=threading.Event)
    sent: list[tuple[str, int, str | None, bool]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    entered: threading.Event = field(default_factory=threading.Event)
    accept: bool = True

    def send(self, f: Any, text: str, num_tokens: int, reason: str | None, final: bool) -> bool:
        self.entered.set()
        self.release.wait(5)
        self.sent.append((text, num_tokens, reason, final))
        return self.accept

    def error(self, message: str, kind: str) -> None:
        self.errors.append((message, kind))

    def is_cancelled(self) -> bool:
        return False


def wait_for(cond: Any, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.001)


def make_relay() -> tuple[Relay, list[Any]]:
    called: list[Any] = []
    return Relay(lambda fn: called.append(fn)), called


def test_responses_that_back_up_leave_joined_in_order_with_one_final() -> None:
    relay, _ = make_relay()
    client = SlowClient()
    sink = relay.sink(client, lambda: None)
    sink.send(None, " w0", 1, None, False)  # type: ignore[arg-type]
    client.entered.wait(5)  # the thread is inside the first round trip
    for i in range(1, 9):
        sink.send(None, f" w{i}", 1, None, False)  # type: ignore[arg-type]
    sink.send(None, " w9", 1, "length", True)  # type: ignore[arg-type]
    client.release.set()
    relay.close()
    # Expected: the first alone, then everything that waited behind it as one final response.
    assert client.sent == [
        (" w0", 1, None, False),
        ("".join(f" w{i}" for i in range(1, 10)), 9, "length", True),
    ]
    assert relay.responses == 2 and relay.engine_responses == 10


def test_a_sender_that_keeps_up_sends_every_response_as_it_came() -> None:
    relay, _ = make_relay()
    client = SlowClient()
    client.release.set()
    sink = relay.sink(client, lambda: None)
    for i in range(5):
        sink.send(None, f" w{i}", 1, None, i == 4)  # type: ignore[arg-type]
        wait_for(lambda i=i: len(client.sent) == i + 1)
    relay.close()
    assert [s[0] for s in client.sent] == [f" w{i}" for i in range(5)]


def test_responses_with_per_token_logprobs_are_never_joined() -> None:
    relay, _ = make_relay()
    client = SlowClient()
    sink = relay.sink(client, lambda: None, join=False)
    sink.send(None, "a", 1, None, False)  # type: ignore[arg-type]
    client.entered.wait(5)
    sink.send(None, "b", 1, None, False)  # type: ignore[arg-type]
    sink.send(None, "c", 1, "stop", True)  # type: ignore[arg-type]
    client.release.set()
    relay.close()
    assert client.sent == [("a", 1, None, False), ("b", 1, None, False), ("c", 1, "stop", True)]


def extras_recording_client() -> tuple[SlowClient, list[dict[str, Any]]]:
    """A SlowClient that also records the flight's extras as each response reaches it."""
    client, seen = SlowClient(), []
    inner_send = client.send

    def send(f: Any, text: str, num_tokens: int, reason: str | None, final: bool) -> bool:
        seen.append(dict(f.extras))
        return inner_send(f, text, num_tokens, reason, final)

    client.send = send  # type: ignore[method-assign]
    return client, seen


def test_each_response_leaves_with_the_outputs_of_its_own_chunk() -> None:
    # The loop updates the flight's extras with every chunk before the relay thread sends the
    # responses before it: each response must carry its own chunk's logprobs, not the latest.
    relay, _ = make_relay()
    client, seen = extras_recording_client()
    f = Flight("r1", "m", "c", 0.0, 1.0, 1, 3, stream=True, payload=None, sink=client)
    sink = relay.sink(client, lambda: None, join=False)
    for i, final in enumerate((False, False, True)):
        f.extras.update(logprobs=f"[{i}]", cumulative_logprob=-float(i))
        sink.send(f, f"t{i}", 1, "length" if final else None, final)
        if i == 0:
            client.entered.wait(5)  # the first is in its round trip: the others queue behind it
    client.release.set()
    relay.close()
    assert [x["logprobs"] for x in seen] == ["[0]", "[1]", "[2]"]
    assert [x["cumulative_logprob"] for x in seen] == [0.0, -1.0, -2.0]


def test_joined_responses_carry_the_latest_cumulative_outputs() -> None:
    relay, _ = make_relay()
    client, seen = extras_recording_client()
    f = Flight("r1", "m", "c", 0.0, 1.0, 1, 3, stream=True, payload=None, sink=client)
    sink = relay.sink(client, lambda: None)
    for i, final in enumerate((False, False, True)):
        f.extras["cumulative_logprob"] = -float(i)
        sink.send(f, f"t{i}", 1, "length" if final else None, final)
        if i == 0:
            client.entered.wait(5)
    client.release.set()
    relay.close()
    assert client.sent == [("t0", 1, None, False), ("t1t2", 2, "length", True)]
    assert [x["cumulative_logprob"] for x in seen] == [0.0, -2.0]


def test_an_error_drops_what_had_not_left_and_follows_what_had() -> None:
    relay, _ = make_relay()
    client = SlowClient()
    sink = relay.sink(client, lambda: None)
    sink.send(None, "a", 1, None, False)  # type: ignore[arg-type]
    client.entered.wait(5)
    sink.send(None, "b", 1, None, False)  # type: ignore[arg-type]
    sink.error("Request was cancelled", "cancelled")
    client.release.set()
    relay.close()
    assert client.sent == [("a", 1, None, False)]
    assert client.errors == [("Request was cancelled", "cancelled")]


def test_a_client_that_left_is_reported_to_the_loop_once_and_refused_after() -> None:
    relay, called = make_relay()
    client = SlowClient(accept=False)
    client.release.set()
    gone = object()
    sink = relay.sink(client, lambda: gone)
    sink.send(None, "a", 1, None, False)  # type: ignore[arg-type]
    wait_for(lambda: len(called) == 1)
    assert called[0]() is gone  # the executor's cancel runs on its loop, not on the thread
    assert sink.send(None, "b", 1, None, False) is False  # type: ignore[arg-type]
    relay.close()
    assert len(called) == 1 and client.sent == [("a", 1, None, False)]


def test_close_delivers_what_is_queued_before_it_stops() -> None:
    relay, _ = make_relay()
    client = SlowClient()
    client.release.set()
    sinks = [relay.sink(client, lambda: None) for _ in range(20)]
    for s in sinks:
        s.error("the router is unloading", "unavailable")
    relay.close()
    assert client.errors == [("the router is unloading", "unavailable")] * 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def heartbeat_rig(heartbeat_s: float | None) -> tuple[Relay, FakeClock, SlowClient, Flight]:
    clock = FakeClock()
    relay = Relay(lambda fn: None, clock=clock)
    client, _ = extras_recording_client()
    client.release.set()
    f = Flight("r1", "m", "c", 0.0, 1.0, 1, 3, stream=True, payload=None, sink=client)
    f.sink = relay.sink(client, lambda: None, heartbeat_s=heartbeat_s)
    return relay, clock, client, f


def test_a_silent_request_that_asked_gets_an_empty_heartbeat_each_period() -> None:
    relay, clock, client, f = heartbeat_rig(0.5)
    f.extras["logprobs"] = "[-0.1]"  # the last chunk's: a heartbeat must not send it again
    clock.now += 0.4
    relay.keepalive([f])  # silent 0.4 s of 0.5: nothing
    clock.now += 0.1
    relay.keepalive([f])
    wait_for(lambda: len(client.sent) == 1)
    f.sink.send(f, "tok", 1, None, False)  # a token resets the period
    wait_for(lambda: len(client.sent) == 2)
    clock.now += 0.3
    relay.keepalive([f])
    clock.now += 0.3
    relay.keepalive([f])
    relay.close()
    # Expected: heartbeat (0.5 s after arrival), the token, heartbeat (0.6 s after the token)
    assert client.sent == [("", 0, None, False), ("tok", 1, None, False), ("", 0, None, False)]
    assert relay.heartbeats == 2 and relay.engine_responses == 1


def test_a_heartbeat_carries_none_of_the_last_chunk_s_outputs() -> None:
    relay, clock, client, f = heartbeat_rig(0.5)
    seen: list[dict[str, Any]] = []
    inner_send = client.send
    client.send = lambda fl, *a: (seen.append(dict(fl.extras)), inner_send(fl, *a))[1]  # type: ignore[method-assign]
    f.extras["logprobs"] = "[-0.1]"
    clock.now += 1.0
    relay.keepalive([f])
    relay.close()
    assert seen == [{}]


def test_requests_that_did_not_ask_get_no_heartbeat() -> None:
    relay, clock, client, f = heartbeat_rig(None)
    clock.now += 60.0
    relay.keepalive([f])
    relay.close()
    assert client.sent == [] and relay.heartbeats == 0
