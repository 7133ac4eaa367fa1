"""The vLLM engine's memory of aborted requests' token ids (vllm_engine/resume.py)."""

from __future__ import annotations

from qlm_backend.vllm_engine.resume import HEAD_CHARS, PrefillEcho, Resumable, ResumeMemory

PROMPT = "The lighthouse keeper rose before the gulls. " * 8  # > HEAD_CHARS characters


def aborted(prompt: str = PROMPT, pieces: tuple[tuple[str, list[int]], ...] = ()) -> Resumable:
    r = Resumable(prompt, [1, 2, 3])
    for text, ids in pieces or ((" ab", [10, 11]), ("c d", [12]), (" e", [13, 14])):
        r.sent(text, ids)
    return r


def test_a_resume_at_any_sent_response_gets_the_exact_ids() -> None:
    # The router may have read all responses, or not yet the last ones.
    for text_so_far, ids in (
        (" abc d e", [1, 2, 3, 10, 11, 12, 13, 14]),
        (" abc d", [1, 2, 3, 10, 11, 12]),
        (" ab", [1, 2, 3, 10, 11]),
    ):
        mem = ResumeMemory()
        mem.remember(aborted())
        assert mem.take(PROMPT + text_so_far) == ids
        assert len(mem) == 0 and mem.hits == 1  # used once


def test_text_between_responses_or_changed_text_is_tokenized_as_usual() -> None:
    mem = ResumeMemory()
    mem.remember(aborted())
    assert mem.take(PROMPT + " a") is None  # mid-response: no token boundary known
    assert mem.take(PROMPT + " abX") is None
    assert mem.take("another prompt" + " ab") is None
    assert len(mem) == 1


def test_a_request_that_sent_nothing_is_not_kept() -> None:
    mem = ResumeMemory()
    mem.remember(Resumable(PROMPT, [1, 2]))
    assert len(mem) == 0


def test_a_short_text_keys_on_its_whole_head() -> None:
    # Prompt + output under HEAD_CHARS: only the full text at abort keys it.
    mem = ResumeMemory()
    mem.remember(aborted("short prompt"))
    assert len("short prompt abc d e") < HEAD_CHARS
    assert mem.take("short prompt abc d e") == [1, 2, 3, 10, 11, 12, 13, 14]


def test_the_memory_is_bounded_oldest_first() -> None:
    mem = ResumeMemory(max_requests=2)
    for i in range(3):
        mem.remember(aborted(f"{i} {PROMPT}"))
    assert len(mem) == 2
    assert mem.take(f"0 {PROMPT} ab") is None  # forgotten
    assert mem.take(f"2 {PROMPT} ab") == [1, 2, 3, 10, 11]
    by_tokens = ResumeMemory(max_tokens=10)  # each holds 3 + 5 tokens
    by_tokens.remember(aborted("x" + PROMPT))
    by_tokens.remember(aborted("y" + PROMPT))
    assert len(by_tokens) == 1


def test_prefill_echo_is_taken_back_only_from_a_prompt_ending_in_an_incomplete_character() -> None:
    # vLLM's first output of such a token-id prompt is the whole text: prompt, then the new part.
    echo = PrefillEcho("b1 harvest spring\ufffd")
    assert echo.take("") == ""  # nothing yet (the detokenizer held it back)
    assert echo.take("b1 harvest spring\u00e9 and more") == "\u00e9 and more"
    assert echo.stripped == len("b1 harvest spring")
    # Only the first text can carry it: a later one that happens to start so is kept whole.
    assert echo.take("b1 harvest spring again") == "b1 harvest spring again"
    # A prompt whose text ends cleanly is never touched.
    clean = PrefillEcho("b1 harvest spring")
    assert clean.take("b1 harvest spring and more") == "b1 harvest spring and more"
    assert clean.stripped == 0
    # The first text without the echo passes as it is.
    plain = PrefillEcho("abc\ufffd")
    assert plain.take("xyz") == "xyz" and plain.stripped == 0
