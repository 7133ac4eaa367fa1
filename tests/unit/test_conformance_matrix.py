"""Every combination of the `return_*` flags and sampling parameters answers as Triton's vllm_backend.

The rules (docs/request-contract.md, "Conformance with vllm_backend") are written out below as
literal expected responses for one scripted request: prompt "Hello there" (3 tokens), two engine
steps producing "Hi" (2 tokens) then " you" (1 token, finish "length"). What vLLM computes for
`logprobs` absent, 0 and 2 is scripted too (vLLM gives None logprobs and None cumulative_logprob
when `logprobs` is absent). The matrix: the 32 subsets of the five flags x stream true/false x
logprobs absent/0/2 x exclude_input_in_output absent/true/false, with n=1; n=2 is refused.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from qlm_backend.contract import (
    VLLM_BACKEND_FLAGS,
    ContractError,
    Responder,
    join_logprobs,
    logprobs_text,
    parse_generate,
    vllm_logprobs_json,
)
from qlm_backend.engine.tokens import SynthToken, logprobs_json

FLAGS = VLLM_BACKEND_FLAGS  # the five return_* inputs vllm_backend reads
PROMPT = "Hello there"
N_IN = 3


def _lp(token_id: int, logprob: float, rank: int, text: str) -> dict[str, Any]:
    return {str(token_id): {"logprob": logprob, "rank": rank, "decoded_token": text}}


# Per token: the sampled token first, then the top k; k entries when the sampled token is among
# the top k (step 1), k + 1 when it is not (step 2's sampled token has rank 3).
LOGPROBS = {
    0: (
        [_lp(101, -0.5, 1, "H"), _lp(102, -0.25, 1, "i")],
        [_lp(103, -0.25, 1, " you")],
    ),
    2: (
        [
            {**_lp(101, -0.5, 1, "H"), **_lp(7, -1.5, 2, "A")},
            {**_lp(102, -0.25, 1, "i"), **_lp(8, -2.0, 2, "o")},
        ],
        [{**_lp(103, -0.25, 3, " you"), **_lp(9, -0.1, 1, " me"), **_lp(10, -0.2, 2, " us")}],
    ),
}
CUMULATIVE = (-0.75, -1.0)  # the sampled tokens' sum through each step

# Every output's datatype and shape as a client of vllm_backend receives them (n=1).
LAYOUT = {
    "text_output": (np.object_, (1,)),
    "finish_reason": (np.object_, (1,)),
    "cumulative_logprob": (np.float32, (1,)),
    "logprobs": (np.object_, (1,)),
    "num_input_tokens": (np.uint32, ()),  # np.asarray(len(prompt_token_ids)): 0-d
    "num_output_tokens": (np.uint32, (1,)),
}


def expected(stream: bool, k: int | None, prepend: bool) -> list[dict[str, Any]]:
    """Every output of every response, whatever the flags; the flags pick from it."""
    nan, null = math.nan, "null"
    lp = LOGPROBS.get(k) if k is not None else None
    if stream:
        return [
            {
                "text_output": "Hi",
                "finish_reason": "None",
                "cumulative_logprob": CUMULATIVE[0] if lp else nan,
                "logprobs": lp[0] if lp else null,
                "num_input_tokens": N_IN,
                "num_output_tokens": 2,
            },
            {
                "text_output": " you",
                "finish_reason": "length",
                "cumulative_logprob": CUMULATIVE[1] if lp else nan,
                "logprobs": lp[1] if lp else null,
                "num_input_tokens": N_IN,
                "num_output_tokens": 1,
            },
        ]
    return [
        {
            "text_output": "Hello thereHi you" if prepend else "Hi you",
            "finish_reason": "length",
            "cumulative_logprob": CUMULATIVE[1] if lp else nan,
            "logprobs": lp[0] + lp[1] if lp else null,
            "num_input_tokens": N_IN,
            "num_output_tokens": 3,
        }
    ]


@dataclass(frozen=True)
class Case:
    flags: frozenset[str]
    stream: bool
    logprobs: int | None
    exclude: bool | None

    def inputs(self, absent_false: bool) -> dict[str, np.ndarray]:
        sampling: dict[str, Any] = {"max_tokens": 3}
        if self.logprobs is not None:
            sampling["logprobs"] = self.logprobs
        out = {
            "text_input": np.array([PROMPT.encode()], dtype=np.object_),
            "stream": np.array([self.stream]),
            "sampling_parameters": np.array([json.dumps(sampling).encode()], dtype=np.object_),
        }
        if self.exclude is not None:
            out["exclude_input_in_output"] = np.array([self.exclude])
        for f in FLAGS:
            # A flag left out and a flag sent false are the same to vllm_backend: both are used.
            if f in self.flags or absent_false:
                out[f] = np.array([f in self.flags])
        return out


CASES = [
    Case(frozenset(f for f, on in zip(FLAGS, bits, strict=True) if on), stream, k, exclude)
    for bits in itertools.product((False, True), repeat=len(FLAGS))
    for stream in (True, False)
    for k in (None, 0, 2)
    for exclude in (None, True, False)
]


def _case_id(c: Case) -> str:
    flags = "".join(f.split("_")[1][0] + f.split("_")[-1][0] for f in FLAGS if f in c.flags)
    return f"{flags or 'none'}-stream{int(c.stream)}-lp{c.logprobs}-excl{c.exclude}"


def run_engine(params: Any, k: int | None) -> list[dict[str, np.ndarray]]:
    """What an engine (and the router, fed the engine's responses) sends for the scripted steps."""
    lp = LOGPROBS.get(k) if k is not None else None
    responder = Responder(params)
    sent = []
    for i, (text, n) in enumerate((("Hi", 2), (" you", 1))):
        final = i == 1
        arrays = responder.step(
            text,
            n,
            final=final,
            finish_reason="length" if final else None,
            logprobs=json.dumps(lp[i]) if lp else None,
            cumulative_logprob=CUMULATIVE[i] if lp else None,
            num_input_tokens=N_IN,
        )
        if arrays is not None:
            sent.append(arrays)
    return sent


def assert_value(name: str, got: np.ndarray, want: Any) -> None:
    dtype, shape = LAYOUT[name]
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, want {np.dtype(dtype)}"
    assert got.shape == shape, f"{name}: shape {got.shape}, want {shape}"
    value = got.reshape(-1)[0]
    if name == "logprobs":
        assert isinstance(value, bytes)
        assert json.loads(value) == (None if want == "null" else want), name
        if want == "null":
            assert value == b"null"
    elif isinstance(want, str):
        assert value == want.encode(), f"{name}: {value!r}, want {want!r}"
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(value), f"{name}: {value}, want NaN"
    else:
        assert value == want, f"{name}: {value}, want {want}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_combination_answers_as_vllm_backend(case: Case) -> None:
    for absent_false in (False, True):
        inputs = case.inputs(absent_false)
        if case.stream and case.exclude is False:
            # vllm_backend: "When streaming, `exclude_input_in_output` = False is not allowed."
            with pytest.raises(ContractError) as e:
                parse_generate(inputs, None)
            assert e.value.field == "exclude_input_in_output"
            continue
        params = parse_generate(inputs, None)
        prepend = not case.exclude if case.exclude is not None else not case.stream
        want = expected(case.stream, case.logprobs, prepend)
        got = run_engine(params, case.logprobs)
        assert len(got) == len(want)
        names = {"text_output"} | {f.removeprefix("return_") for f in case.flags}
        for g, w in zip(got, want, strict=True):
            assert set(g) == names
            for name in names:
                assert_value(name, g[name], w[name])


def test_n_other_than_one_is_refused_naming_the_field_and_n_1_is_the_default() -> None:
    base = Case(frozenset(FLAGS), False, 0, None).inputs(False)

    def with_n(n: int) -> Mapping[str, np.ndarray]:
        sp = {"max_tokens": 3, "logprobs": 0, "n": n}
        return {**base, "sampling_parameters": np.array([json.dumps(sp).encode()], dtype=object)}

    (one,) = run_engine(parse_generate(with_n(1), None), 0)
    (default,) = run_engine(parse_generate(base, None), 0)
    assert set(one) == set(default)
    for name in default:
        assert np.array_equal(one[name], default[name])
    # vllm_backend would answer n sequences, each tensor n long (num_input_tokens stays 0-d);
    # one sequence per request is what the router plans and resumes, so n > 1 is refused.
    with pytest.raises(ContractError) as e:
        parse_generate(with_n(2), None)
    assert e.value.field == "n" and "n=1" in str(e.value)


def test_stream_absent_is_false_and_the_prompt_comes_first() -> None:
    inputs = Case(frozenset(FLAGS), False, None, None).inputs(False)
    del inputs["stream"]
    (only,) = run_engine(parse_generate(inputs, None), None)
    assert_value("text_output", only["text_output"], "Hello thereHi you")
    assert_value("num_output_tokens", only["num_output_tokens"], 3)


# ------------------------------------------------------------------ the engines' logprobs
@dataclass(frozen=True)
class FakeLogprob:
    """vLLM's Logprob: what vllm_logprobs_json reads of it."""

    logprob: float
    rank: int
    decoded_token: str


def test_vllm_logprobs_serialise_as_vllm_backend_does() -> None:
    # Sampled token 103 (rank 3) first, then the top 2, as vLLM builds each position's dict.
    position = {
        103: FakeLogprob(-0.25, 3, " you"),
        9: FakeLogprob(-0.1, 1, " me"),
        10: FakeLogprob(-0.2, 2, " us"),
    }
    text = vllm_logprobs_json([position])
    assert json.loads(text) == LOGPROBS[2][1]
    assert list(json.loads(text)[0]) == ["103", "9", "10"]  # order kept: the sampled one first


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_simulated_logprobs_have_the_sampled_token_then_the_top_k(k: int) -> None:
    toks = [SynthToken(3, "and ", -0.4), SynthToken(50, "evict ", 0.0)]
    per_token = json.loads(logprobs_json(toks, k))
    assert len(per_token) == 2
    for tok, entries in zip(toks, per_token, strict=True):
        # A synthetic token is always the most likely: max(1, k) entries, it first with rank 1.
        assert len(entries) == max(1, k)
        first, *rest = entries.items()
        assert first == (
            str(tok.token_id),
            {"logprob": tok.logprob, "rank": 1, "decoded_token": tok.text},
        )
        assert [e["rank"] for _, e in rest] == list(range(2, k + 1))
        lps = [e["logprob"] for e in entries.values()]
        assert lps == sorted(lps, reverse=True) and len(set(lps)) == len(lps)
        assert sum(math.exp(v) for v in lps) <= 1.0 + 1e-9


# ------------------------------------------------------------------ the router's pieces
def test_join_logprobs_concatenates_in_order_and_null_stays_null() -> None:
    a, b = LOGPROBS[2]
    assert json.loads(join_logprobs([json.dumps(a), "[]", json.dumps(b)]) or "") == a + b
    assert join_logprobs([None, None]) is None
    assert join_logprobs([]) is None
    assert join_logprobs(["[]"]) == "[]"
    with pytest.raises(ValueError):
        join_logprobs(['{"1": 2}'])


def test_engine_logprobs_outputs_read_back_as_text() -> None:
    assert logprobs_text(None) is None
    assert logprobs_text(np.array([b"null"], dtype=object)) is None
    assert logprobs_text(np.array([b"[]"], dtype=object)) == "[]"
    assert logprobs_text(np.array(b"[1]", dtype=object)) == "[1]"  # 0-d too


def test_a_non_streamed_router_response_is_one_final_step_with_the_joined_logprobs() -> None:
    # The router hands a request that is not streamed to its responder once, at the end, with
    # the text and the logprobs of every engine response joined (router_sink.py).
    params = parse_generate(Case(frozenset(FLAGS), False, 2, None).inputs(False), None)
    lp = LOGPROBS[2]
    only = Responder(params).step(
        "Hi you",
        3,
        final=True,
        finish_reason="length",
        logprobs=join_logprobs([json.dumps(lp[0]), json.dumps(lp[1])]),
        cumulative_logprob=CUMULATIVE[1],
        num_input_tokens=N_IN,
    )
    assert only is not None
    (want,) = expected(False, 2, prepend=True)
    for name in LAYOUT:
        assert_value(name, only[name], want[name])
