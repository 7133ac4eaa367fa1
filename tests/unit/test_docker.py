"""What of docker/ can be checked without a Docker engine or a GPU (docker/README.md, "What is checked
here"): the compose file, Prometheus and Grafana files parse and agree with the fleet; every dashboard
query names a metric that is exported; every GPU engine's config.pbtxt parses into Triton's own
ModelConfig proto and declares the contract of its kind (our vLLM engine model: the ENGINE tables
with `priority`; `--engine vllm`, Triton's stock vllm_backend: its own), its model.json fits the
fleet's GPUs and passes our engine's validation as on a GPU; the router and fleet parse with the
router's own parsers and drive each engine kind as it can be driven; the repository is what
qlm_backend.deploy generates; the Dockerfile's base image is pinned >= 25.08 and its COPY sources exist;
the router's server starts the router's supervisor in its container, qlm-openai runs on the same image
in front of the router (its command parses with its own parser), and Prometheus scrapes it and sends
its alerts to the compose file's Alertmanager.
"""

from __future__ import annotations

import filecmp
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from qlm_backend import deploy
from qlm_backend.contract import (
    ENGINE_INPUTS,
    ENGINE_OUTPUTS,
    VLLM_BACKEND_INPUTS,
    VLLM_BACKEND_OUTPUTS,
)
from qlm_backend.core.fleet import parse_fleet
from qlm_backend.core.slo import DEFAULT_SLO_CLASSES
from qlm_backend.engine import hardware as hw
from qlm_backend.engine.perf import PerfModel, required_tp
from qlm_backend.openai_front import cli as openai_cli
from qlm_backend.router.config import RouterConfig, load_router_config
from qlm_backend.triton import supervisor_cli
from qlm_backend.triton.repository import split_engine_name
from qlm_backend.vllm_engine.config import EngineArgsError, check_repository, parse_engine_args
from qlm_backend.vllm_engine.devices import check_instance_kind, cuda_visible_devices

# PyYAML is only needed here; without it these tests are reported as skipped, not passed.
yaml = pytest.importorskip("yaml", reason="PyYAML needed to parse docker/*.yml")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
REPO = DOCKER / "model_repository"
RULES = DOCKER / "prometheus" / "rules"
ADMIN_HEADER = "qlm-admin-key"
ADMIN_ENV = "QLM_ADMIN_KEY"

# The metric families Triton's vllm_backend reports (its src/utils/metrics.py): a dashboard panel on
# vllm:* must use these, or it stays empty on real GPU engines.
VLLM_BACKEND_METRICS = {
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds",
    "vllm:time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
    "vllm:request_params_n",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_preemptions_total",
    "vllm:gpu_cache_usage_perc",
    "vllm:iteration_tokens_total",
    "vllm:request_queue_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
}
# Triton's own GPU metrics (on by default in GPU images).
TRITON_METRICS = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _fleet():
    return deploy.load_deploy_fleet(REPO)


def _compose():
    return _yaml(DOCKER / "docker-compose.yml")


# How the `triton` service starts its router's supervisor, then becomes tritonserver with the rest of
# its command line as arguments ($$: compose's escape for a literal $).
EXEC_TRITON = 'exec tritonserver "$$@"'


