"""The simulated vLLM engine as a Triton Python-backend model (decoupled).

It serves the I/O contract of Triton's vllm_backend, so a real `backend: "vllm"` model can replace
it with a config change only. Behind it runs engine/sim.py's continuous-batching model against the
wall clock (scaled by `time_scale`); tokens are synthetic words (engine/tokens.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from qlm_backend.contract import ENGINE_INPUT_NAMES, GenerateParams, Responder, parse_generate
from qlm_backend.engine.config import EngineConfig, load_engine_config
from qlm_backend.engine.sim import EngineRequest, SimEngine, TokenEvent
from qlm_backend.engine.tokens import (
    SynthToken,
    TokenStream,
    count_prompt_tokens,
    draw_output_length,
    logprobs_json,
    request_seed,
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

# is_cancelled() is an IPC round trip: poll each request this often (wall seconds), not every step.
CANCEL_POLL_S = 0.05


@dataclass
class _Active:
    sender: Any
    params: GenerateParams
    prompt_tokens: int
    stream: TokenStream
    start_wall: float
    responder: Responder
    tokens: list[SynthToken] = field(default_factory=list)
    first_token_wall: float | None = None
    cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission
    logprob_sum: float = 0.0


# The router's engine stream ids: `<rid>.<generation>`. A resume of an evicted request is a new
# generation of the same rid whose prompt starts with the old one's (prompt + text so far), so
# the same rid and prompt head key the same cached context, as vLLM's content-hashed blocks would.
_ROUTER_STREAM = re.compile(r"^(q\d+)\.\d+$")


def prefix_key(request_id: str, prompt: str) -> str | None:
    """The prefix-cache key of a request the router resumes; None (its own) for any other."""
    m = _ROUTER_STREAM.match(request_id)
    if m is None:
        return None
    # Several routers may share an engine and number their requests alike: the prompt's head
    # tells their requests apart.
    return f"{m.group(1)}:{hashlib.sha1(prompt[:32].encode()).hexdigest()[:12]}"


class SimEngineModel:
    """TritonPythonModel for engine models: model.py does `from ... import SimEngineModel as TritonPythonModel`."""

    def initialize(self, args: dict[str, str]) -> None:
        self.logger = pb_utils.Logger
        self.name = args["model_name"]
        self.version = args["model_version"]
        cfg = model_config(args)
        if not pb_utils.using_decoupled_model_transaction_policy(cfg):
            raise pb_utils.TritonModelException(f"{self.name}: the engine model must be decoupled")
        self.cfg: EngineConfig = load_engine_config(
            cfg, Path(args["model_repository"]) / args["model_version"]
        )
        perf = self.cfg.perf()
        self.max_context = perf.model.max_context_tokens
        self.engine = SimEngine(
            perf,
            max_num_seqs=self.cfg.max_num_seqs,
            max_num_batched_tokens=self.cfg.max_num_batched_tokens,
            scheduling=self.cfg.scheduling,
            preemption=self.cfg.preemption,
        )
        if self.cfg.load_mode != "none":
            # The model load itself: a swap onto this instance pays it here, as vLLM would.
            load_s = perf.load_s(warm=self.cfg.load_mode == "warm") * self.cfg.time_scale
            self.logger.log_info(f"{self.name}: {self.cfg.load_mode} load, {load_s:.2f} s")
            time.sleep(load_s)
        self.metrics = Metrics(self.name, self.version)
        self._active: dict[str, _Active] = {}
        self._seq = 0
        self._t0 = time.monotonic()
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._last_cancel_poll = 0.0
        self.loop = LoopThread(f"{self.name}-engine")
        self._runner = self.loop.submit(self._run())
        self.logger.log_info(
            f"{self.name}: simulated {self.cfg.model} on {perf.tp} x {self.cfg.gpu}, "
            f"KV {perf.kv_capacity_tokens} tokens, time_scale {self.cfg.time_scale}"
        )

    # --- Triton entry points ------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                params = parse_generate(
                    read_inputs(request, ENGINE_INPUT_NAMES),
                    request.parameters(),
                    self.max_context,
                    count_prompt_tokens,
                    default_stream=self.cfg.default_stream,
                )
            except Exception as e:  # noqa: BLE001 - every bad request gets its error, never silence
                send_error(sender, f"{self.name}: {e}", error_kind(e))
                continue
            self.loop.call(self._admit, sender, params, request.request_id())
        return None

    def finalize(self) -> None:
        self._closing = True
        self.loop.call(self._drain)
        try:
            self._runner.result(timeout=10)
        except Exception:  # noqa: BLE001 - best effort on unload
            pass
        self.loop.stop()

    # --- the loop -----------------------------------------------------------------------------
    def _now(self) -> float:
        return (time.monotonic() - self._t0) / self.cfg.time_scale

    def _admit(self, sender: Any, params: GenerateParams, request_id: str = "") -> None:
        if self._closing:
            send_error(sender, f"{self.name}: model is unloading", "unavailable")
            return
        self._seq += 1
        rid = f"r{self._seq}"
        n_prompt = count_prompt_tokens(params.prompt)
        s = params.sampling
        seed = request_seed(params.prompt, s.seed)
        target = (
            s.max_tokens
            if s.ignore_eos
            else draw_output_length(seed, self.cfg.mean_output_tokens, s.max_tokens)
        )
        target = max(target, s.min_tokens)
        act = _Active(
            sender, params, n_prompt, TokenStream(seed), time.monotonic(), Responder(params)
        )
        self._active[rid] = act
        key = prefix_key(request_id, params.prompt)
        if key is not None:
            act.cached_tokens = min(n_prompt, self.engine.cached_tokens(key))
        try:
            self.engine.add(
                EngineRequest(
                    rid, n_prompt, s.max_tokens, target, params.priority, self._now(), key
                ),
                self._now(),
            )
        except ValueError as e:
            del self._active[rid]
            send_error(sender, f"{self.name}: text_input: {e}", "invalid")
            return
        if self._wake is not None:
            self._wake.set()

    def _drain(self) -> None:
        for rid, act in list(self._active.items()):
            self.engine.abort(rid, self._now())
            send_error(
                act.sender,
                f"{self.name}: model unloaded while the request was running",
                "unavailable",
            )
        self._active.clear()
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        while not self._closing:
            nxt = self.engine.next_event_s()
            if nxt is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = (nxt - self._now()) * self.cfg.time_scale
            if delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                    continue  # an arrival may have started an iteration earlier
                except asyncio.TimeoutError:
                    pass
            try:
                self._deliver(self.engine.advance(self._now()))
                self._check_cancelled()
                self.metrics.set_load(self.engine.num_running, self.engine.num_waiting)
            except Exception as e:  # noqa: BLE001 - keep the engine alive; fail only what broke
                self.logger.log_error(f"{self.name}: engine step failed: {e!r}")

    def _deliver(self, events: list[TokenEvent]) -> None:
        # As vLLM's output processor does, a request gets what it produced since its last output in
        # one response: when the loop runs behind the simulated GPU (several iterations end
        # between two wake-ups), that is one response per request, not one per token.
        new: dict[str, list[SynthToken]] = {}
        ended: dict[str, str | None] = {}
        for ev in events:
            act = self._active.get(ev.request_id)
            if act is None:
                continue
            tok = act.stream.next()
            act.tokens.append(tok)
            act.logprob_sum += tok.logprob
            if act.first_token_wall is None:
                act.first_token_wall = time.monotonic()
            new.setdefault(ev.request_id, []).append(tok)
            if ev.finished:
                ended[ev.request_id] = ev.finish_reason
        for rid, toks in new.items():
            act = self._active.get(rid)
            if act is not None:  # None: a failed send of this batch aborted it
                self._send(act, toks, rid in ended, ended.get(rid))
        for rid, reason in ended.items():
            act = self._active.get(rid)
            if act is None:
                continue  # its send failed: already aborted
            self._active.pop(rid, None)
            now = time.monotonic()
            ttft = (act.first_token_wall or now) - act.start_wall
            self.metrics.observe_request(
                act.prompt_tokens, len(act.tokens), ttft, now - act.start_wall
            )
            self.metrics.finished(reason or "stop")

    def _send(self, act: _Active, toks: list[SynthToken], final: bool, reason: str | None) -> None:
        # As vLLM: log-probabilities exist only when the sampling parameters ask for them
        # (`logprobs`); otherwise vllm_backend answers logprobs "null" and cumulative_logprob NaN.
        top_k = act.params.sampling.logprobs
        serialise = top_k is not None and "return_logprobs" in act.params.returns
        arrays = act.responder.step(
            "".join(t.text for t in toks),
            len(toks),
            final=final,
            finish_reason=reason if final else None,
            logprobs=logprobs_json(toks, top_k or 0) if serialise else None,
            cumulative_logprob=act.logprob_sum if top_k is not None else None,
            num_input_tokens=act.prompt_tokens,
            num_cached_tokens=act.cached_tokens,
        )
        if arrays is None:
            return  # not streamed: one response at the end
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            act.sender.send(make_response(arrays), flags=flags)
        except Exception as e:  # noqa: BLE001 - the client is gone: stop its work
            self.logger.log_warn(f"{self.name}: send failed ({e!r}); aborting the request")
            for rid, a in list(self._active.items()):
                if a is act:
                    self.engine.abort(rid, self._now())
                    del self._active[rid]
                    self.metrics.finished("abort")

    def _check_cancelled(self) -> None:
        now = time.monotonic()
        if now - self._last_cancel_poll < CANCEL_POLL_S:
            return
        self._last_cancel_poll = now
        for rid, act in list(self._active.items()):
            if act.sender.is_cancelled():
                self.engine.abort(rid, self._now())
                del self._active[rid]
                self.metrics.finished("abort")
                send_error(act.sender, "Request was cancelled", "cancelled")
                self.logger.log_info(f"{self.name}: request {rid} cancelled by the client")
