"""The OpenAI objects the front answers with: completions, chat completions, their stream chunks,
usage, the model list. Plain dicts in OpenAI's shape (the SDKs parse them into their types).

`usage` counts the engines' tokens: `prompt_tokens` is the router's `num_input_tokens`, and
`completion_tokens` the sum of `num_output_tokens` over the responses, so it equals the tokens the
client received. A non-streamed answer also carries `qlm` (the SLO class it ran under, seconds
queued in the router, the serving instance), an extra field OpenAI clients ignore.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qlm_backend.openai_front.translate import RouterCall
from qlm_backend.openai_front.upstream import Piece


@dataclass
class Tally:
    """What the responses of one request add up to."""

    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    queue_s: float | None = None
    instance: str | None = None

    def add(self, p: Piece) -> None:
        self.text += p.text
        self.completion_tokens += p.tokens
        if self.prompt_tokens is None and p.prompt_tokens is not None:
            self.prompt_tokens = p.prompt_tokens  # the first: a resume's engine sees more
        if p.finish_reason is not None:
            self.finish_reason = p.finish_reason
        if p.queue_s is not None:
            self.queue_s = p.queue_s
        if p.instance is not None:
            self.instance = p.instance

    def usage(self) -> dict[str, int]:
        n_in = self.prompt_tokens or 0
        return {
            "prompt_tokens": n_in,
            "completion_tokens": self.completion_tokens,
            "total_tokens": n_in + self.completion_tokens,
        }


class Shapes:
    """The objects of one answer (one id, one creation time)."""

    def __init__(self, call: RouterCall, slo_class: str) -> None:
        self.call = call
        self.chat = call.kind == "chat"
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.slo_class = slo_class

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.call.model}

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        role: bool = False,
        usage: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """One stream chunk: new text (chat: a delta; role=True opens the message)."""
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = [choice]
        if self.call.include_usage or self.call.continuous_usage:
            # OpenAI: with include_usage every chunk has "usage": null but the last, usage-only one.
            out["usage"] = dict(usage) if usage is not None and self.call.continuous_usage else None
        return out

    def usage_chunk(self, usage: Mapping[str, int]) -> dict[str, Any]:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out.update(choices=[], usage=dict(usage))
        return out

    def response(self, t: Tally) -> dict[str, Any]:
        """The whole answer of a non-streamed request."""
        text = self.call.echo + t.text
        reason = t.finish_reason or "stop"
        if self.chat:
            out = self._head("chat.completion")
            out["choices"] = [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            ]
        else:
            out = self._head("text_completion")
            out["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]
        out["usage"] = t.usage()
        out["qlm"] = {"slo_class": self.slo_class, "queue_s": t.queue_s, "instance": t.instance}
        return out


def model_list(models: Mapping[str, int], created: int, owner: str = "qlm") -> dict[str, Any]:
    return {"object": "list", "data": [model_card(m, c, created, owner) for m, c in models.items()]}


def model_card(model: str, context: int, created: int, owner: str = "qlm") -> dict[str, Any]:
    # max_model_len: vLLM's extra field, which benchmark tools read.
    return {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": owner,
        "max_model_len": context,
    }
