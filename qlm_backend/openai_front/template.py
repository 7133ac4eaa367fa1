"""Chat templates: how a list of chat messages becomes the one prompt the router takes.

The simulated models have no tokenizer, so by default a plain, documented template applies:

    <role>: <content>\\n        (one line per message, in order)
    assistant:                 (then this, with a trailing space, unless add_generation_prompt is false)

A model served with a real tokenizer can use the tokenizer's own template: `--tokenizer MODEL=DIR`
points at a local Hugging Face tokenizer directory (nothing is downloaded), whose `chat_template`
(in tokenizer_config.json, or chat_template.jinja) is rendered with Jinja2 in a sandbox, with the
tokenizer's special tokens (bos_token, eos_token, ...) as transformers passes them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from qlm_backend.openai_front.errors import bad_request

Message = Mapping[str, str]  # {"role": ..., "content": ...}, content already plain text


class ChatTemplate(Protocol):
    name: str

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str: ...


class PlainTemplate:
    name = "plain"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")


class TemplateError(ValueError):
    pass


def _token(value: Any) -> str | None:
    # tokenizer_config.json spells special tokens as strings or as AddedToken objects.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class JinjaTemplate:
    """A tokenizer's own chat template, rendered as transformers' apply_chat_template does."""

    def __init__(self, source: str, special_tokens: Mapping[str, str], name: str) -> None:
        from jinja2.exceptions import TemplateError as JinjaError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except JinjaError as e:
            raise TemplateError(f"{name}: the chat template does not parse: {e}") from None
        self._jinja_error = JinjaError
        self.special_tokens = dict(special_tokens)
        self.name = name

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        try:
            return str(
                self._template.render(
                    messages=[dict(m) for m in messages],
                    add_generation_prompt=add_generation_prompt,
                    **self.special_tokens,
                )
            )
        except TemplateError as e:  # the template refuses these messages (e.g. role order)
            raise bad_request("messages", f"the model's chat template refused them: {e}") from None
        except self._jinja_error as e:
            raise bad_request("messages", f"the model's chat template failed: {e}") from None


def load_tokenizer_template(directory: Path) -> JinjaTemplate | None:
    """The chat template of a local tokenizer directory; None if it has none."""
    directory = Path(directory)
    cfg_path = directory / "tokenizer_config.json"
    if not directory.is_dir():
        raise TemplateError(f"tokenizer directory {directory} does not exist")
    cfg: dict[str, Any] = {}
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise TemplateError(f"{cfg_path} is not valid JSON: {e}") from None
    source = cfg.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        source = named.get("default")
    jinja_file = directory / "chat_template.jinja"
    if not source and jinja_file.exists():
        source = jinja_file.read_text()
    if not isinstance(source, str) or not source.strip():
        return None
    tokens = {
        k: t
        for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")
        if (t := _token(cfg.get(k))) is not None
    }
    return JinjaTemplate(source, tokens, str(directory))
