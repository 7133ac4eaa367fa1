"""KV kept across an eviction, the vLLM way (issue 16, item 3), on the real CPU engine.

vLLM v1 recomputes a preempted or aborted request, but its prefix cache keeps the request's full
KV blocks (hashed by content) until the allocator hands them out again. So the router resumes an
evicted request with exactly the same tokens (prompt + text so far, no cache salt) and the resume
finds them: the engine reports `num_cached_tokens` (our engines' `return_num_cached_tokens`).

Here, directly on the engine: a long-prompt request streams, is cancelled (the engine aborts it,
as the router's eviction does), and its resume reports cached tokens > 0: the engine gave it the
aborted request's exact token ids (vllm_engine/resume.py). The same text again, tokenized as
text, finds less (re-tokenized output diverges from the sampled tokens); after the engine's prefix
cache is reset (a sleep and wake: vLLM's sleep level 1 resets it) it finds 0. The engine-side
prefill of each (its trace: scheduled to first token), and what the simulator's prefix-cache
model (engine/sim.py) predicts for the same requests, go to results/integration_vllm.json. Times
here are figures, not asserts.

Runs first of the real-vLLM files (alphabetical): the engine is idle and left awake.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_KEY, VllmServer
from tries import Tries, cancel_cause
from vllm_client import Stream, generate, make_inputs

from qlm_backend.engine.hardware import KV_BLOCK_TOKENS
from qlm_backend.engine.perf import PerfModel
from qlm_backend.engine.sim import EngineRequest, SimEngine
from qlm_backend.vllm_engine.trace import parse_trace_text

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

CORPUS = Path(__file__).resolve().parents[2] / "qlm_backend" / "data" / "tiny_corpus.txt"
PRODUCED = 48  # tokens the first request streams before its "eviction"
RESUME_OUTPUTS = ("text_output", "num_input_tokens", "num_cached_tokens")


def _prompt() -> str:
    # Real text (the tokenizer's own corpus): about 1,500 tokens, so the prefill is visible.
    return CORPUS.read_text()[:6000]


def _wait_idle(vs: VllmServer, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = vs.metrics()
        if m.get("vllm:num_requests_running") == 0 and m.get("vllm:num_requests_waiting") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the engine did not become idle")


def _control(vs: VllmServer, op: str) -> str:
    r = generate(
        vs.grpc_url, "-", False, None, parameters={"qlm_control": op, "qlm_admin_key": ADMIN_KEY}
    )
    assert r.error is None, r.error
    return r.text()


def _resume(vs: VllmServer, prompt: str) -> dict[str, Any]:
    t0 = time.monotonic()
    r = generate(
        vs.grpc_url,
        prompt,
        False,
        {"max_tokens": 8, "ignore_eos": True},
        outputs=RESUME_OUTPUTS,
        exclude_input_in_output=True,
        return_num_input_tokens=True,
        return_num_cached_tokens=True,
    )
    assert r.error is None, r.error
    out = r.replies[-1].outputs
    return {
        "sent": t0,
        "prompt_tokens": int(out["num_input_tokens"].reshape(-1)[0]),
        "cached_tokens": int(out["num_cached_tokens"].reshape(-1)[0]),
    }


def _engine_side(vs: VllmServer, sent: float, prompt_tokens: int) -> dict[str, float]:
    """The engine's own record of a request sent at `sent`: scheduled to first token."""
    time.sleep(0.3)  # the trace line is logged after the final response
    mine = [
        t
        for t in vs.traces().values()
        if t["arrival"] >= sent and int(t["prompt_tokens"]) == prompt_tokens
    ]
    assert len(mine) == 1, mine
    t = mine[0]
    return {
        "prefill_s": round(t["engine_first_token"] - t["scheduled"], 4),
        "trace_cached_tokens": int(t["cached_tokens"]),
        "exact_resume": bool(t["exact_resume"]),
    }


def _model_prediction(prompt_tokens: int, produced: int) -> int:
    """What engine/sim.py's prefix cache predicts a resume finds after an abort at `produced`
    tokens, on an engine with room to spare (as here: nothing else ran in between)."""
    eng = SimEngine(PerfModel.from_names("tiny-llama", "cpu-2core"))
    eng.add(EngineRequest("r", prompt_tokens, 400, 400), 0.0)
    now = 0.0
    done = 0
    while done < produced:
        now = eng.next_event_s() or now
        done += sum(1 for ev in eng.advance(now) if ev.request_id == "r")
    eng.abort("r", now)
    return eng.cached_tokens("r")


