"""Exact token ids for a resumed request: what lets a resume hit vLLM's prefix cache.

The router resumes an evicted request with text: prompt + the text it had received. vLLM's prefix
cache matches token ids, block by block, and re-tokenizing generated text does not give back the
tokens the model sampled (byte-level BPE: a sampled pair "ab" + "c" re-encodes as "abc"), so the
match breaks at the first such place. Measured on the CPU engine (2026-12-02, tiny-llama): a resume
of a short prompt + 519 generated tokens found 0 cached tokens although every block was still in
the cache.

So the engine remembers, for each request it aborted, the token ids behind every response it sent
(prompt ids + output ids up to that response) and the text the client had at that point. A new
request whose text is exactly one of those points gets those ids (vLLM's TokensPrompt) instead of
re-tokenized text: the same tokens, hence the same blocks. Anything else is tokenized as usual.
Pure Python, no vLLM: unit-tested in tests/unit/test_vllm_resume.py.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

# The head of a text that keys the memory: a resume's text starts with the aborted request's.
HEAD_CHARS = 256


def _head(text: str) -> str:
    return hashlib.sha1(text[:HEAD_CHARS].encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Resumable:
    """One aborted request: its prompt, and after each response sent, (text length, ids)."""

    prompt: str
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    # (characters of output text sent, output tokens behind them), one per response sent
    points: list[tuple[int, int]] = field(default_factory=list)

    def sent(self, text: str, token_ids: list[int]) -> None:
        """A response with `text` (from `token_ids`) left for the client."""
        self.output_text += text
        self.output_ids.extend(token_ids)
        self.points.append((len(self.output_text), len(self.output_ids)))

    def ids_for(self, text: str) -> list[int] | None:
        """The exact ids of `text` if it is the prompt plus the output at a sent response."""
        if not text.startswith(self.prompt):
            return None
        rest = text[len(self.prompt) :]
        for chars, tokens in reversed(self.points):
            if chars == len(rest) and self.output_text[:chars] == rest:
                return self.prompt_ids + self.output_ids[:tokens]
        return None


class ResumeMemory:
    """Aborted requests' ids, newest last, bounded by count and by total tokens held."""

    def __init__(self, max_requests: int = 256, max_tokens: int = 2_000_000) -> None:
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self._by_head: OrderedDict[str, list[Resumable]] = OrderedDict()
        self._count = 0
        self._tokens = 0
        self.hits = 0

    def __len__(self) -> int:
        return self._count

    def remember(self, r: Resumable) -> None:
        if not r.points:
            return  # nothing was sent: its resume is its own prompt, tokenized as before
        key = _head(r.prompt + r.output_text)
        self._by_head.setdefault(key, []).append(r)
        self._by_head.move_to_end(key)
        self._count += 1
        self._tokens += len(r.prompt_ids) + len(r.output_ids)
        while self._by_head and (self._count > self.max_requests or self._tokens > self.max_tokens):
            _, old = self._by_head.popitem(last=False)
            self._drop(old)

    def take(self, text: str) -> list[int] | None:
        """The ids of a resume of a remembered request (forgotten once used), else None."""
        key = _head(text)
        entries = self._by_head.get(key)
        if not entries:
            return None
        for i, r in enumerate(entries):
            ids = r.ids_for(text)
            if ids is not None:
                del entries[i]
                if not entries:
                    del self._by_head[key]
                self._drop([r])
                self.hits += 1
                return ids
        return None

    def _drop(self, rs: list[Resumable]) -> None:
        for r in rs:
            self._count -= 1
            self._tokens -= len(r.prompt_ids) + len(r.output_ids)


class PrefillEcho:
    """Takes back the prompt text that vLLM's first output of a token-id prompt may carry.

    vLLM (0.32) primes its detokenizer with the prompt ids (tokenizers' DecodeStream(ids=...)).
    When the prompt's text ends in an incomplete UTF-8 sequence (shown as U+FFFD, common in the
    byte-level text a model samples), that stream's first step returns the whole text, prompt
    included, instead of the new part: measured with tokenizers 0.23.3 on tiny-llama's tokenizer,
    280 of 316 random id prompts ending so (the other 36 first returned nothing). An exact resume
    (its prompt is the ids of prompt + text so far) then sent its client the text so far again.
    `take` strips it from the first text that starts with the prompt's text; a prompt whose text
    ends cleanly is never touched."""

    def __init__(self, prompt_text: str) -> None:
        head = prompt_text.rstrip("\ufffd")
        # Armed only where the detokenizer misbehaves: a prompt text ending in U+FFFD.
        self._head = head if head != prompt_text else None
        self.stripped = 0  # characters taken back

    def take(self, text: str) -> str:
        if self._head is None or not text:
            return text
        head, self._head = self._head, None  # only the first text can carry it
        if text.startswith(head):
            self.stripped = len(head)
            return text[len(head) :]
        return text


__all__ = ["HEAD_CHARS", "PrefillEcho", "Resumable", "ResumeMemory"]