def _triton_services(compose) -> dict[str, dict]:
    """The services that run tritonserver: directly, or through `sh -c '... & exec tritonserver'`."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if (svc.get("command") or [None])[0] == "tritonserver"
        or (svc.get("command") or [None])[:2] == ["sh", "-c"]
        and svc["command"][2].endswith(EXEC_TRITON)
    }


def _server_args(svc: dict) -> list[str]:
    """tritonserver's arguments: after the binary, or after sh's script and its $0."""
    cmd = svc["command"]
    return cmd[1:] if cmd[0] == "tritonserver" else cmd[4:]


def _flags(cmd: list[str], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in cmd if a.startswith(flag + "=")]


def _pbtxt(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


# --- fleet and repository -------------------------------------------------------------------------
def test_fleet_parses_with_the_core_parser_and_placement_is_valid():
    data, fleet, pl = _fleet()
    assert parse_fleet(data, strict=False) == fleet  # what the router loads (strict=False)
    assert set(pl) == {i.instance_id for i in fleet.instances}
    # The three model sizes of the issue, under the names hardware.py profiles.
    assert {"mistral-7b", "llama-3-70b"} <= set(fleet.models)
    assert {"llama-2-13b", "vicuna-13b"} & set(fleet.models)
    assert set(fleet.models) <= set(hw.MODELS)


def test_placement_errors_name_the_problem():
    data, _, _ = _fleet()
    bad = json.loads(json.dumps(data))
    bad["placement"]["h100-1"]["gpus"] = [0]
    with pytest.raises(ValueError, match="GPU 0 given to"):
        deploy.placements(parse_fleet(bad, strict=False))
    bad = json.loads(json.dumps(data))
    bad["placement"]["h100-0"]["server"] = "triton-70b"
    with pytest.raises(ValueError, match="server of its own"):
        deploy.placements(parse_fleet(bad, strict=False))
    bad = json.loads(json.dumps(data))
    bad["placement"]["h100x4-0"]["gpus"] = [4, 5]
    with pytest.raises(ValueError, match="tp 4"):
        deploy.placements(parse_fleet(bad, strict=False))


def test_placement_kv_offloading_is_optional_and_checked():
    data, _, pl = _fleet()
    assert all(p.kv_offloading_gib for p in pl.values())  # on in the shipped fleet
    plain = json.loads(json.dumps(data))
    for p in plain["placement"].values():
        p.pop("kv_offloading_gib", None)
    assert all(
        p.kv_offloading_gib is None
        for p in deploy.placements(parse_fleet(plain, strict=False)).values()
    )
    body = deploy.qlm_model_json("mistral-7b", 1, 32)
    assert "kv_offloading_size" not in body and "kv_offloading_backend" not in body
    for value in (0, -1, "8", True):
        bad = json.loads(json.dumps(data))
        bad["placement"]["h100-0"]["kv_offloading_gib"] = value
        with pytest.raises(ValueError, match="h100-0.kv_offloading_gib"):
            deploy.placements(parse_fleet(bad, strict=False))
    bad = json.loads(json.dumps(data))
    bad["placement"]["h100-0"]["kv_offload"] = 8
    with pytest.raises(ValueError, match="h100-0: expected"):
        deploy.placements(parse_fleet(bad, strict=False))


def test_repository_holds_exactly_the_fleets_engines_and_the_router():
    _, fleet, _ = _fleet()
    dirs = {d.name for d in REPO.iterdir() if d.is_dir()}
    assert dirs == set(deploy.engine_names(fleet)) | {"qlm"}
    for name in dirs - {"qlm"}:
        model, instance = split_engine_name(name)
        assert model in hw.MODELS and instance in {i.instance_id for i in fleet.instances}


def _tree_diffs(left: Path, right: Path) -> list[str]:
    def diffs(c):
        out = [f"{c.left}/{n}" for n in c.left_only + c.right_only + c.diff_files]
        for sub in c.subdirs.values():
            out += diffs(sub)
        return out

    out = diffs(filecmp.dircmp(left, right, ignore=["__pycache__"]))
    # filecmp's shallow compare trusts size+mtime; compare contents to be sure.
    for f in right.rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts:
            other = left / f.relative_to(right)
            if not other.is_file() or other.read_bytes() != f.read_bytes():
                out.append(str(other))
    return out


def test_repository_is_what_the_generator_writes(tmp_path):
    """The committed repository is the default: our vLLM engine model."""
    shutil.copy(REPO / "fleet.json", tmp_path / "fleet.json")
    deploy.write_gpu_repository(tmp_path)
    assert not _tree_diffs(REPO, tmp_path), (
        "run: python -m qlm_backend.deploy docker/model_repository"
    )


def test_the_generator_switches_engine_kinds_both_ways(tmp_path, capsys):
    """`--engine vllm` writes the stock vllm_backend repository over ours and back, leaving no file
    of the other kind behind; `--trace-requests` is ours only."""
    shutil.copy(REPO / "fleet.json", tmp_path / "fleet.json")
    assert deploy.main([str(tmp_path), "--engine", "vllm"]) == 0
    assert "Triton vllm_backend" in capsys.readouterr().out
    assert not list(tmp_path.glob("*__*/1/model.py"))
    assert {_pbtxt(p).backend for p in tmp_path.glob("*__*/config.pbtxt")} == {"vllm"}
    assert deploy.main([str(tmp_path)]) == 0
    assert not _tree_diffs(REPO, tmp_path)
    assert deploy.main([str(tmp_path), "--trace-requests"]) == 0
    for p in tmp_path.glob("*__*/config.pbtxt"):
        assert _pbtxt(p).parameters["TRACE_REQUESTS"].string_value == "true"
    with pytest.raises(SystemExit):
        deploy.main([str(tmp_path), "--engine", "vllm", "--trace-requests"])
    with pytest.raises(ValueError, match="engine must be one of"):
        deploy.write_gpu_repository(tmp_path, "tgi")


@pytest.fixture(scope="module")
def stock_repo(tmp_path_factory) -> Path:
    """The documented option: the same fleet on Triton's stock vllm_backend (`--engine vllm`)."""
    d = tmp_path_factory.mktemp("stock")
    shutil.copy(REPO / "fleet.json", d / "fleet.json")
    deploy.write_gpu_repository(d, "vllm")
    return d


def _repo(engine: str, stock_repo: Path) -> Path:
    return REPO if engine == "qlm" else stock_repo


ENGINE_NAMES = sorted(d.name for d in REPO.iterdir() if "__" in d.name)


def _io(cfg) -> tuple[list, list]:
    dt = model_config_pb2.DataType.Name
    ins = [(i.name, dt(i.data_type), list(i.dims), i.optional) for i in cfg.input]
    outs = [(o.name, dt(o.data_type), list(o.dims)) for o in cfg.output]
    return ins, outs


def _table(inputs, outputs) -> tuple[list, list]:
    return (
        [(s.name, s.config_type, list(s.dims), s.optional) for s in inputs],
        [(s.name, s.config_type, list(s.dims)) for s in outputs],
    )


