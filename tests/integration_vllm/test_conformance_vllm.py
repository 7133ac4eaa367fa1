"""The vllm_backend conformance table on the real vLLM engine, directly and through `qlm-vllm`.

docs/request-contract.md ("Conformance with vllm_backend") has the rules; tests/unit/
test_conformance_matrix.py checks every combination on the shared response code. Here every stream x
logprobs (absent, 0, 2) x exclude_input_in_output combination, with all five return_* flags, goes
over gRPC to the engine model and to the router: the tensor set, datatype and shape a client
receives, the values against vLLM's rules, and the router's values against the engine's (greedy
decoding, so both produce the same tokens).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MAX_NUM_SEQS, VllmServer
from vllm_client import ENGINE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from streams import is_final, raw_responses  # noqa: E402

from qlm_backend.contract import VLLM_BACKEND_FLAGS  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(180)]

ROUTER, MODEL = "qlm-vllm", "tiny-llama"
PROMPT = "The lighthouse keeper rose before the gulls"
MAX_TOKENS = 4
FLAGS = VLLM_BACKEND_FLAGS  # the five return_* inputs vllm_backend reads
LAYOUT = {  # numpy dtype and shape a gRPC client gets, as from vllm_backend (n=1)
    "text_output": (np.object_, (1,)),
    "finish_reason": (np.object_, (1,)),
    "cumulative_logprob": (np.float32, (1,)),
    "logprobs": (np.object_, (1,)),
    "num_input_tokens": (np.uint32, ()),
    "num_output_tokens": (np.uint32, (1,)),
}
MODES = list(itertools.product((True, False), (None, 0, 2), (None, True, False)))


def fields(stream: bool, k: int | None, exclude: bool | None, router: bool) -> dict[str, Any]:
    sp: dict[str, Any] = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.0}
    if k is not None:
        sp["logprobs"] = k
    f: dict[str, Any] = {
        "text_input": PROMPT,
        "stream": stream,
        "sampling_parameters": json.dumps(sp),
    }
    if exclude is not None:
        f["exclude_input_in_output"] = exclude
    f.update({flag: True for flag in FLAGS})
    if router:
        f.update(model=MODEL, slo_class="interactive")
    return f


def collect(url: str, model: str, f: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """Every response of one request (all outputs: none named), and the error if one came."""
    results, error = raw_responses(url, model, f, timeout_s=120)
    replies = []
    for r in results:
        out = {o.name: r.as_numpy(o.name) for o in r.get_response().outputs}
        out["_final"] = is_final(r)
        replies.append(out)
    return replies, error


def _text(arr: np.ndarray) -> str:
    return bytes(arr.reshape(-1)[0]).decode("utf-8", "replace")


def check(mode: tuple[bool, int | None, bool | None], replies: list[dict[str, Any]],
          error: str | None, router: bool) -> dict[str, Any]:  # fmt: skip
    stream, k, exclude = mode
    if stream and exclude is False:
        assert error is not None and "exclude_input_in_output" in error and not replies
        return {}
    assert error is None, error
    assert [r["_final"] for r in replies] == [False] * (len(replies) - 1) + [True]
    assert stream or len(replies) == 1
    for r in replies:
        extra = {"qlm_queue_s", "qlm_instance"} if router and r["_final"] else set()
        assert set(r) - {"_final"} == set(LAYOUT) | extra, sorted(r)
        for name, (dtype, shape) in LAYOUT.items():
            assert (r[name].dtype, r[name].shape) == (np.dtype(dtype), shape), name
    text = "".join(_text(r["text_output"]) for r in replies)
    prepend = not exclude if exclude is not None else not stream
    assert text.startswith(PROMPT) == prepend
    reasons = [_text(r["finish_reason"]) for r in replies]
    assert reasons == ["None"] * (len(replies) - 1) + ["length"]
    counts = [int(r["num_output_tokens"].item()) for r in replies]
    assert sum(counts) == MAX_TOKENS
    n_in = {int(r["num_input_tokens"].item()) for r in replies}
    assert len(n_in) == 1 and min(n_in) > 0
    lps = [_text(r["logprobs"]) for r in replies]
    cum = [float(r["cumulative_logprob"].item()) for r in replies]
    agg: dict[str, Any] = {"text": text, "num_input_tokens": n_in.pop()}
    if k is None:
        assert set(lps) == {"null"} and all(math.isnan(c) for c in cum)
        return agg
    tokens = []
    for lp, n in zip(lps, counts, strict=True):
        entries = json.loads(lp)
        assert len(entries) == n  # one entry per new token
        tokens += entries
    sampled = []
    for tok in tokens:
        (tid, first), *rest = tok.items()
        # The sampled token first, with its rank; then the top k (ranks 1..k), once each.
        assert set(first) == {"logprob", "rank", "decoded_token"}
        ranks = {first["rank"]} | {e["rank"] for _, e in rest}
        assert set(range(1, k + 1)) <= ranks
        assert len(tok) == k + (first["rank"] > k)
        sampled.append((tid, first["logprob"]))
    assert math.isclose(cum[-1], sum(lp for _, lp in sampled), abs_tol=1e-3)
    agg.update(token_ids=[tid for tid, _ in sampled], logprobs=[lp for _, lp in sampled])
    agg["cumulative_logprob"] = cum[-1]
    return agg


def test_engine_and_router_answer_every_mode_as_vllm_backend(vllm_server: VllmServer) -> None:
    jobs = [(mode, router) for mode in MODES for router in (False, True)]

    def one(job: tuple[Any, bool]) -> tuple[list[dict[str, Any]], str | None]:
        mode, router = job
        return collect(vllm_server.grpc_url, ROUTER if router else ENGINE, fields(*mode, router))

    with ThreadPoolExecutor(max_workers=MAX_NUM_SEQS) as pool:
        results = dict(zip(jobs, pool.map(one, jobs), strict=True))
    for mode in MODES:
        direct = check(mode, *results[(mode, False)], router=False)
        routed = check(mode, *results[(mode, True)], router=True)
        assert routed.keys() == direct.keys(), mode
        for key in ("text", "num_input_tokens", "token_ids"):
            assert routed.get(key) == direct.get(key), (mode, key)
        for key in ("logprobs", "cumulative_logprob"):
            if key in direct:
                assert np.allclose(routed[key], direct[key], atol=1e-3), (mode, key)
