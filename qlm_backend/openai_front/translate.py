"""OpenAI request bodies, validated and translated into one request of the router's contract.

`/v1/chat/completions` and `/v1/completions` take what vLLM's OpenAI server takes for a single
text choice: `max_tokens` (chat: `max_completion_tokens` first), `temperature`, `top_p`, `stop`,
`seed`, `n` (1 only), `stream` and `stream_options`, and vLLM's sampling extras (`ignore_eos`,
`min_tokens`, `top_k`, `min_p`, `repetition_penalty`, ...). They become the router's
`sampling_parameters` JSON, checked here with the same validation the router applies
(contract.parse_sampling), so a bad value is a 400 naming the request field before anything is
queued. Features no engine of ours serves (logprobs, tools, structured output, beam search, batched
or token-id prompts) are a 400 naming the field rather than silently ignored; fields that change
nothing here (`user`, `metadata`, `store`, ...) are accepted and ignored, as vLLM does.

Size caps (FrontConfig's `max_*`): the number of messages, the prompt's UTF-8 bytes after the chat
template, max_tokens, the entries of `stop` and `stop_token_ids`; each a 400 naming the parameter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from qlm_backend.contract import ContractError, parse_sampling
from qlm_backend.engine.tokens import count_prompt_tokens
from qlm_backend.openai_front.config import FrontConfig
from qlm_backend.openai_front.errors import OpenAIError, bad_request, unknown_model
from qlm_backend.openai_front.slo import TTFT_HEADER, SloChoice, resolve_slo

Kind = Literal["chat", "completion"]

# Request fields copied into the sampling parameters as they are, with the JSON type they must have.
_NUM, _INT, _BOOL, _STOP, _INTS = "number", "integer", "boolean", "stop", "list of integers"
SAMPLING_FIELDS: Mapping[str, str] = {
    "temperature": _NUM,
    "top_p": _NUM,
    "seed": _INT,
    "stop": _STOP,
    "presence_penalty": _NUM,
    "frequency_penalty": _NUM,
    "repetition_penalty": _NUM,
    "top_k": _INT,
    "min_p": _NUM,
    "min_tokens": _INT,
    "ignore_eos": _BOOL,
    "stop_token_ids": _INTS,
    "include_stop_str_in_output": _BOOL,
    "skip_special_tokens": _BOOL,
    "spaces_between_special_tokens": _BOOL,
}


def _falsy(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == [] or v == {} or v == ""


def _text_format(v: Any) -> bool:
    return v is None or (isinstance(v, Mapping) and v.get("type") == "text")


# field -> (accepts the value?, what is not supported). Everything else unknown is ignored.
_COMMON_UNSUPPORTED: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "logit_bias": (_falsy, "logit_bias is not supported"),
    "response_format": (_text_format, "only response_format {'type': 'text'} is supported"),
    "use_beam_search": (_falsy, "beam search is not supported"),
    "prompt_logprobs": (_falsy, "prompt_logprobs are not supported"),
    "guided_json": (_falsy, "structured output is not supported"),
    "guided_regex": (_falsy, "structured output is not supported"),
    "guided_choice": (_falsy, "structured output is not supported"),
    "guided_grammar": (_falsy, "structured output is not supported"),
    "structured_outputs": (_falsy, "structured output is not supported"),
}
CHAT_UNSUPPORTED = {
    **_COMMON_UNSUPPORTED,
    "logprobs": (_falsy, "logprobs are not supported"),
    "top_logprobs": (_falsy, "logprobs are not supported"),
    "tools": (_falsy, "tools are not supported"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tools are not supported"),
    "functions": (_falsy, "functions are not supported"),
    "function_call": (lambda v: v in (None, "none", "auto"), "functions are not supported"),
    "audio": (_falsy, "audio output is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality is supported"),
    "prediction": (_falsy, "predicted outputs are not supported"),
    "echo": (_falsy, "echo is not supported for chat; use /v1/completions"),
    "continue_final_message": (_falsy, "continue_final_message is not supported"),
}
COMPLETION_UNSUPPORTED = {
    **_COMMON_UNSUPPORTED,
    "logprobs": (lambda v: v is None, "logprobs are not supported"),
    "suffix": (_falsy, "suffix is not supported"),
    "best_of": (lambda v: v in (None, 1), "only best_of=1 is supported"),
}
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True)
class RouterCall:
    """One request for the router, and what the answer needs to know about it."""

    kind: Kind
    model: str
    prompt: str
    sampling: Mapping[str, Any]  # the sampling_parameters JSON object
    slo: SloChoice
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (vLLM)
    echo: str = ""  # completions' echo: the prompt, put before the completion
    params: Mapping[str, str] | None = None  # router field -> request field, for its errors

    def fields(self) -> dict[str, Any]:
        """The router's inputs (contract.ROUTER_INPUTS)."""
        f: dict[str, Any] = {
            "text_input": self.prompt,
            "stream": True,  # always: the front counts tokens and sees the client leave
            "sampling_parameters": json.dumps(dict(self.sampling)),
            "return_finish_reason": True,
            "return_num_input_tokens": True,
            "return_num_output_tokens": True,
            "model": self.model,
        }
        if self.slo.slo_class is not None:
            f["slo_class"] = self.slo.slo_class
        if self.slo.ttft_slo_s is not None:
            f["ttft_slo_s"] = float(self.slo.ttft_slo_s)
        return f