@pytest.mark.parametrize("engine", deploy.ENGINES)
@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_engine_config_is_a_valid_engine_model_config(name, engine, stock_repo):
    _, fleet, pl = _fleet()
    d = _repo(engine, stock_repo) / name
    cfg = _pbtxt(d / "config.pbtxt")
    assert cfg.name == name
    assert cfg.max_batch_size == 0
    assert cfg.model_transaction_policy.decoupled  # both engine models refuse to load otherwise
    assert cfg.parameters["REPORT_CUSTOM_METRICS"].string_value == "true"
    if engine == "qlm":
        # Our engine model, Triton's Python backend with the image's system Python (vLLM there).
        assert cfg.backend == "python"
        assert (d / "1" / "model.py").read_text() == deploy.QLM_MODEL_PY
        assert (
            "from qlm_backend.vllm_engine.model import VllmEngineModel as TritonPythonModel"
            in deploy.QLM_MODEL_PY
        )
        assert "EXECUTION_ENV_PATH" not in cfg.parameters
        assert cfg.parameters["TRACE_REQUESTS"].string_value == "false"
        assert _io(cfg) == _table(ENGINE_INPUTS, ENGINE_OUTPUTS)
        ins, outs = {i.name for i in cfg.input}, {o.name for o in cfg.output}
        assert {"priority", "return_num_cached_tokens"} <= ins and "num_cached_tokens" in outs
    else:
        assert cfg.backend == "vllm"
        assert not (d / "1" / "model.py").exists()
        assert _io(cfg) == _table(VLLM_BACKEND_INPUTS, VLLM_BACKEND_OUTPUTS)
        assert "priority" not in {i.name for i in cfg.input}  # vllm_backend has no such input

    _, instance = split_engine_name(name)
    inst = next(i for i in fleet.instances if i.instance_id == instance)
    (group,) = cfg.instance_group
    assert group.count == 1
    kind = model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)
    p = pl[instance]
    if inst.tp == 1:
        # KIND_GPU: vllm_backend, and our engine model (vllm_engine/devices.py), set
        # CUDA_VISIBLE_DEVICES to this id (server-local numbering).
        assert kind == "KIND_GPU"
        local = deploy.server_gpus(pl)[p.server].index(p.gpus[0])
        assert list(group.gpus) == [local]
        # What our engine model pins, given what Triton's Python backend tells the instance.
        assert cuda_visible_devices("GPU", group.gpus[0], None) == str(local)
    else:
        # Multi-GPU engines must be KIND_MODEL (both engine models refuse KIND_GPU with tp > 1) and
        # take every GPU of their server.
        assert kind == "KIND_MODEL" and not group.gpus
        assert deploy.server_gpus(pl)[p.server] == sorted(p.gpus)
        assert cuda_visible_devices("MODEL", 0, None) is None
        with pytest.raises(ValueError, match="KIND_MODEL"):
            check_instance_kind("GPU", inst.tp)
    check_instance_kind(kind.removeprefix("KIND_"), inst.tp)


@pytest.mark.parametrize("engine", deploy.ENGINES)
@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_engine_model_json_fits_the_fleets_gpus(name, engine, stock_repo):
    _, fleet, pl = _fleet()
    model, instance = split_engine_name(name)
    inst = next(i for i in fleet.instances if i.instance_id == instance)
    version_dir = _repo(engine, stock_repo) / name / "1"
    args = json.loads((version_dir / "model.json").read_text())
    required = {
        "model",
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "max_model_len",
        "enable_sleep_mode",
        "disable_log_stats",
    }
    assert required <= set(args)
    assert args["model"] == deploy.HF_MODELS[model]
    tp = args["tensor_parallel_size"]
    assert tp == inst.tp
    assert tp >= required_tp(hw.get_model(model), hw.get_gpu(inst.gpu))
    PerfModel(
        hw.get_model(model),
        hw.get_gpu(inst.gpu),
        tp,
        gpu_memory_utilization=args["gpu_memory_utilization"],
    )  # raises when weights + KV do not fit
    assert 0 < args["gpu_memory_utilization"] <= 0.95
    assert args["max_model_len"] <= hw.get_model(model).max_context_tokens
    assert args.get("max_num_seqs", 256) >= inst.max_in_flight  # late binding keeps all running
    assert args["enable_sleep_mode"] is True
    assert args["disable_log_stats"] is False  # vllm:* metrics need stat logging
    assert args["kv_offloading_size"] == pl[instance].kv_offloading_gib
    assert args["kv_offloading_backend"] == "native"
    # Our engine's own validation (vllm_engine/config.py) as it runs on a GPU: the Hub id is taken
    # as it is, the KV cache sized by gpu_memory_utilization (no CPU kv_cache_memory_bytes).
    parsed = parse_engine_args(args, version_dir, platform="gpu")
    assert parsed.model == deploy.HF_MODELS[model]
    kw = parsed.engine_kwargs()
    assert "kv_cache_memory_bytes" not in kw
    assert kw["gpu_memory_utilization"] == args["gpu_memory_utilization"]
    assert parsed.world_size == tp
    assert parsed.distributed_executor_backend == ("uni" if tp == 1 else "mp")
    with pytest.raises(EngineArgsError, match="not used on CPU") as e:
        parse_engine_args(args, version_dir, platform="cpu")
    assert e.value.key == "gpu_memory_utilization"
    if engine == "qlm":
        assert args["scheduling_policy"] == "priority"  # what the forwarded priority needs
        assert args["enable_prefix_caching"] is True  # exact resume's prefix cache hits
        assert args["distributed_executor_backend"] == ("uni" if tp == 1 else "mp")
    else:
        # The stock backend's model.json: today's keys, plus the fleet's KV offloading.
        assert set(args) == required | {
            "max_num_seqs",
            "dtype",
            "kv_offloading_size",
            "kv_offloading_backend",
        }