def _stream_then_cancel(vs: VllmServer, prompt: str) -> tuple[list[str], int, Any]:
    """The request that will be evicted: it streams until PRODUCED tokens are out, then its client
    cancels (the engine aborts it, as an eviction's stream cancel does). Returns its text, tokens
    received and the try's cause (judged when the engine's trace says it was aborted)."""
    sent = time.monotonic()
    first = Stream(
        vs.grpc_url,
        make_inputs(
            prompt,
            True,
            {"max_tokens": 6000, "ignore_eos": True},
            exclude_input_in_output=True,
            return_num_output_tokens=True,
        ),
        outputs=("text_output", "num_output_tokens"),
    )
    texts: list[str] = []
    produced = 0
    while produced < PRODUCED:
        r = first.next(timeout=120)
        assert not isinstance(r, str), r
        texts.append(r.outputs["text_output"][0].decode("utf-8", "replace"))
        produced += int(r.outputs["num_output_tokens"].reshape(-1)[0])
    cancelled = time.monotonic()
    first.cancel()
    first.close()
    _wait_idle(vs, timeout_s=60)
    time.sleep(0.3)  # the trace line is logged after the request ends
    log = vs.log_path.read_text(errors="replace")
    mine = {r: t for r, t in vs.traces().items() if t["arrival"] >= sent}
    assert len(mine) == 1, mine
    [(rid, t)] = mine.items()
    if parse_trace_text(log)[rid]["reason"] == "abort":
        return texts, produced, "judged"
    return texts, produced, cancel_cause(cancelled, t["finished"], log, [rid])


def test_a_resume_after_an_abort_hits_the_prefix_cache_and_one_after_a_reset_does_not(
    vllm_server: VllmServer,
) -> None:
    vs = vllm_server
    prompt = _prompt()
    # A try is judged when the engine aborted the first request: a cancel that came after its
    # end (this client stalled) or never reached it leaves nothing to resume from (tries.py).
    tries = Tries("kv_resume_abort", max_tries=3, cancels=True)
    while tries.more():
        _wait_idle(vs)
        texts, produced, cause = _stream_then_cancel(vs, prompt)
        tries.add(cause, produced=produced)
    tries.done(vs.figures)
    resumed_prompt = prompt + "".join(texts)

    hit = _resume(vs, resumed_prompt)
    hit.update(_engine_side(vs, hit["sent"], hit["prompt_tokens"]))
    # The same text once more: the aborted request's ids were used up, so it is tokenized.
    text = _resume(vs, resumed_prompt)
    text.update(_engine_side(vs, text["sent"], text["prompt_tokens"]))
    # The control: the engine's prefix cache reset (sleep level 1 drops it), then the same resume.
    assert '"state": "asleep"' in _control(vs, "sleep")
    assert '"state": "awake"' in _control(vs, "wake")
    miss = _resume(vs, resumed_prompt)
    miss.update(_engine_side(vs, miss["sent"], miss["prompt_tokens"]))

    assert hit["exact_resume"] and not text["exact_resume"] and not miss["exact_resume"]
    assert hit["prompt_tokens"] > 1000
    # Every full block of the aborted request's context was still cached.
    assert hit["cached_tokens"] >= hit["prompt_tokens"] - 128, hit
    assert text["cached_tokens"] <= hit["cached_tokens"], text
    assert miss["cached_tokens"] == 0, miss
    # The engine's trace line says the same as its response.
    assert [hit["trace_cached_tokens"], miss["trace_cached_tokens"]] == [hit["cached_tokens"], 0]

    aborted_context = hit["prompt_tokens"]  # prompt + text so far, as the resume tokenized it
    predicted = _model_prediction(aborted_context - produced, produced)
    vs.figures["kv_resume"] = {
        "date": time.strftime("%Y-%m-%d"),
        "context_tokens": aborted_context,
        "produced_before_abort": produced,
        "exact_resume": {k: hit[k] for k in ("prompt_tokens", "cached_tokens", "prefill_s")},
        "text_resume": {k: text[k] for k in ("prompt_tokens", "cached_tokens", "prefill_s")},
        "after_reset": {k: miss[k] for k in ("prompt_tokens", "cached_tokens", "prefill_s")},
        "hit_share_real": round(hit["cached_tokens"] / aborted_context, 3),
        "hit_share_model": round(predicted / aborted_context, 3),
        "model_block_tokens": KV_BLOCK_TOKENS,
    }
    print(f"\nKV kept across an abort: {vs.figures['kv_resume']}")
