"""`qlm-openai`: serve the OpenAI API in front of the `qlm` router of a running Triton server.

    qlm-openai [--host 127.0.0.1] [--port 9000] [--triton-grpc 127.0.0.1:8001] [--router qlm]
               [--model-repository model_repository] [--fleet FILE]
               [--slo-map FILE] [--service-tier TIER=CLASS ...] [--priority-class N=CLASS ...]
               [--api-key KEY | $QLM_OPENAI_API_KEY] [--tokenizer MODEL=DIR ...]
               [--max-body-bytes N] [--max-messages N] [--max-prompt-bytes N]
               [--max-tokens-limit N] [--max-stop N]

`make serve` (qlm-serve) starts it beside Triton; `docs/openai.md` has the API, headers and class
mapping. `--show-config` prints the resolved models, classes and mapping and exits. The prompt cap
defaults to the router's `max_prompt_bytes` (its router.json in --model-repository), the body cap to
room for such a prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from qlm_backend.openai_front.config import (
    API_KEY_ENV,
    BODY_PER_PROMPT_BYTE,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_MESSAGES,
    DEFAULT_MAX_STOP,
    DEFAULT_PORT,
    FrontConfig,
    FrontConfigError,
    default_body_bytes,
    router_config,
    router_fleet,
)
from qlm_backend.openai_front.slo import SloConfigError, load_slo_mapping
from qlm_backend.openai_front.template import ChatTemplate, TemplateError, load_tokenizer_template


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="qlm-openai", description="OpenAI-compatible endpoint in front of the qlm router."
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--triton-grpc", default=os.environ.get("QLM_GRPC_URL", "127.0.0.1:8001"))
    p.add_argument("--router", default="qlm", help="the router model (default qlm)")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument(
        "--fleet", type=Path, help="fleet file (default: the router's, from router.json)"
    )
    p.add_argument("--slo-map", type=Path, help="JSON file of the service_tier/priority tables")
    p.add_argument("--service-tier", action="append", default=[], metavar="TIER=CLASS")
    p.add_argument("--priority-class", action="append", default=[], metavar="N=CLASS")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; none: open)",
    )
    p.add_argument(
        "--tokenizer",
        action="append",
        default=[],
        metavar="MODEL=DIR",
        help="a local Hugging Face tokenizer directory whose chat template MODEL uses",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        help="max_tokens of a chat request that sets none (default: the rest of the context)",
    )
    p.add_argument(
        "--status-wait-s",
        type=float,
        default=30.0,
        help="a stream waits this long for the router before answering 200 (errors before: real status)",
    )
    p.add_argument(
        "--retry-after-s", type=float, default=1.0, help="Retry-After fallback for 429 and 503"
    )
    caps = p.add_argument_group("size caps (a request over one is refused before the router)")
    caps.add_argument(
        "--max-body-bytes",
        type=int,
        help="request body bytes; more is a 413 (default: room for the prompt cap's prompt, "
        f"{BODY_PER_PROMPT_BYTE}x it, at least {DEFAULT_MAX_BODY_BYTES})",
    )
    caps.add_argument(
        "--max-messages",
        type=int,
        default=DEFAULT_MAX_MESSAGES,
        help=f"chat messages per request (default {DEFAULT_MAX_MESSAGES})",
    )
    caps.add_argument(
        "--max-prompt-bytes",
        type=int,
        help="UTF-8 bytes of the prompt after the chat template (default: the router's "
        "max_prompt_bytes, from its router.json)",
    )
    caps.add_argument(
        "--max-tokens-limit",
        type=int,
        help="max_tokens per request (default: only the model's context bounds it)",
    )
    caps.add_argument(
        "--max-stop",
        type=int,
        default=DEFAULT_MAX_STOP,
        help=f"entries of stop and of stop_token_ids (default {DEFAULT_MAX_STOP})",
    )
    p.add_argument("--parent-pid", type=int, help="exit when this process (qlm-serve) is gone")
    p.add_argument("--log-level", default="info")
    p.add_argument("--show-config", action="store_true", help="print the configuration and exit")
    return p.parse_args(argv)


def prompt_cap(a: argparse.Namespace, router_max: int) -> int:
    """--max-prompt-bytes, else the router's own cap: the front then refuses exactly what the router
    would. A cap above the router's only moves the refusal to the router: said on stderr."""
    if a.max_prompt_bytes is None:
        return router_max
    if a.max_prompt_bytes > router_max:
        print(
            f"qlm-openai: --max-prompt-bytes {a.max_prompt_bytes} is above the router's "
            f"max_prompt_bytes {router_max}: prompts in between pass here and the router refuses "
            "them",
            file=sys.stderr,
        )
    return int(a.max_prompt_bytes)