def test_model_json_keys_are_vllm_engine_args(stock_repo):
    """Every key of both kinds is an AsyncEngineArgs field of a real vLLM (the CPU build in
    .venv-vllm, when present)."""
    py = ROOT / ".venv-vllm" / "bin" / "python"
    if not py.exists():
        pytest.skip("no .venv-vllm with vLLM installed (make vllm-venv)")
    keys = set()
    for repo in (REPO, stock_repo):
        for f in repo.glob("*__*/1/model.json"):
            keys |= set(json.loads(f.read_text()))
    code = (
        "import dataclasses, json; from vllm.engine.arg_utils import AsyncEngineArgs; "
        "print(json.dumps([f.name for f in dataclasses.fields(AsyncEngineArgs)]))"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    fields = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert keys <= fields, f"not AsyncEngineArgs fields: {sorted(keys - fields)}"


def _router_config(repo: Path) -> RouterConfig:
    return RouterConfig.from_mapping(json.loads((repo / "qlm/1/router.json").read_text()))


def test_router_config_parses_and_matches_the_fleet():
    _, fleet, pl = _fleet()
    cfg_pb = _pbtxt(REPO / "qlm" / "config.pbtxt")
    assert cfg_pb.name == "qlm" and cfg_pb.backend == "python"
    assert cfg_pb.model_transaction_policy.decoupled
    model_config = json_format.MessageToDict(cfg_pb, preserving_proto_field_name=True)
    cfg = load_router_config(model_config, REPO / "qlm" / "1")
    assert cfg == _router_config(REPO)
    assert cfg.policy == "qlm"
    assert (REPO / cfg.fleet).exists()
    remote = {i: f"grpc://{p.server}:8001" for i, p in pl.items() if p.server != "triton"}
    assert dict(cfg.instance_servers) == remote
    assert "h100x4-0" in remote  # the TP4 instance lives on its own server
    assert cfg.load_timeout_s >= 600  # a cold 70B start takes minutes


@pytest.mark.parametrize("engine", deploy.ENGINES)
def test_router_drives_each_engine_kind_as_it_can_be_driven(engine, stock_repo):
    """Our engines: `priority` forwarded, swaps warm by sleep and wake where the fleet keeps models
    warm. The stock vllm_backend: no priority (it has no such input), every swap planned and done
    cold. Both: real engines, loaded with no config override (a simulated engine's would replace
    the vLLM model's config), and the deployment's admin key header."""
    cfg = _router_config(_repo(engine, stock_repo))
    _, fleet, _ = _fleet()
    assert fleet.instances
    ours = engine == "qlm"
    assert cfg.engine_backend == ("qlm-vllm" if ours else "vllm")
    assert cfg.forward_priority is ours
    assert cfg.admin_header == ADMIN_HEADER
    planned = cfg.planning_fleet(fleet)
    # The fleet's warm slots reach the planner (each instance is its own host: a sleeping engine
    # wakes only on its own GPU(s); two slots keep both models of a TP1 instance).
    assert cfg.manager_config(planned).warm_slots_per_host == fleet.warm_slots_per_host == 2
    assert {i.host for i in fleet.instances} == {i.instance_id for i in fleet.instances}
    for inst, plan in zip(fleet.instances, planned.instances, strict=True):
        assert inst.warm_start is True  # the fleet file says the hardware can; the engine decides
        assert cfg.load_params(inst.instance_id, warm=True) is None
        assert cfg.load_params(inst.instance_id, warm=False) is None
        assert cfg.warm_mode(inst.instance_id, plan.warm_start) == ("sleep" if ours else "none")
        assert plan.warm_start is ours


# --- compose --------------------------------------------------------------------------------------
def test_compose_runs_every_server_with_explicit_control_and_a_restricted_repository_api():
    compose = _compose()
    _, fleet, pl = _fleet()
    servers = _triton_services(compose)
    assert set(servers) == set(deploy.server_gpus(pl))
    loads = deploy.initial_loads(fleet, pl)
    prefixes = set()
    for name, svc in servers.items():
        cmd = _server_args(svc)
        assert "--model-control-mode=explicit" in cmd
        assert _flags(cmd, "--model-repository") == ["/models"]
        assert _flags(cmd, "--load-model") == loads[name]
        http = _flags(cmd, "--http-restricted-api")
        grpc = _flags(cmd, "--grpc-restricted-protocol")
        assert len(http) == len(grpc) == 1
        for value in (http[0], grpc[0]):
            # Triton splits on the first ':' into API groups and header=value.
            groups, _, kv = value.partition(":")
            assert "model-repository" in groups.split(",")
            header, _, secret = kv.partition("=")
            assert header == ADMIN_HEADER
            assert secret.startswith("${" + ADMIN_ENV + ":?")  # compose refuses to start without it
        assert svc["environment"][ADMIN_ENV].startswith("${" + ADMIN_ENV)
        prefix = [v for v in _flags(cmd, "--backend-config") if "shm-region-prefix-name" in v]
        assert len(prefix) == 1
        prefixes.add(prefix[0])
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        assert [int(g) for g in dev["device_ids"]] == deploy.server_gpus(pl)[name]
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert len(prefixes) == len(servers)  # each server's stubs get their own shm names
    assert {"8000:8000", "8001:8001", "8002:8002"} <= set(servers["triton"]["ports"])


def _router_server(compose) -> tuple[str, dict]:
    """The Triton service that loads the router."""
    (found,) = [
        (n, s)
        for n, s in _triton_services(compose).items()
        if "qlm" in _flags(_server_args(s), "--load-model")
    ]
    return found


def _container_port(published: str) -> int:
    return int(published.rsplit(":", 1)[1])


def test_the_router_server_runs_the_routers_supervisor_beside_tritonserver():
    """`sh -c 'python3 -m qlm_backend.triton.supervisor ... & exec tritonserver "$@"'`: the supervisor
    shares the server's container (its PID namespace: it reads the stub's /proc entry) and parses
    with its own parser; tritonserver replaces sh (the main process, the one docker stop signals).
    The other servers hold no router and run tritonserver directly."""
    compose = _compose()
    name, svc = _router_server(compose)
    script = svc["command"][2]
    assert script.count("$") == 2  # only "$$@": any other $ would be compose's interpolation
    supervisor, sep, rest = script.partition(" & ")
    assert sep and rest == EXEC_TRITON
    words = shlex.split(supervisor)
    assert words[:3] == ["python3", "-m", "qlm_backend.triton.supervisor"]
    args = _server_args(svc)
    # The repository is the server's (/models, mounted from ./model_repository): parsed here with
    # the directory the container mounts there.
    (repo,) = _flags(args, "--model-repository")
    mounts = dict(v.split(":")[:2] for v in svc["volumes"])
    assert mounts["./model_repository"] == repo
    cfg = supervisor_cli.parse_args([w.replace(repo, str(REPO)) for w in words[3:]])
    assert cfg.address == f"127.0.0.1:{_flags(args, '--http-port')[0]}"
    assert cfg.model == "qlm" and cfg.model_repository == REPO
    # Its admin key is the servers' ($QLM_ADMIN_KEY, the default of --admin-key).
    assert "--admin-key" not in words and svc["environment"][ADMIN_ENV].startswith("${" + ADMIN_ENV)
    # It waits for the router's first READY at least as long as the healthcheck waits for the server.
    start_period = svc["healthcheck"]["start_period"]
    assert start_period.endswith("m") and cfg.wait_s >= 60 * int(start_period[:-1])
    for other, osvc in _triton_services(compose).items():
        if other != name:
            assert osvc["command"][0] == "tritonserver", other


def _openai_args(svc: dict):
    cmd = svc["command"]
    assert cmd[:3] == ["python3", "-m", "qlm_backend.openai_front"]
    return openai_cli.parse_args(cmd[3:])


def test_qlm_openai_runs_on_the_image_in_front_of_the_router(monkeypatch):
    compose = _compose()
    svc = compose["services"]["qlm-openai"]
    router_name, router_svc = _router_server(compose)
    assert svc["image"] == router_svc["image"] and svc["build"] == router_svc["build"]
    monkeypatch.delenv("QLM_OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("QLM_FLEET", raising=False)
    a = _openai_args(svc)
    assert a.host == "0.0.0.0"
    assert f"{a.port}:{a.port}" in svc["ports"]
    router_args = _server_args(router_svc)
    assert a.triton_grpc == f"{router_name}:{_flags(router_args, '--grpc-port')[0]}"
    assert a.router == "qlm" and "qlm" in _flags(router_args, "--load-model")
    # The router's repository, mounted where the router's server has it.
    mounts = dict(v.split(":")[:2] for v in svc["volumes"])
    assert str(a.model_repository) == mounts["./model_repository"]
    assert _flags(router_args, "--model-repository") == [str(a.model_repository)]
    # The API key only from the environment, optional (an empty value: open).
    assert (
        a.api_key is None and svc["environment"]["QLM_OPENAI_API_KEY"] == "${QLM_OPENAI_API_KEY:-}"
    )
    # What it serves from that repository: the fleet's models and the router's own prompt cap.
    a.model_repository = REPO
    cfg = openai_cli.build_config(a)
    _, fleet, _ = _fleet()
    assert set(cfg.fleet.models) == set(fleet.models)
    assert cfg.max_prompt_bytes == _router_config(REPO).max_prompt_bytes
    assert svc["depends_on"] == {router_name: {"condition": "service_healthy"}}
    probe = " ".join(svc["healthcheck"]["test"])
    assert f"http://localhost:{a.port}/health" in probe
    # The image carries qlm-openai's dependencies and imports it (and the supervisor) at build.
    run = " ".join(ln for ln in _dockerfile_lines() if ln.upper().startswith("RUN "))
    for dep in ('"fastapi', '"uvicorn', '"jinja2'):
        assert dep in run
    assert "qlm_backend.openai_front.app" in run and "qlm_backend.triton.supervisor_cli" in run


def test_alertmanager_receives_prometheus_alerts():
    compose = _compose()
    svc = compose["services"]["alertmanager"]
    image, _, tag = svc["image"].partition(":")
    assert image == "prom/alertmanager" and re.fullmatch(r"v\d+\.\d+\.\d+", tag)  # pinned
    (port,) = {_container_port(p) for p in svc["ports"]}
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])  # no authentication: host only
    mounts = dict(v.split(":")[:2] for v in svc["volumes"])
    (config,) = _flags(svc["command"], "--config.file")
    am = _yaml(DOCKER / [src for src, dst in mounts.items() if dst == config][0])
    receivers = {r["name"] for r in am["receivers"]}
    routes = [am["route"], *am["route"].get("routes", [])]
    assert all(r.get("receiver", am["route"]["receiver"]) in receivers for r in routes)
    # The rules' severities: critical alerts have their own route, warnings take the default one.
    severities = {r["labels"]["severity"] for rs in _rules().values() for r in rs if "alert" in r}
    assert severities == {"warning", "critical"}
    assert any('severity="critical"' in r.get("matchers", []) for r in routes)
    prom = _yaml(DOCKER / "prometheus" / "prometheus.yml")
    (am_cfg,) = prom["alerting"]["alertmanagers"]
    targets = {t for sc in am_cfg["static_configs"] for t in sc["targets"]}
    assert targets == {f"alertmanager:{port}"}
    assert "alertmanager" in compose["services"]["prometheus"]["depends_on"]


