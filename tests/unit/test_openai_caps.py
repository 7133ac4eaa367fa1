"""qlm-openai's size caps from the router's own config (router.json, then config.pbtxt parameters,
as the router reads them), and what `qlm-serve` passes to the qlm-openai it starts (its --dry-run
command line, --openai-arg and what it refuses)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from qlm_backend.openai_front import cli as openai_cli
from qlm_backend.openai_front.config import (
    DEFAULT_MAX_BODY_BYTES,
    FrontConfigError,
    default_body_bytes,
    router_config,
)
from qlm_backend.router.config import RouterConfig, load_router_config
from qlm_backend.triton import launcher
from qlm_backend.triton.installation import TritonInstallation
from qlm_backend.triton.server import free_port

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "model_repository"


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("QLM_FLEET", raising=False)
    dst = tmp_path / "repo"
    shutil.copytree(SHIPPED, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def set_router(repo: Path, **settings: object) -> None:
    path = repo / "qlm" / "1" / "router.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))


def front(repo: Path, *args: str):
    return openai_cli.build_config(openai_cli.parse_args(["--model-repository", str(repo), *args]))


def test_the_prompt_cap_is_the_routers_and_the_body_cap_makes_room_for_it(repo, capsys):
    assert front(repo).max_prompt_bytes == RouterConfig().max_prompt_bytes == 1 << 20
    assert front(repo).max_body_bytes == DEFAULT_MAX_BODY_BYTES
    set_router(repo, max_prompt_bytes=2048)
    cfg = front(repo)
    assert cfg.max_prompt_bytes == 2048
    assert cfg.max_body_bytes == DEFAULT_MAX_BODY_BYTES  # never below the 4 MiB default
    set_router(repo, max_prompt_bytes=3 << 20)
    cfg = front(repo)
    assert cfg.max_prompt_bytes == 3 << 20
    assert cfg.max_body_bytes == default_body_bytes(3 << 20) == 12 << 20  # escapes take up to 3x
    assert capsys.readouterr().err == ""


def test_config_pbtxt_parameters_override_router_json_as_in_the_router(repo):
    set_router(repo, max_prompt_bytes=2048)
    pbtxt = repo / "qlm" / "config.pbtxt"
    pbtxt.write_text(
        pbtxt.read_text()
        + 'parameters { key: "max_prompt_bytes" value: { string_value: "4096" } }\n'
    )
    msg = text_format.Parse(pbtxt.read_text(), model_config_pb2.ModelConfig())
    model_config = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    as_router = load_router_config(model_config, repo / "qlm" / "1")
    assert router_config(repo, "qlm") == as_router
    assert front(repo).max_prompt_bytes == as_router.max_prompt_bytes == 4096


def test_explicit_caps_win_and_one_above_the_routers_is_said(repo, capsys):
    set_router(repo, max_prompt_bytes=2048)
    cfg = front(repo, "--max-prompt-bytes", "1000", "--max-body-bytes", "5000")
    assert (cfg.max_prompt_bytes, cfg.max_body_bytes) == (1000, 5000)
    assert capsys.readouterr().err == ""
    assert front(repo, "--max-prompt-bytes", "4096").max_prompt_bytes == 4096
    err = capsys.readouterr().err
    assert "--max-prompt-bytes 4096 is above the router's max_prompt_bytes 2048" in err


@pytest.mark.parametrize("value", [0, "big", 1.5])
def test_a_bad_router_cap_names_the_file_and_key(repo, value):
    set_router(repo, max_prompt_bytes=value)
    with pytest.raises(FrontConfigError, match=r"router\.json: .*'max_prompt_bytes'"):
        front(repo)


def test_a_repository_without_the_router_uses_the_routers_defaults(repo):
    shutil.rmtree(repo / "qlm")
    assert router_config(repo, "qlm") == RouterConfig()
    assert front(repo).max_prompt_bytes == RouterConfig().max_prompt_bytes


# --- what qlm-serve passes ------------------------------------------------------------------------
@pytest.fixture
def no_triton(monkeypatch):
    """--dry-run needs no tritonserver: a stand-in installation."""
    inst = TritonInstallation(Path("/opt/tritonserver/bin/tritonserver"), Path("/b"), {}, "t", "0")
    monkeypatch.setattr(launcher, "find_triton", lambda *a: inst)
    monkeypatch.delenv("QLM_FLEET", raising=False)


def serve(capsys, *args: str) -> tuple[int, list[str], str]:
    """qlm-serve --dry-run on free ports: its exit code, qlm-openai's argv, stderr."""
    ports = [f"--{p}-port={free_port()}" for p in ("http", "grpc", "metrics", "openai")]
    rc = launcher.main(["--dry-run", "--model-repository", str(SHIPPED), *ports, *args])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, (shlex.split(lines[-1]) if rc == 0 and len(lines) > 1 else []), err


def test_qlm_serve_passes_its_settings_and_openai_args(no_triton, capsys):
    rc, argv, _ = serve(
        capsys, "--openai-arg", "--max-tokens-limit 4096", "--openai-arg=--max-stop=8"
    )
    assert rc == 0 and argv[1:3] == ["-m", "qlm_backend.openai_front"]
    a = openai_cli.parse_args(argv[3:])
    assert (a.max_tokens_limit, a.max_stop) == (4096, 8)
    assert a.model_repository == SHIPPED and a.router == "qlm"
    # No cap of qlm-serve's own: qlm-openai takes the router's from the same repository.
    assert a.max_prompt_bytes is None and a.max_body_bytes is None
    assert openai_cli.build_config(a).max_prompt_bytes == router_config(SHIPPED).max_prompt_bytes


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ("--port 9100", "qlm-openai's --port is set by qlm-serve (--openai-port)"),
        ("--po=9100", "qlm-openai's --port is set by qlm-serve"),  # argparse's abbreviations too
        ("--model-repository /tmp", "qlm-openai's --model-repository is set by qlm-serve"),
        ("--triton-grpc h:1", "qlm-openai's --triton-grpc is set by qlm-serve (--grpc-port)"),
        ("--show-config", "qlm-openai's --show-config is set by qlm-serve"),
        ("--bogus", "unrecognized arguments: --bogus"),
        ("--max-stop 0", "qlm-openai: --max-stop must be >= 1, got 0"),
        ("--max-stop", "expected one argument"),
        ("'unclosed", "No closing quotation"),
    ],
)
def test_qlm_serve_refuses_openai_args_before_starting_anything(no_triton, capsys, extra, says):
    rc, _, err = serve(capsys, f"--openai-arg={extra}")  # a value that looks like an option: `=`
    assert rc == 2, err
    assert err.startswith("qlm-serve: error: --openai-arg"), err
    assert says in err, err


def test_openai_args_without_qlm_openai_are_refused(no_triton, capsys):
    rc, _, err = serve(capsys, "--no-openai", "--openai-arg=--max-stop=8")
    assert rc == 2 and "no qlm-openai is started" in err