def build_config(a: argparse.Namespace) -> FrontConfig:
    settings = router_config(a.model_repository, a.router)
    fleet = router_fleet(a.model_repository, a.router, a.fleet, settings)
    max_prompt = prompt_cap(a, settings.max_prompt_bytes)
    max_body = a.max_body_bytes if a.max_body_bytes is not None else default_body_bytes(max_prompt)
    templates: dict[str, ChatTemplate] = {}
    for spec in a.tokenizer:
        model, sep, directory = spec.partition("=")
        if not sep:
            raise FrontConfigError(f"--tokenizer: expected MODEL=DIR, got {spec!r}")
        tpl = load_tokenizer_template(Path(directory))
        if tpl is None:
            print(
                f"qlm-openai: {directory} has no chat template; {model} uses the plain one",
                file=sys.stderr,
            )
            continue
        templates[model] = tpl
    return FrontConfig(
        fleet=fleet,
        slo=load_slo_mapping(a.slo_map, a.service_tier, a.priority_class),
        templates=templates,
        router=a.router,
        grpc_url=a.triton_grpc,
        api_key=a.api_key or None,
        default_max_tokens=a.default_max_tokens,
        status_wait_s=a.status_wait_s,
        retry_after_s=a.retry_after_s,
        max_body_bytes=max_body,
        max_messages=a.max_messages,
        max_prompt_bytes=max_prompt,
        max_tokens_limit=a.max_tokens_limit,
        max_stop=a.max_stop,
    )


async def _serve(server: object, parent_pid: int | None) -> None:
    async def watch_parent() -> None:
        while parent_pid is not None and not getattr(server, "should_exit", False):
            await asyncio.sleep(1.0)
            if os.getppid() != parent_pid:
                print("qlm-openai: qlm-serve is gone; stopping", file=sys.stderr, flush=True)
                server.should_exit = True  # type: ignore[attr-defined]

    watcher = asyncio.ensure_future(watch_parent())
    try:
        await server.serve()  # type: ignore[attr-defined]
    finally:
        watcher.cancel()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        cfg = build_config(a)
    except (FrontConfigError, SloConfigError, TemplateError, ValueError) as e:
        print(f"qlm-openai: error: {e}", file=sys.stderr)
        return 2
    if a.show_config:
        shown = {
            "router": cfg.router,
            "triton_grpc": cfg.grpc_url,
            "fleet": str(cfg.fleet.path),
            "models": dict(cfg.fleet.models),
            "slo_classes": dict(cfg.fleet.classes),
            "default_slo_class": cfg.fleet.default_class,
            "slo_mapping": cfg.slo.as_json(),
            "chat_templates": {m: cfg.template_for(m).name for m in cfg.fleet.models},
            "api_key": "set" if cfg.api_key else "none",
            "caps": {
                "max_body_bytes": cfg.max_body_bytes,
                "max_messages": cfg.max_messages,
                "max_prompt_bytes": cfg.max_prompt_bytes,
                "router_max_prompt_bytes": router_config(
                    a.model_repository, a.router
                ).max_prompt_bytes,
                "max_tokens_limit": cfg.max_tokens_limit,
                "max_stop": cfg.max_stop,
            },
        }
        print(json.dumps(shown, indent=2))
        return 0
    import uvicorn

    from qlm_backend.openai_front.app import create_app

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(cfg),
            host=a.host,
            port=a.port,
            log_level=a.log_level,
            timeout_graceful_shutdown=5,
        )
    )
    try:
        asyncio.run(_serve(server, a.parent_pid))
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on
        pass
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