def _check_type(key: str, v: Any, kind: str) -> Any:
    ok = {
        _NUM: isinstance(v, int | float) and not isinstance(v, bool),
        _INT: isinstance(v, int) and not isinstance(v, bool),
        _BOOL: isinstance(v, bool),
        _STOP: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
        _INTS: isinstance(v, list)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in v),
    }[kind]
    if not ok:
        what = "a string or a list of strings" if kind == _STOP else f"a {kind}"
        raise bad_request(key, f"{key} must be {what}, got {json.dumps(v)}")
    return v


def _model(body: Mapping[str, Any], cfg: FrontConfig) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model", "model is required (a string); see GET /v1/models")
    if model not in cfg.fleet.models:
        raise unknown_model(model, list(cfg.fleet.models))
    return model


def _unsupported(body: Mapping[str, Any], table: Mapping[str, Any]) -> None:
    for key, (accepts, what) in table.items():
        if key in body and not accepts(body[key]):
            raise bad_request(key, f"{what} by this server (got {key}={json.dumps(body[key])})")


def _stream_options(body: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream", f"stream must be a boolean, got {json.dumps(stream)}")
    opts = body.get("stream_options")
    if opts is None:
        return bool(stream), False, False
    if not stream:
        raise bad_request("stream_options", "stream_options is only allowed when stream is true")
    if not isinstance(opts, Mapping):
        raise bad_request("stream_options", "stream_options must be an object")
    flags = []
    for key in ("include_usage", "continuous_usage_stats"):
        v = opts.get(key)
        if v is not None and not isinstance(v, bool):
            raise bad_request(f"stream_options.{key}", f"{key} must be a boolean")
        flags.append(bool(v))
    return True, flags[0], flags[1]


def _max_tokens(body: Mapping[str, Any], kind: Kind) -> tuple[int | None, str]:
    keys = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    for key in keys:
        v = body.get(key)
        if v is not None:
            return _check_type(key, v, _INT), key
    return None, keys[-1]


def _sampling(
    body: Mapping[str, Any], kind: Kind, cfg: FrontConfig, model: str, prompt: str, what: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """The sampling parameters and the router-field -> request-field map for errors."""
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("n", f"only n=1 is supported, got n={json.dumps(n)}")
    context = cfg.fleet.models[model]
    n_prompt = count_prompt_tokens(prompt)
    max_tokens, max_key = _max_tokens(body, kind)
    params = {"text_input": what, "max_tokens": max_key, "ttft_slo_s": TTFT_HEADER}
    limit = cfg.max_tokens_limit
    if max_tokens is not None and limit is not None and max_tokens > limit:
        raise bad_request(
            max_key, f"{max_key} is {max_tokens}; this server allows at most {limit} per request"
        )
    if max_tokens is None:
        if kind == "completion":
            max_tokens = 16  # OpenAI's and vLLM's default for completions
        else:  # vLLM's: the rest of the context (optionally capped)
            max_tokens = context - n_prompt
            if cfg.default_max_tokens is not None:
                max_tokens = min(max_tokens, cfg.default_max_tokens)
        if limit is not None:  # a request that asks for nothing specific is not refused for it
            max_tokens = min(max_tokens, limit)
    over = max_tokens < 1 and body.get(max_key) is None  # the prompt alone fills the context
    if over or n_prompt + max_tokens > context:
        asked = max(1, max_tokens) if over else max_tokens
        raise bad_request(
            max_key if body.get(max_key) is not None else what,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{n_prompt + asked} tokens ({n_prompt} in the {what}, {asked} in the "
            f"completion). Please reduce the length of the {what} or completion.",
        )
    sampling: dict[str, Any] = {"max_tokens": max_tokens}
    for key, kind_ in SAMPLING_FIELDS.items():
        if body.get(key) is not None:
            sampling[key] = _check_type(key, body[key], kind_)
    for key in ("stop", "stop_token_ids"):
        v = sampling.get(key)
        if isinstance(v, list) and len(v) > cfg.max_stop:
            raise bad_request(
                key, f"{key} has {len(v)} entries; this server allows at most {cfg.max_stop}"
            )
    try:
        parse_sampling(sampling, context)
    except ContractError as e:
        raise bad_request(params.get(e.field, e.field), str(e)) from None
    return sampling, params


def _content(m: Mapping[str, Any], i: int) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        if m.get("role") == "assistant":
            return ""
        raise bad_request(f"messages[{i}].content", "content is required")
    if not isinstance(content, list):
        raise bad_request(f"messages[{i}].content", "content must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, Mapping) or part.get("type") not in ("text", "input_text"):
            got = part.get("type") if isinstance(part, Mapping) else part
            raise bad_request(where, f"only text content parts are supported, got {got!r}")
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.text", "text must be a string")
        texts.append(part["text"])
    return "".join(texts)


def chat_messages(body: Mapping[str, Any], max_messages: int | None = None) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "messages must be a non-empty list of messages")
    if max_messages is not None and len(messages) > max_messages:
        raise bad_request(
            "messages",
            f"messages has {len(messages)} messages; this server allows at most {max_messages}",
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise bad_request(f"messages[{i}]", "a message must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(
                f"messages[{i}].role", f"role must be one of {', '.join(sorted(ROLES))}"
            )
        if m.get("tool_calls"):
            raise bad_request(f"messages[{i}].tool_calls", "tool calls are not supported")
        out.append({"role": str(role), "content": _content(m, i)})
    return out


def parse_chat(body: Mapping[str, Any], headers: Mapping[str, str], cfg: FrontConfig) -> RouterCall:
    """`headers`: lower-case names."""
    model = _model(body, cfg)
    _unsupported(body, CHAT_UNSUPPORTED)
    messages = chat_messages(body, cfg.max_messages)
    agp = body.get("add_generation_prompt", True)
    if not isinstance(agp, bool):
        raise bad_request("add_generation_prompt", "add_generation_prompt must be a boolean")
    prompt = cfg.template_for(model).render(messages, agp)
    if not prompt:
        raise bad_request("messages", "the messages make an empty prompt")
    _check_prompt_bytes(prompt, cfg, "messages", "the messages make a prompt of")
    stream, usage, cont = _stream_options(body)
    slo = resolve_slo(headers, body, cfg.slo, cfg.fleet.classes)
    sampling, params = _sampling(body, "chat", cfg, model, prompt, "messages")
    return RouterCall(
        "chat", model, prompt, sampling, slo, stream, usage, cont, "", _slo_params(params, slo)
    )


def completion_prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if (
            prompt
            and all(isinstance(t, int) for t in prompt)
            or any(isinstance(p, list) for p in prompt)
        ):
            raise bad_request("prompt", "token-id prompts are not supported; send text")
        if len(prompt) != 1:
            raise bad_request(
                "prompt",
                f"batched prompts are not supported (got a list of {len(prompt)}); "
                "send one request per prompt",
            )
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("prompt", "prompt must be a string")
    if not prompt:
        raise bad_request("prompt", "prompt must not be empty")
    return prompt


def parse_completion(
    body: Mapping[str, Any], headers: Mapping[str, str], cfg: FrontConfig
) -> RouterCall:
    model = _model(body, cfg)
    _unsupported(body, COMPLETION_UNSUPPORTED)
    prompt = completion_prompt(body)
    _check_prompt_bytes(prompt, cfg, "prompt", "prompt is")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise bad_request("echo", "echo must be a boolean")
    stream, usage, cont = _stream_options(body)
    slo = resolve_slo(headers, body, cfg.slo, cfg.fleet.classes)
    sampling, params = _sampling(body, "completion", cfg, model, prompt, "prompt")
    return RouterCall(
        "completion",
        model,
        prompt,
        sampling,
        slo,
        stream,
        usage,
        cont,
        prompt if echo else "",
        _slo_params(params, slo),
    )


def _check_prompt_bytes(prompt: str, cfg: FrontConfig, param: str, what: str) -> None:
    # Checked here, before the router (whose own cap is max_prompt_bytes on text_input), so the
    # error names the request's field; counted as the router counts: UTF-8 bytes.
    n = len(prompt.encode("utf-8", "surrogatepass"))
    if n > cfg.max_prompt_bytes:
        raise bad_request(
            param, f"{what} {n} bytes; this server allows at most {cfg.max_prompt_bytes}"
        )


def _slo_params(params: dict[str, str], slo: SloChoice) -> dict[str, str]:
    return {**params, "slo_class": slo.source if slo.source != "default" else "slo_class"}


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body (any Content-Type: `curl -d` sends a form type)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # nested deeper than the parser's stack (a 500 otherwise)
        raise OpenAIError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    return body
