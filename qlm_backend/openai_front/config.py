"""What the front serves and how: the router's fleet (logical models, SLO classes), and its settings.

The fleet is the router's own: `<repository>/<router>/1/router.json` names it (key `fleet`, relative
to the repository; `$QLM_FLEET`, which `qlm-serve --fleet` sets, overrides it, as in the router),
unless `--fleet` names a file. Models and classes are read from it at start; a request for another
model is answered 404 without a round trip.

Size caps (`--max-*`), each checked before anything reaches the router: the body's bytes (413, read
no further), the number of chat messages, the prompt's bytes after the chat template, max_tokens,
and the lengths of `stop` / `stop_token_ids` (400 naming the parameter). The router's own caps still
hold behind them (`max_prompt_bytes` in router.json, the model's context).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qlm_backend.core.fleet import load_fleet
from qlm_backend.engine.hardware import MODELS
from qlm_backend.openai_front.slo import SloMapping
from qlm_backend.openai_front.template import ChatTemplate, PlainTemplate
from qlm_backend.router.config import FLEET_ENV

API_KEY_ENV = "QLM_OPENAI_API_KEY"
# The prompt cap is the router's max_prompt_bytes default. The body may be larger than the prompt
# it carries: JSON escapes non-ASCII text as \uXXXX (up to 3x its UTF-8 bytes; 2x for CJK).
DEFAULT_MAX_PROMPT_BYTES = 1 << 20
DEFAULT_MAX_BODY_BYTES = 4 << 20
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


def router_fleet(repository: Path, router: str = "qlm", fleet: Path | None = None) -> Fleet:
    """The fleet the router `router` of `repository` plans over (or `fleet`, if given)."""
    repository = Path(repository)
    settings: dict[str, object] = {}
    rj = repository / router / "1" / "router.json"
    if rj.exists():
        try:
            settings = json.loads(rj.read_text())
        except json.JSONDecodeError as e:
            raise FrontConfigError(f"{rj} is not valid JSON: {e}") from None
    if fleet is None:
        name = os.environ.get(FLEET_ENV) or str(settings.get("fleet") or "fleet.json")
        fleet = Path(name) if Path(name).is_absolute() else repository / name
    try:
        fc = load_fleet(fleet, strict=False)
    except (OSError, ValueError) as e:
        raise FrontConfigError(f"fleet {fleet}: {e}") from None
    classes = {c.name: c.ttft_slo_s for c in fc.slo_classes}
    default = str(settings.get("default_slo_class") or "interactive")
    if default not in classes:
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
