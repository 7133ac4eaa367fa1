"""Which instances have gone silent under open streams, so that the driver probes them.

Why: Triton 2.51 ends none of a dead Python stub's streams and keeps listing its model READY
(docs/triton-vllm-facts.md section 8). A router whose streams sit on such an engine hears nothing
from them and, its slots there being full, sends it nothing new, so it never meets the "Stub
process ... is not healthy" error that starts a recovery: in the 10-minute chaos run a killed engine
served again only after its clients had given up on its streams at their 120 s deadline and a new
request met the error (138 s, docs/reliability.md). The watch notes when each instance last
answered; one with open streams that has said nothing for `stall_s` is due for a probe: a
one-token request, which a dead stub refuses within about a second (the stub launcher's health
wait) and a live engine takes. `StallWatch` is bookkeeping (times are arguments); `probe_engine`
sends one probe over the driver's engine client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# What a probe asks of an engine: one token of a one-word prompt.
PROBE_FIELDS: Mapping[str, Any] = {
    "text_input": "ping",
    "stream": True,
    "exclude_input_in_output": True,
    "sampling_parameters": json.dumps({"max_tokens": 1}),
}


# How a probe ended: a first response; `wait_s` with none (the engine took it: alive, maybe slow;
# cancelling it is an abort in the engine's counters); refused as unavailable (a dead stub); another
# error, which proves nothing.
ProbeResult = Literal["answered", "no-answer", "gone", "error"]
PROBE_RESULTS: tuple[ProbeResult, ...] = ("answered", "no-answer", "gone", "error")


@dataclass
class StallWatch:
    stall_s: float = 5.0
    _open: dict[str, int] = field(default_factory=dict)  # instance -> streams open there
    _heard: dict[str, float] = field(default_factory=dict)  # instance -> last sign of life
    _probing: set[str] = field(default_factory=set)

    def opened(self, instance: str, now: float) -> None:
        """A stream opened on `instance`; an idle instance's silence counts from now."""
        if not self._open.get(instance):
            self._heard[instance] = now
        self._open[instance] = self._open.get(instance, 0) + 1

    def closed(self, instance: str) -> None:
        n = self._open.get(instance, 0) - 1
        if n > 0:
            self._open[instance] = n
        else:
            self._open.pop(instance, None)

    def heard(self, instance: str, now: float) -> None:
        """A response came from `instance`."""
        self._heard[instance] = now

    def due(self, now: float) -> list[str]:
        """Instances to probe now (each is marked probing until `probed`)."""
        out = [
            i
            for i, n in self._open.items()
            if n > 0 and i not in self._probing and now - self._heard.get(i, now) >= self.stall_s
        ]
        self._probing.update(out)
        return sorted(out)

    def probed(self, instance: str, now: float) -> None:
        """The probe ended: alive or not, the silence counts again from now."""
        self._probing.discard(instance)
        self._heard[instance] = now

    @property
    def watching(self) -> bool:
        return bool(self._open)


class _Streams(Protocol):
    def stream(self, model: str, fields: Mapping[str, Any], request_id: str) -> Any: ...


async def probe_engine(
    client: _Streams, model: str, request_id: str, wait_s: float
) -> tuple[ProbeResult, str]:
    """(how it ended, what happened): "gone" when the engine refused the probe as unavailable (a
    dead stub: "... is not healthy"); a first response or an end is "answered", `wait_s` without
    one "no-answer" (it took the request: alive, maybe slow). The probe is cancelled either way.
    Engine errors are those of router/stream_driver.py (an `unavailable` attribute)."""
    stream = client.stream(model, PROBE_FIELDS, request_id)
    gen = stream.chunks()
    try:
        await asyncio.wait_for(anext(gen), timeout=wait_s)
        return "answered", "answered"
    except StopAsyncIteration:
        return "answered", "ended"
    except TimeoutError:
        return "no-answer", f"took it (no answer in {wait_s:g} s)"
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - only an engine's "gone" proves anything
        return ("gone" if getattr(e, "unavailable", False) else "error"), str(e)
    finally:
        stream.cancel()
        close = getattr(gen, "aclose", None)  # an async generator's, if it is one
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


__all__ = ["PROBE_FIELDS", "PROBE_RESULTS", "ProbeResult", "StallWatch", "probe_engine"]