def test_compose_mounts_exist_and_monitoring_services_are_defined():
    compose = _compose()
    assert {"prometheus", "grafana", "alertmanager", "qlm-openai"} <= set(compose["services"])
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"{name}: {src}"
            else:
                assert src in compose["volumes"], f"{name}: undeclared volume {src}"


def test_prometheus_scrapes_every_triton_metrics_port_and_loads_the_rules():
    _, _, pl = _fleet()
    prom = _yaml(DOCKER / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    # The alert rules match job="triton" (QLMTritonDown, QLMEngineMetricsAbsent).
    targets = {t for sc in jobs["triton"]["static_configs"] for t in sc["targets"]}
    assert targets == {f"{s}:8002" for s in deploy.server_gpus(pl)}
    # qlm-openai's own metrics, on its published port (QLMOpenAIDown matches job="qlm-openai").
    openai = _compose()["services"]["qlm-openai"]
    (target,) = [t for sc in jobs["qlm-openai"]["static_configs"] for t in sc["targets"]]
    assert target == f"qlm-openai:{_openai_args(openai).port}"
    assert jobs["qlm-openai"]["metrics_path"] == "/metrics"
    # rule_files (relative to the config) reach the rules the compose file mounts beside it.
    mounts = dict(v.split(":")[:2] for v in _compose()["services"]["prometheus"]["volumes"])
    assert mounts["./prometheus/rules"] == "/etc/prometheus/rules"
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert prom["rule_files"] == ["rules/*.yml"]
    assert sorted(p.name for p in RULES.glob("*.yml")) == ["qlm-alerts.yml", "qlm-recording.yml"]


def test_grafana_provisioning_points_at_the_dashboard_and_datasource():
    prov = DOCKER / "grafana" / "provisioning"
    (ds,) = _yaml(prov / "datasources" / "prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = _yaml(prov / "dashboards" / "qlm.yml")["providers"]
    mounts = {
        v.split(":")[1]: v.split(":")[0] for v in _compose()["services"]["grafana"]["volumes"]
    }
    assert (DOCKER / mounts[provider["options"]["path"]] / "qlm.json").is_file()
    dash = _dashboard()
    # No hard-coded datasource uid: every panel and query reads the datasource variable.
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == ds["type"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${" + var["name"] + "}"}
    for p in _panels(dash):
        assert p["datasource"] == ref, p["title"]
        assert all(t["datasource"] == ref for t in p["targets"]), p["title"]
    uids = re.findall(
        r'"uid": "([^"]*)"', json.dumps({k: v for k, v in dash.items() if k != "uid"})
    )
    assert set(uids) == {ref["uid"]}


# --- dashboard queries and rules ------------------------------------------------------------------
def _dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "dashboards" / "qlm.json").read_text())


def _panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def _rules() -> dict[str, list[dict]]:
    """Rule groups by name, over docker/prometheus/rules/*.yml."""
    groups: dict[str, list[dict]] = {}
    for f in sorted(RULES.glob("*.yml")):
        for g in _yaml(f)["groups"]:
            assert g["name"] not in groups, g["name"]
            groups[g["name"]] = g["rules"]
    return groups


def _exported_metrics() -> set[str]:
    """Metric families the project registers (router_metrics.py, glue.py: Triton's :8002;
    openai_front/metrics.py: qlm-openai's /metrics, where prometheus-client adds _total to a
    counter), read from the source."""
    names = set()
    for f in ("triton/router_metrics.py", "triton/glue.py"):
        src = (ROOT / "qlm_backend" / f).read_text()
        names |= set(re.findall(r'"((?:qlm_|vllm:)[a-z0-9_:]+)"', src))
    src = (ROOT / "qlm_backend" / "openai_front" / "metrics.py").read_text()
    for kind, name in re.findall(r'(Counter|Histogram|Gauge)\(\s*"(qlm_openai_[a-z0-9_]+)"', src):
        names.add(name + "_total" if kind == "Counter" else name)
    return names


def _known_metrics() -> set[str]:
    """What a query may name: the router's and qlm-openai's families, and the vllm: families our
    engines or Triton's vllm_backend export (each panel on vllm: draws on one or the other)."""
    exported = _exported_metrics()
    return {m for m in exported if m.startswith("qlm_")} | (
        {m for m in exported if m.startswith("vllm:")} | VLLM_BACKEND_METRICS
    )


def _recorded() -> set[str]:
    return {r["record"] for rules in _rules().values() for r in rules if "record" in r}


def _check_names(where: str, expr: str, known: set[str], recorded: set[str]) -> set[str]:
    """The families an expression reads; each must be exported, or recorded by a rule."""
    records = _record_names(expr)
    raw = _expr_metrics(re.sub(RECORD_NAME, "", expr))
    # Prometheus's own per-target `up` series.
    used = {"up"} if re.search(r"\bup\{", expr) else set()
    assert raw | records | used, f"{where}: no metric in {expr!r}"
    for m in raw:
        fam = m if m in TRITON_METRICS else _family(m, known)
        assert fam, f"{where}: {m} is not exported by the router, qlm-openai or the engines"
        used.add(fam)
    for m in records:
        assert m in recorded, f"{where}: {m} is recorded by no rule"
        used.add(m)
    return used


# Recording-rule names, level:metric:operations (vllm: names have one colon only).
RECORD_NAME = r"\b[a-z_]+:qlm_[a-z0-9_]+:[a-z0-9_]+"


def _record_names(expr: str) -> set[str]:
    """Recording-rule names (level:metric:operations) in an expression."""
    return set(re.findall(RECORD_NAME, re.sub(r'"[^"]*"', "", expr)))


def _expr_metrics(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    return set(re.findall(r"\b(?:qlm_|nv_)[a-z0-9_]+|vllm:[a-z0-9_]+", expr))


def _family(metric: str, known: set[str]) -> str | None:
    if metric in known:
        return metric
    for suffix in HISTOGRAM_SUFFIXES:
        if metric.endswith(suffix) and metric.removesuffix(suffix) in known:
            return metric.removesuffix(suffix)
    return None


def test_every_dashboard_query_names_an_exported_metric():
    exported = _exported_metrics()
    assert {
        "qlm_queue_length",
        "qlm_planner_seconds",
        "qlm_ttft_seconds",
        "qlm_queue_seconds",
        "qlm_openai_requests_total",
        "qlm_openai_ttft_seconds",
        "vllm:time_to_first_token_seconds",
    } <= exported
    known, recorded = _known_metrics(), _recorded()
    dash = _dashboard()
    used = set()
    panels = _panels(dash)
    assert panels
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            used |= _check_names(p["title"], t["expr"], known, recorded)
    # What the issue asks the dashboard to show.
    assert {
        "qlm_queue_length",
        "qlm_predicted_wait_seconds",
        "qlm_requests_total",
        "qlm_lso_total",
        "qlm_planner_seconds",
        "qlm_solver_fallbacks_total",
        "vllm:time_to_first_token_seconds",
        "qlm_ttft_seconds",
        "qlm_queue_seconds",
        "slo_class:qlm_ttft_attainment_target:ratio",
    } <= used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# Units a panel may draw in (Grafana unit ids), by what the panel shows.
DASHBOARD_UNITS = {"s", "percentunit", "short", "reqps", "ops", "bytes", "suffix: tok/s"}


def test_dashboard_has_one_unit_per_panel():
    for p in _panels(_dashboard()):
        fc = p["fieldConfig"]
        assert fc["defaults"].get("unit") in DASHBOARD_UNITS, p["title"]
        # No override gives a series of the panel another unit.
        for o in fc.get("overrides", []):
            assert all(prop["id"] != "unit" for prop in o["properties"]), p["title"]
        exprs = [t["expr"] for t in p["targets"]]
        unit = fc["defaults"]["unit"]
        # What mixed units before: a rate of counts on a seconds axis, token counts beside seconds.
        if unit == "s":
            for e in exprs:
                assert "histogram_quantile" in e or "seconds" in e, (p["title"], e)
                assert "_count[" not in e or "histogram_quantile" in e, (p["title"], e)
                assert "tokens" not in e, (p["title"], e)
        if unit == "percentunit":
            assert p["fieldConfig"]["defaults"].get("max") == 1, p["title"]


def test_dashboard_has_model_variable_and_an_attainment_panel_per_class():
    dash = _dashboard()
    vars_ = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "model"} <= set(vars_)
    model = vars_["model"]
    assert model["type"] == "query" and model["includeAll"] and model["multi"]
    assert "label_values(qlm_queue_length, model)" in json.dumps(model["query"])
    panels = _panels(dash)
    # The router's per-model series are filtered by $model.
    for p in panels:
        for t in p["targets"]:
            expr = re.sub(RECORD_NAME, "", t["expr"])
            if re.search(r"qlm_(queue_length|predicted_wait|ttft|queue_seconds)", expr):
                assert '$model"' in t["expr"] or "${model}" in t["expr"], (p["title"], t["expr"])
    for cls in DEFAULT_SLO_CLASSES:
        slo = f"{cls.ttft_slo_s:g}"
        (p,) = [p for p in panels if p["title"].startswith(f"Attainment: {cls.name} ")]
        assert p["fieldConfig"]["defaults"]["unit"] == "percentunit"
        assert any(
            f'slo_class="{cls.name}"' in t["expr"] and f'le=~"{slo}(\\\\.0)?"' in t["expr"]
            for t in p["targets"]
        ), p["title"]


# --- Prometheus rules (promtool checks them in make test-observability) ------------------------
def test_rule_files_have_the_expected_groups_and_name_exported_metrics():
    groups = _rules()
    assert set(groups) == {"qlm_slo_attainment", "qlm_slo_targets", "qlm_alerts"}
    known, recorded = _known_metrics(), _recorded()
    assert {
        "model_slo_class:qlm_ttft_attainment:ratio_rate5m",
        "slo_class:qlm_ttft_attainment:ratio_rate5m",
        "slo_class:qlm_requests_attainment:ratio_rate5m",
        "slo_class:qlm_requests_shed:ratio_rate5m",
        "slo_class:qlm_ttft_attainment_target:ratio",
    } <= recorded
    used: set[str] = set()
    for name, rules in groups.items():
        for r in rules:
            assert ("record" in r) != ("alert" in r), r
            if "vector(" in r["expr"]:
                continue
            used |= _check_names(
                f"{name}/{r.get('record') or r['alert']}", r["expr"], known, recorded
            )
    assert {"qlm_ttft_seconds", "qlm_requests_total", "qlm_openai_requests_total"} <= used
    # One TTFT attainment rule and one target per shipped class, its SLO a bucket of the router's
    # histogram.
    ttft = [
        r
        for r in groups["qlm_slo_attainment"]
        if r["record"] == "slo_class:qlm_ttft_attainment:ratio_rate5m"
    ]
    targets = {r["labels"]["slo_class"] for r in groups["qlm_slo_targets"]}
    assert targets == {c.name for c in DEFAULT_SLO_CLASSES}
    src = (ROOT / "qlm_backend" / "triton" / "router_metrics.py").read_text()
    buckets = re.search(r"LATENCY_BUCKETS = \[([^\]]*)\]", src)
    assert buckets
    latency_buckets = {float(b) for b in buckets[1].replace("\n", " ").split(",") if b.strip()}
    for cls in DEFAULT_SLO_CLASSES:
        assert cls.ttft_slo_s in latency_buckets
        slo = f"{cls.ttft_slo_s:g}"
        (r,) = [r for r in ttft if f'slo_class="{cls.name}"' in r["expr"]]
        assert f'le=~"{slo}(\\\\.0)?"' in r["expr"] and r["labels"]["slo_ttft_seconds"] == slo
    alerts = {r["alert"]: r for r in groups["qlm_alerts"]}
    assert {
        "QLMSLOAttainmentLow",
        "QLMShedRateHigh",
        "QLMRequestsFailing",
        "QLMTritonDown",
        "QLMEngineMetricsAbsent",
    } <= set(alerts)
    for a in alerts.values():
        assert a["labels"]["severity"] in {"warning", "critical"}
        assert a["annotations"]["summary"] and a["for"]
    # The rules' unit tests exist beside them (run by promtool in make test-observability).
    test = _yaml(DOCKER / "prometheus" / "tests" / "qlm-rules.test.yml")
    assert sorted(test["rule_files"]) == ["../rules/qlm-alerts.yml", "../rules/qlm-recording.yml"]
    tested = {t["alertname"] for case in test["tests"] for t in case.get("alert_rule_test", [])}
    assert tested == set(alerts)


# --- Dockerfile -----------------------------------------------------------------------------------
def _dockerfile_lines() -> list[str]:
    # Join continuation lines; drop comments.
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_dockerfile_base_image_is_the_triton_vllm_container_pinned_at_25_08_or_later():
    froms = [ln for ln in _dockerfile_lines() if ln.upper().startswith("FROM ")]
    assert len(froms) == 1
    m = re.fullmatch(r"FROM nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-vllm-python-py3", froms[0])
    assert m, froms[0]
    assert (int(m[1]), int(m[2])) >= (
        25,
        8,
    )  # earlier releases carry model-control/Python-backend CVEs
    tag = f"{m[1]}.{m[2]}"
    images = {svc["image"] for svc in _triton_services(_compose()).values()}
    assert images == {f"qlm-triton:{tag}"}


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [ln[1:].removesuffix("/**") for ln in ignore if ln.startswith("!")]
    copies = [ln for ln in _dockerfile_lines() if ln.upper().startswith("COPY ")]
    assert copies
    for ln in copies:
        parts = [p for p in ln.split()[1:] if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), src  # the build context is the repository root
            assert any(src == a or src.startswith(a + "/") for a in allowed), (
                f"{src} is excluded by Dockerfile.dockerignore"
            )


def test_dockerfile_keeps_the_images_numpy_and_vllm():
    run = " ".join(ln for ln in _dockerfile_lines() if ln.upper().startswith("RUN "))
    # The project's numpy<2 pin is for the 2.51 CPU stub; in the image the repo goes in without deps
    # and the runtime deps under constraints frozen from the image (vLLM's numpy stays).
    assert "pip install --no-deps ." in run
    assert "-c /opt/qlm/image-constraints.txt" in run
    assert "pip list --format=freeze > /opt/qlm/image-constraints.txt" in run
    assert not re.search(r"pip install[^&]*\bnumpy", run)


def test_dockerfile_checks_every_engines_model_json_against_the_images_vllm(stock_repo):
    """The build runs our engine's model.json check over /models with the image's AsyncEngineArgs
    (a key that vLLM lacks fails the build); here the same check passes for both engine kinds."""
    run = " ".join(ln for ln in _dockerfile_lines() if ln.upper().startswith("RUN "))
    assert "check_repository(pathlib.Path('/models'), fields, 'gpu')" in run
    assert "dataclasses.fields(AsyncEngineArgs)" in run
    # The engine model's pure modules import beside the image's vLLM.
    for mod in ("config", "control", "devices", "resume", "trace"):
        assert f"qlm_backend.vllm_engine.{mod}" in run
    lines = _dockerfile_lines()
    copy_models = lines.index("COPY docker/model_repository /models")
    assert any("check_repository" in ln for ln in lines[copy_models:])
    _, fleet, _ = _fleet()
    for repo in (REPO, stock_repo):
        assert check_repository(repo, None, "gpu") == sorted(deploy.engine_names(fleet))


def test_env_example_names_the_secrets_compose_needs():
    env = (DOCKER / ".env.example").read_text()
    keys = {ln.split("=", 1)[0] for ln in env.splitlines() if ln and not ln.startswith("#")}
    text = (DOCKER / "docker-compose.yml").read_text()
    needed = set(re.findall(r"\$\{([A-Z_]+)", text))
    assert needed <= keys
    assert ".env" in (DOCKER / ".gitignore").read_text().split()
