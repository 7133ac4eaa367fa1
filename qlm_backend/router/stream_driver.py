"""The executor's real-time driver: each stream an asyncio task over an engine client.

The engine client (`EngineClient`) is what `router/dispatch.py` implements over tritonclient's gRPC
asyncio API, one per Triton server; tests give a fake one. Everything here runs on the router's one
asyncio loop, the executor's thread, so executor calls need no lock.

A dead engine stub whose streams never end is found by a stall watch (router/stall_watch.py): an
instance with open streams that has answered nothing for `stall_s` wall seconds gets a one-token
probe; a refusal as gone fails the instance (its requests queue again, recovery reloads it).

Two races this module closes (both found once by slow integration runs):
- a Pull whose request is cancelled or evicted before its task's first step: the task asks the
  executor whether its stream is still wanted (`is_live`) and opens nothing if not;
- a stream the executor has left (eviction, cancellation) that is still running: `stop` cancels
  it, and a task that ends while no longer wanted cancels its stream again on the way out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import Any, Literal, Protocol

import numpy as np

from qlm_backend.contract import GenerateParams
from qlm_backend.router.executor import Executor
from qlm_backend.router.flight import Chunk, Flight, StopKind
from qlm_backend.router.stall_watch import ProbeResult, StallWatch, probe_engine
from qlm_backend.vllm_engine.control import ControlOp, ControlReply

WarmMode = Literal["load", "sleep", "none"]


class EngineError(RuntimeError):
    """The engine or its server failed (not the client's fault); `unavailable` when it is gone."""

    def __init__(self, message: str, unavailable: bool) -> None:
        super().__init__(message)
        self.unavailable = unavailable


class EngineStream(Protocol):
    def cancel(self) -> None: ...

    def chunks(self) -> AsyncIterator[Chunk]: ...


class EngineClient(Protocol):
    """One server's engines: stream a request, and model control."""

    def stream(self, model: str, fields: Mapping[str, Any], request_id: str) -> EngineStream: ...

    async def load(self, model: str, config: Mapping[str, Any] | None) -> None:
        """Load (or reload) `model`, with `config` overriding its config.pbtxt if given."""
        ...

    async def unload(self, model: str) -> None: ...

    async def wait_unloaded(self, model: str, timeout_s: float) -> float:
        """Seconds until `model` is fully unloaded (its memory free); EngineError past timeout_s."""
        ...

    async def control(self, model: str, op: ControlOp) -> ControlReply:
        """Sleep, wake or ask the state of a running engine (engines that can sleep only)."""
        ...

    async def is_ready(self, model: str) -> bool: ...

    async def close(self) -> None: ...


def engine_fields(
    params: GenerateParams,
    text_so_far: str,
    tokens_done: int,
    priority: int | None,
    ask_cached: bool = False,
) -> dict[str, Any]:
    """The engine request that continues a router request after `tokens_done` tokens: prompt +
    the text already sent, and only the tokens still owed (a resume is exact, not a restart).
    `ask_cached` (engines that report it): a resume asks how much its prefix cache held."""
    sampling = params.sampling.as_vllm_dict()
    sampling["max_tokens"] = params.sampling.max_tokens - tokens_done
    sampling["min_tokens"] = max(0, params.sampling.min_tokens - tokens_done)
    fields: dict[str, Any] = {
        "text_input": params.prompt + text_so_far,
        "stream": True,
        "exclude_input_in_output": True,
        "sampling_parameters": json.dumps(sampling),
        "return_finish_reason": True,
        "return_num_output_tokens": True,
    }
    for flag in ("return_cumulative_logprob", "return_logprobs", "return_num_input_tokens"):
        if flag in params.returns:
            fields[flag] = True
    if priority is not None:
        fields["priority"] = int(priority)
    if ask_cached and tokens_done:
        fields["return_num_cached_tokens"] = True
    return fields


class _Resume:
    """What a resumed stream's outputs are relative to: the values the client already had."""

    def __init__(self, extras: Mapping[str, Any]) -> None:
        self.num_input_tokens = extras.get("num_input_tokens")
        self.logprob_base = extras.get("cumulative_logprob")

    def adjust(self, ch: Chunk) -> Chunk:
        if not ch.extras:
            return ch
        x = dict(ch.extras)
        if self.num_input_tokens is not None and "num_input_tokens" in x:
            x["num_input_tokens"] = self.num_input_tokens
        if self.logprob_base is not None and "cumulative_logprob" in x:
            x["cumulative_logprob"] = np.asarray(self.logprob_base) + np.asarray(
                x["cumulative_logprob"]
            )
        return replace(ch, extras=x)


class StreamDriver:
    def __init__(
        self,
        client_for: Callable[[str], EngineClient],
        engine_name: Callable[[str, str], str],
        request_fields: Callable[[Flight, str, int], Mapping[str, Any]],
        load_override: Callable[[str, str, bool], Mapping[str, Any] | None],
        clock: Callable[[], float],
        *,
        warm_mode: Callable[[str], WarmMode] = lambda instance: "load",
        load_timeout_s: float = 300.0,
        retry_s: tuple[float, float] = (0.5, 30.0),
        log: Callable[[str, str], None] = lambda level, msg: None,
        stall_s: float = 10.0,
        probe_s: float = 3.0,
        on_probe: Callable[[str, ProbeResult], None] = lambda instance, result: None,
    ) -> None:
        """`engine_name(model, instance)` names the engine model; `request_fields(flight,
        instance, priority)` builds its request; `load_override(engine, instance, warm)` the config
        override a load sends (None: the engine's own config); `warm_mode(instance)` how its engines
        start warm: "load" (the load itself, told by its override: simulated engines), "sleep"
        (a swap puts the outgoing engine to sleep and wakes the incoming one; Release unloads a
        sleeping one: our vLLM engine) or "none" (every load is cold). `stall_s`: wall seconds of
        silence under open streams before an instance is probed; `probe_s`: how long a probe
        waits for a refusal; `on_probe(instance, result)` counts each probe's end."""
        self.client_for, self.engine_name = client_for, engine_name
        self.request_fields, self.load_override = request_fields, load_override
        self.warm_mode = warm_mode
        # (instance, model) whose engine is loaded and asleep; entered before the sleep is sent,
        # so that a Release arriving meanwhile still finds it.
        self.asleep: set[tuple[str, str]] = set()
        self.clock, self.load_timeout_s, self.retry_s, self.log = (
            clock,
            load_timeout_s,
            retry_s,
            log,
        )
        self.ex: Executor | None = None
        self.closing = False
        self._streams: dict[str, EngineStream] = {}
        self.dead_stubs: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.watch = StallWatch(stall_s)
        self.probe_s, self.on_probe = probe_s, on_probe
        self.stall_probes = 0  # probes sent
        self._where: dict[str, tuple[str, str]] = {}  # stream id -> (instance, engine model)
        self._watching = False

    def bind(self, ex: Executor) -> None:
        self.ex = ex

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ the Driver protocol
    def open(self, flight: Flight, instance_id: str, priority: int, now: float) -> None:
        self._spawn(self._run(flight, flight.stream_id, instance_id, priority))

    def stop(self, flight: Flight, stream_id: str, kind: StopKind, now: float) -> None:
        self._cancel_stream(stream_id, kind)

    def _cancel_stream(self, stream_id: str, why: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.cancel()  # reaches the engine's is_cancelled() within a step
            self.log("info", f"stream {stream_id}: stopped ({why})")

    def swap(
        self,
        instance_id: str,
        from_model: str | None,
        to_model: str,
        warm: bool,
        keep_from: bool,
        now: float,
    ) -> None:
        self._spawn(self._swap(instance_id, from_model, to_model, warm, keep_from))

    def release(self, instance_id: str, model: str, now: float) -> None:
        if (instance_id, model) in self.asleep:
            self.asleep.discard((instance_id, model))
            self._spawn(self._unload(instance_id, model))

    def recover(self, instance_id: str, model: str, now: float) -> None:
        self._spawn(self._recover(instance_id, model))

    # ------------------------------------------------------------------ tasks
    async def _run(self, f: Flight, sid: str, instance: str, priority: int) -> None:
        ex = self.ex
        assert ex is not None, "bind() the executor first"
        if not ex.is_live(sid):
            return  # left before this task ran: no stream was opened, none may be now
        stream: EngineStream | None = None
        ended = False
        # A resumed request's engine sees prompt + text so far: its prompt count and cumulative
        # log-probability restart there. The client gets the first request's values.
        resumed = _Resume(f.extras) if f.tokens_done else None
        try:
            name = self.engine_name(f.model, instance)
            stream = self.client_for(instance).stream(
                name, self.request_fields(f, instance, priority), sid
            )
            self._streams[sid] = stream
            loop = asyncio.get_running_loop()
            self._where[sid] = (instance, name)
            self.watch.opened(instance, loop.time())
            self._ensure_watch()
            async for ch in stream.chunks():
                self.watch.heard(instance, loop.time())
                if not ex.is_live(sid):
                    return
                ended = ch.finish_reason is not None
                ex.on_chunk(sid, resumed.adjust(ch) if resumed else ch, self.clock())
                if ended:
                    return
        except EngineError as e:
            if "is not healthy" in str(e):
                # Its stub died: Triton still lists the model ready and reloads nothing
                # (docs/triton-vllm-facts.md section 8), so recovery must reload it.
                self.dead_stubs.add(self.engine_name(f.model, instance))
            ex.on_stream_error(sid, str(e), e.unavailable, self.clock())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug must not leave the client waiting
            self.log("error", f"stream {sid} failed: {e!r}")
            ex.on_stream_error(sid, f"internal error: {e}", False, self.clock())
        finally:
            self._streams.pop(sid, None)
            if self._where.pop(sid, None) is not None:
                self.watch.closed(instance)
            if stream is not None and not ended and not ex.is_live(sid):
                stream.cancel()  # whoever left it, its engine request stops

    def _ensure_watch(self) -> None:
        if not self._watching:
            self._watching = True
            self._spawn(self._watch_loop())

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.closing and self.watch.watching:
                await asyncio.sleep(min(1.0, self.watch.stall_s / 2))
                for instance in self.watch.due(loop.time()):
                    self._spawn(self._probe(instance))
        finally:
            self._watching = False

    async def _probe(self, instance: str) -> None:
        """One token asked of a silent instance's engine: refused as gone, the instance fails."""
        loop = asyncio.get_running_loop()
        names = [n for i, n in self._where.values() if i == instance]
        if not names:
            self.watch.probed(instance, loop.time())
            return
        name = names[0]
        self.stall_probes += 1
        self.log(
            "warn",
            f"instance {instance}: nothing from {len(names)} open stream(s) for "
            f"{self.watch.stall_s:g} s: probing {name}",
        )
        try:
            result, what = await probe_engine(
                self.client_for(instance),
                name,
                f"qlm-stall-probe-{self.stall_probes}",
                self.probe_s,
            )
        finally:
            self.watch.probed(instance, loop.time())
        gone = result == "gone"
        self.on_probe(instance, result)
        self.log("warn" if gone else "info", f"instance {instance}: probe of {name}: {what}")
        if gone:
            self._instance_gone(instance, name, what)

    def _instance_gone(self, instance: str, name: str, message: str) -> None:
        ex = self.ex
        assert ex is not None
        if "is not healthy" in message:
            self.dead_stubs.add(name)  # recovery unloads it before the load
        msg = f"{name}: silent under open streams and refused a probe ({message})"
        for sid, (i, _) in list(self._where.items()):
            # The first stream the executor still has fails the instance: every request on it
            # queues again with what it produced, and recovery reloads the engine. The executor
            # stops the others; this one it takes for ended, but it hangs: it is cancelled here,
            # or the watch would go on probing the instance for it while it reloads.
            if i == instance and ex.on_stream_error(sid, msg, True, self.clock()):
                self._cancel_stream(sid, "its instance failed")
                return

    async def _swap(
        self, instance: str, from_model: str | None, to_model: str, warm: bool, keep_from: bool
    ) -> None:
        ex = self.ex
        assert ex is not None
        client = self.client_for(instance)
        mode = self.warm_mode(instance)
        sleeps = mode == "sleep"
        t0 = self.clock()
        woken = False
        try:
            if from_model:
                await self._put_away(client, instance, from_model, sleeps and keep_from)
            name = self.engine_name(to_model, instance)
            if sleeps and (instance, to_model) in self.asleep:
                woken = await self._wake(client, instance, to_model)
            if not woken:
                await asyncio.wait_for(
                    client.load(name, self.load_override(name, instance, warm)),
                    timeout=self.load_timeout_s,
                )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed load fails the instance; recovery retries
            ex.on_load_failed(instance, to_model, repr(e), self.clock())
            return
        now = self.clock()
        # A simulated engine's warm load is told by its override; a real engine is warm if woken.
        started_warm = woken or (warm and mode == "load")
        how = "woken" if woken else ("warm" if started_warm else "cold")
        self.log("info", f"{instance}: {from_model} -> {to_model} ({how}) in {now - t0:.1f} s")
        ex.on_loaded(instance, to_model, now, warm=started_warm)

    async def _put_away(self, client: EngineClient, instance: str, model: str, sleep: bool) -> None:
        """The outgoing engine: asleep if the host keeps it warm and it can sleep, else unloaded."""
        name = self.engine_name(model, instance)
        if sleep:
            self.asleep.add((instance, model))
            try:
                await client.control(name, "sleep")
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - an engine that cannot sleep is unloaded
                self.asleep.discard((instance, model))
                self.log("warn", f"{instance}: {model} could not sleep ({e}); unloading it")
        await client.unload(name)
        if self.warm_mode(instance) != "load":
            # A real engine holds its memory until its process has stopped, seconds after the
            # unload returned: the incoming engine loads only then (on a GPU it would not fit).
            waited = await client.wait_unloaded(name, self.load_timeout_s)
            self.log("info", f"{instance}: {model} unloaded in {waited:.1f} s")

    async def _wake(self, client: EngineClient, instance: str, model: str) -> bool:
        """Wake a sleeping engine; False (then it loads cold) if it is gone or would not wake."""
        self.asleep.discard((instance, model))
        try:
            reply = await client.control(self.engine_name(model, instance), "wake")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. released or crashed meanwhile
            self.log("warn", f"{instance}: {model} did not wake ({e}); loading it cold")
            return False
        return not reply.asleep

    async def _unload(self, instance: str, model: str) -> None:
        try:
            await self.client_for(instance).unload(self.engine_name(model, instance))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - nothing waits on it; say so and go on
            self.log("warn", f"{instance}: unloading sleeping {model} failed: {e}")

    async def _recover(self, instance: str, model: str) -> None:
        """Reload the model (or find it ready) with exponential backoff until it serves."""
        ex = self.ex
        assert ex is not None
        delay, cap = self.retry_s
        name = self.engine_name(model, instance)
        while not self.closing:
            await asyncio.sleep(delay)
            client = self.client_for(instance)
            try:
                if name in self.dead_stubs:
                    try:
                        await client.unload(name)
                    except Exception as e:  # noqa: BLE001 - the load below says whether it serves
                        self.log("warn", f"{name}: unloading the dead stub's model: {e}")
                    self.dead_stubs.discard(name)
                    await asyncio.wait_for(
                        client.load(name, self.load_override(name, instance, False)),
                        timeout=self.load_timeout_s,
                    )
                elif not await client.is_ready(name):
                    await asyncio.wait_for(
                        client.load(name, self.load_override(name, instance, False)),
                        timeout=self.load_timeout_s,
                    )
                elif self.warm_mode(instance) == "sleep":
                    # Ready in Triton's index says nothing of sleep: an engine left asleep (by a
                    # router that died, say) would refuse every request. A wake of an awake
                    # engine is a no-op.
                    self.asleep.discard((instance, model))
                    if (await client.control(name, "wake")).asleep:
                        raise EngineError(f"{name} stays asleep", unavailable=True)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep trying, slower
                self.log("warn", f"instance {instance} still failing: {e}")
                delay = min(delay * 2, cap)
                continue
            self.log("info", f"instance {instance} recovered with {model}")
            ex.on_loaded(instance, model, self.clock())
            return

    async def close(self) -> None:
        """Cancel every task and wait for them (the executor's shutdown ran first)."""
        self.closing = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = [
    "EngineClient",
    "EngineError",
    "EngineStream",
    "StreamDriver",
    "WarmMode",
    "engine_fields",
]
