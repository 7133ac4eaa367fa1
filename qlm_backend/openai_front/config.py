"""What the front serves and how: the router's fleet (logical models, SLO classes), and its settings.

The fleet is the router's own: `<repository>/<router>/1/router.json` names it (key `fleet`, relative
to the repository; `$QLM_FLEET`, which `qlm-serve --fleet` sets, overrides it, as in the router),
unless `--fleet` names a file. Models and classes are read from it at start; a request for another
model is answered 404 without a round trip.

Size caps (`--max-*`), each checked before anything reaches the router: the body's bytes (413, read
no further), the number of chat messages, the prompt's bytes after the chat template, max_tokens,
and the lengths of `stop` / `stop_token_ids` (400 naming the parameter). The router's own caps still
hold behind them (`max_prompt_bytes`, the model's context). The prompt cap defaults to the router's
`max_prompt_bytes`, read as the router reads it (router.json, then config.pbtxt parameters), so the
front neither lets through a prompt the router refuses nor refuses one it takes; the body cap
defaults to room for such a prompt (`default_body_bytes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlm_backend.core.fleet import load_fleet
from qlm_backend.engine.hardware import MODELS
from qlm_backend.openai_front.slo import SloMapping
from qlm_backend.openai_front.template import ChatTemplate, PlainTemplate
from qlm_backend.router.config import CONFIG_FILE, RouterConfig, load_router_config

API_KEY_ENV = "QLM_OPENAI_API_KEY"
# Where no router config is read (FrontConfig built directly): the router's own default. The body
# may be larger than the prompt it carries: JSON escapes non-ASCII text as \uXXXX (up to 3x its
# UTF-8 bytes; 2x for CJK).
DEFAULT_MAX_PROMPT_BYTES = RouterConfig().max_prompt_bytes
DEFAULT_MAX_BODY_BYTES = 4 << 20
BODY_PER_PROMPT_BYTE = (
    4  # the body cap's room per prompt byte: 3 for \uXXXX escapes, 1 for the rest
)
DEFAULT_MAX_MESSAGES = 2048  # OpenAI's own bound on `messages`
DEFAULT_MAX_STOP = 16  # OpenAI allows 4 stop strings, vLLM any number: room for vLLM clients
DEFAULT_PORT = 9000  # Triton takes 8000-8002
PLAIN = PlainTemplate()


class FrontConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Fleet:
    models: Mapping[str, int]  # logical model -> context length in tokens
    classes: Mapping[str, float]  # SLO class -> TTFT deadline in seconds
    default_class: str  # the router's default_slo_class
    path: Path


def default_body_bytes(max_prompt_bytes: int) -> int:
    """The body cap that carries any prompt the prompt cap allows, escaped: never below 4 MiB."""
    return max(DEFAULT_MAX_BODY_BYTES, BODY_PER_PROMPT_BYTE * max_prompt_bytes)


def _pbtxt_parameters(path: Path) -> dict[str, Any]:
    """config.pbtxt as the model config dict Triton hands the router (its `parameters` matter)."""
    # tritonclient's protobuf, imported only for a config.pbtxt that has parameters (none shipped).
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    try:
        msg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise FrontConfigError(f"{path}: {e}") from None
    return dict(json_format.MessageToDict(msg, preserving_proto_field_name=True))


def router_config(repository: Path, router: str = "qlm") -> RouterConfig:
    """The router's settings as it loads them: <repository>/<router>/1/router.json overridden by
    the parameters of <repository>/<router>/config.pbtxt; the defaults where neither exists."""
    model_dir = Path(repository) / router
    pbtxt = model_dir / "config.pbtxt"
    model_config: dict[str, Any] = {}
    if pbtxt.exists() and "parameters" in pbtxt.read_text():
        model_config = _pbtxt_parameters(pbtxt)
    try:
        return load_router_config(model_config, model_dir / "1")
    except ValueError as e:  # RouterConfigError names the key
        raise FrontConfigError(f"{model_dir / '1' / CONFIG_FILE}: {e}") from None


def router_fleet(
    repository: Path,
    router: str = "qlm",
    fleet: Path | None = None,
    settings: RouterConfig | None = None,
) -> Fleet:
    """The fleet the router `router` of `repository` plans over (or `fleet`, if given)."""
    repository = Path(repository)
    settings = settings or router_config(repository, router)
    if fleet is None:
        name = settings.fleet_path()
        fleet = Path(name) if Path(name).is_absolute() else repository / name
    try:
        fc = load_fleet(fleet, strict=False)
    except (OSError, ValueError) as e:
        raise FrontConfigError(f"fleet {fleet}: {e}") from None
    classes = {c.name: c.ttft_slo_s for c in fc.slo_classes}
    default = settings.default_slo_class
    if default not in classes:
        rj = repository / router / "1" / CONFIG_FILE
        raise FrontConfigError(f"{rj}: default_slo_class {default!r} is not a class of {fleet}")
    return Fleet({m: MODELS[m].max_context_tokens for m in fc.models}, classes, default, fleet)


@dataclass(frozen=True)
class FrontConfig:
    fleet: Fleet
    slo: SloMapping = field(default_factory=SloMapping)
    templates: Mapping[str, ChatTemplate] = field(default_factory=dict)  # model -> its template
    router: str = "qlm"  # the Triton model every request goes to
    grpc_url: str = "127.0.0.1:8001"
    api_key: str | None = None
    default_max_tokens: int | None = None  # chat without max_tokens: None = the rest of the context
    status_wait_s: float = 30.0  # how long a stream waits for the router before its status is 200
    retry_after_s: float = 1.0  # Retry-After of a shed request when the router says no more
    max_retry_after_s: float = 300.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # a larger body is a 413
    max_messages: int = DEFAULT_MAX_MESSAGES
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES  # UTF-8 bytes after the chat template
    max_tokens_limit: int | None = None  # None: the model's context is the only bound
    max_stop: int = DEFAULT_MAX_STOP  # entries of `stop`, and of `stop_token_ids`

    def __post_init__(self) -> None:
        self.slo.check(self.fleet.classes)
        unknown = sorted(set(self.templates) - set(self.fleet.models))
        if unknown:
            raise FrontConfigError(f"--tokenizer: {unknown[0]!r} is not a model of the fleet")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise FrontConfigError("--default-max-tokens must be >= 1")
        if self.status_wait_s < 0:
            raise FrontConfigError("--status-wait-s must be >= 0")
        for flag, value in (
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-messages", self.max_messages),
            ("--max-prompt-bytes", self.max_prompt_bytes),
            ("--max-tokens-limit", self.max_tokens_limit),
            ("--max-stop", self.max_stop),
        ):
            if value is not None and value < 1:
                raise FrontConfigError(f"{flag} must be >= 1, got {value}")

    def template_for(self, model: str) -> ChatTemplate:
        return self.templates.get(model, PLAIN)
