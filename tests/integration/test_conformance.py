"""The vllm_backend conformance table through a real tritonserver: a simulated engine and `qlm`.

docs/request-contract.md ("Conformance with vllm_backend") has the rules; tests/unit/
test_conformance_matrix.py checks the full matrix on the shared response code. Here a sub-matrix goes over
gRPC to the engine model and to `qlm`: every stream x logprobs x exclude_input_in_output
combination with all five return_* flags, and again with a smaller flag set in rotation. What a
client receives is checked (tensor set, datatype, shape as the gRPC response declares it, values),
and `qlm`'s values against the engine's: the simulated engine's tokens depend only on the prompt
and the seed, so the router must hand on exactly what an engine answers directly.
"""

from __future__ import annotations

import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from streams import http_post, is_final, raw_responses

from qlm_backend.contract import VLLM_BACKEND_FLAGS

pytestmark = pytest.mark.timeout(180)

ENGINE = "mistral-7b__a10-0"
ROUTER = "qlm"
PROMPT = "Tell me about queues"  # 20 bytes: 5 simulated prompt tokens
N_IN = 5
MAX_TOKENS = 4
FLAGS = VLLM_BACKEND_FLAGS  # the five return_* inputs vllm_backend reads
SMALLER = (
    (),
    ("return_logprobs", "return_num_output_tokens"),
    ("return_cumulative_logprob",),
    ("return_finish_reason", "return_num_input_tokens"),
)
LAYOUT = {  # wire datatype and shape, as vllm_backend's responses declare them (n=1)
    "text_output": ("BYTES", [1]),
    "finish_reason": ("BYTES", [1]),
    "cumulative_logprob": ("FP32", [1]),
    "logprobs": ("BYTES", [1]),
    "num_input_tokens": ("UINT32", []),
    "num_output_tokens": ("UINT32", [1]),
}
QLM_FINAL = {"qlm_queue_s", "qlm_instance"}


@dataclass(frozen=True)
class Case:
    flags: tuple[str, ...]
    stream: bool
    logprobs: int | None
    exclude: bool | None

    def fields(self) -> dict[str, Any]:
        sp: dict[str, Any] = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "seed": 11}
        if self.logprobs is not None:
            sp["logprobs"] = self.logprobs
        f: dict[str, Any] = {
            "text_input": PROMPT,
            "stream": self.stream,
            "sampling_parameters": json.dumps(sp),
        }
        if self.exclude is not None:
            f["exclude_input_in_output"] = self.exclude
        f.update({flag: True for flag in self.flags})
        return f


MODES = list(itertools.product((True, False), (None, 0, 2), (None, True, False)))
CASES = [Case(FLAGS, *m) for m in MODES] + [
    Case(SMALLER[i % len(SMALLER)], *m) for i, m in enumerate(MODES)
]


@dataclass
class Reply:
    outputs: dict[str, tuple[str, list[int], np.ndarray]]  # name -> (datatype, shape, value)
    final: bool

    def value(self, name: str) -> Any:
        return self.outputs[name][2].reshape(-1)[0]

    def text(self, name: str) -> str:
        return bytes(self.value(name)).decode()


def collect(url: str, model: str, fields: dict[str, Any]) -> tuple[list[Reply], str | None]:
    """Every response of one request over a gRPC stream, with what its protobuf declares."""
    results, error = raw_responses(url, model, fields, timeout_s=60)
    replies = [
        Reply(
            {
                o.name: (o.datatype, list(o.shape), r.as_numpy(o.name))
                for o in r.get_response().outputs
            },
            is_final(r),
        )
        for r in results
    ]
    return replies, error


def check(case: Case, replies: list[Reply], error: str | None, router: bool) -> dict[str, Any]:
    """The table's rules for one request; returns its aggregate values for the router check."""
    if case.stream and case.exclude is False:
        assert error is not None and "exclude_input_in_output" in error and not replies
        return {}
    assert error is None, error
    # The FINAL flag rides on the last response, which has data (no empty final response).
    assert [r.final for r in replies] == [False] * (len(replies) - 1) + [True]
    assert case.stream or len(replies) == 1
    want = {"text_output"} | {f.removeprefix("return_") for f in case.flags}
    for r in replies:
        extra = QLM_FINAL if router and r.final else set()
        assert set(r.outputs) == want | extra, (case, sorted(r.outputs))
        for name in want:
            assert tuple(r.outputs[name][:2]) == LAYOUT[name], (name, r.outputs[name][:2])
            assert r.outputs[name][2].shape == tuple(LAYOUT[name][1])
    text = "".join(r.text("text_output") for r in replies)
    prepend = not case.exclude if case.exclude is not None else not case.stream
    assert text.startswith(PROMPT) == prepend
    assert len(text.removeprefix(PROMPT).split()) == MAX_TOKENS
    agg: dict[str, Any] = {"text": text}
    if "finish_reason" in want:
        reasons = [r.text("finish_reason") for r in replies]
        assert reasons == ["None"] * (len(replies) - 1) + ["length"]
    if "num_output_tokens" in want:
        counts = [int(r.value("num_output_tokens")) for r in replies]
        assert sum(counts) == MAX_TOKENS and (len(counts) == 1 or min(counts) >= 1)
    if "num_input_tokens" in want:
        assert {int(r.value("num_input_tokens")) for r in replies} == {N_IN}
    if "logprobs" in want:
        lps = [r.text("logprobs") for r in replies]
        if case.logprobs is None:
            assert set(lps) == {"null"}
        else:
            entries = [json.loads(x) for x in lps]
            for r, e in zip(replies, entries, strict=True):
                assert len(e) == len(r.text("text_output").removeprefix(PROMPT).split())
            agg["logprobs"] = [tok for e in entries for tok in e]
            for tok in agg["logprobs"]:
                # The sampled token first (the simulated one is always rank 1), then the top k.
                assert len(tok) == max(1, case.logprobs)
                assert [v["rank"] for v in tok.values()] == list(range(1, len(tok) + 1))
    if "cumulative_logprob" in want:
        cum = [float(r.value("cumulative_logprob")) for r in replies]
        if case.logprobs is None:
            assert all(math.isnan(c) for c in cum)
        else:
            assert cum == sorted(cum, reverse=True)  # a running sum of logprobs <= 0
            agg["cumulative_logprob"] = cum[-1]
            if "logprobs" in agg:
                sampled = sum(next(iter(t.values()))["logprob"] for t in agg["logprobs"])
                assert math.isclose(cum[-1], sampled, rel_tol=1e-5, abs_tol=1e-5)
    return agg


def test_engine_and_qlm_answer_every_mode_as_vllm_backend(triton) -> None:
    def one(job: tuple[str, Case]) -> tuple[list[Reply], str | None]:
        model, case = job
        fields = case.fields()
        if model == ROUTER:
            fields.update(model="mistral-7b", slo_class="interactive")
        return collect(triton.grpc_url, model, fields)

    jobs = [(m, c) for c in CASES for m in (ENGINE, ROUTER)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = dict(zip(jobs, pool.map(one, jobs), strict=True))
    for case in CASES:
        direct = check(case, *results[(ENGINE, case)], router=False)
        routed = check(case, *results[(ROUTER, case)], router=True)
        assert routed == direct, case  # value for value, whatever the responses' split


@pytest.mark.parametrize("model", [ENGINE, ROUTER])
def test_http_generate_sends_every_output_as_a_bare_value(triton, model: str) -> None:
    # Over HTTP generate a 0-d num_input_tokens (vllm_backend's) and a [1] one read the same.
    body: dict[str, Any] = {"text_input": PROMPT, "max_tokens": 2, "ignore_eos": True}
    body.update({flag: True for flag in FLAGS})
    status, text = http_post(triton.http_url, f"/v2/models/{model}/generate", body)
    assert status == 200, text
    out = json.loads(text)
    assert out["num_input_tokens"] == N_IN and out["num_output_tokens"] == 2
    assert out["finish_reason"] == "length" and out["logprobs"] == "null"
    assert out["text_output"].startswith(PROMPT)
    # Triton writes NaN as a bare `NaN` (not strict JSON; Python's json reads it), whoever sent it.
    assert '"cumulative_logprob":NaN' in text and math.isnan(out["cumulative_logprob"])
