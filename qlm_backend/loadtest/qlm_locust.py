"""Locust building blocks for QLM: users over the package client, outcome counting, the report.

Imported by `locustfile.py` (SLO classes as weighted user classes) and `locustfile_trace.py` (a
trace replay). Every request ends as one of: completed, an explicit error from the server (shed,
bad input: the server answered), lost (neither: a timeout, a dropped stream, a stream without its
final response), or abandoned (in flight when Locust killed the user at the end; the runner
gives users a stop timeout and users think inside their task, so this stays 0; see QlmUser).
The run exits non-zero when anything was lost.

Locust reports per request two events: `<class> ttft` (time to first token) and `<class> e2e`
(end to end; a failure when the request did not complete). Custom options (all `--qlm-*` but the
gRPC address) are listed by `locust -f loadtest/locustfile.py --help`.
"""

from __future__ import annotations

# gRPC's C core must cooperate with gevent before any channel exists, or Locust's greenlets block
# each other inside grpc calls (and Locust hangs at exit).
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent import GreenletExit  # noqa: E402
from locust import User, constant, events  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.user.task import LOCUST_STATE_STOPPING  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from qlm_backend.client import GrpcClient, HttpClient, Request, Result  # noqa: E402
from qlm_backend.core.slo import DEFAULT_SLO_CLASSES  # noqa: E402
from qlm_backend.stats import percentile  # noqa: E402

SLO_S = {c.name: c.ttft_slo_s for c in DEFAULT_SLO_CLASSES}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--grpc-host", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--qlm-router", default="qlm", help="router model to call")
    parser.add_argument("--qlm-model", default="mistral-7b", help="logical model to request")
    parser.add_argument("--qlm-max-tokens", type=int, default=32)
    parser.add_argument(
        "--qlm-time-scale",
        type=float,
        default=1.0,
        help="the server's time_scale (wall s per simulated s): TTFTs are divided by it before "
        "they are compared with the class SLOs",
    )
    parser.add_argument("--qlm-report-dir", default="loadtest-report")
    parser.add_argument("--qlm-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--qlm-slo",
        default="",
        help="class SLO overrides, e.g. interactive=20,batch-1=60 (seconds, simulated)",
    )
    parser.add_argument("--qlm-trace", default="", help="trace file (locustfile_trace.py only)")
    parser.add_argument("--qlm-trace-speedup", type=float, default=1.0)
    parser.add_argument("--qlm-trace-max-requests", type=int, default=200)
    parser.add_argument("--qlm-trace-protocol", default="grpc", choices=("grpc", "http"))
    parser.add_argument("--qlm-seed", type=int, default=0)


# --- outcome accounting ----------------------------------------------------------------------
@dataclass
class ClassStats:
    slo_s: float
    sent: int = 0
    completed: int = 0
    errors: int = 0
    lost: int = 0
    abandoned: int = 0
    attained: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    ttft_s: list[float] = field(default_factory=list)  # simulated seconds, completed requests
    e2e_s: list[float] = field(default_factory=list)  # wall seconds, completed requests
    lost_examples: list[str] = field(default_factory=list)


class Collector:
    def __init__(self) -> None:
        self.classes: dict[str, ClassStats] = {}
        self.time_scale = 1.0
        self.slo_s = dict(SLO_S)
        self.started = time.time()

    def get(self, cls: str) -> ClassStats:
        if cls not in self.classes:
            self.classes[cls] = ClassStats(self.slo_s.get(cls, float("inf")))
        return self.classes[cls]

    def record(self, cls: str, r: Result) -> None:
        s = self.get(cls)
        s.sent += 1
        if r.outcome == "completed":
            s.completed += 1
            ttft = (r.ttft_s if r.ttft_s is not None else r.total_s) / self.time_scale
            s.ttft_s.append(ttft)
            s.e2e_s.append(r.total_s)
            if ttft <= s.slo_s:
                s.attained += 1
        elif r.outcome == "error":
            s.errors += 1
            s.error_kinds[r.status or "?"] = s.error_kinds.get(r.status or "?", 0) + 1
        else:
            s.lost += 1
            if len(s.lost_examples) < 5:
                s.lost_examples.append(f"{r.status}: {r.error}")

    def abandon(self, cls: str) -> None:
        s = self.get(cls)
        s.sent += 1
        s.abandoned += 1


STATS = Collector()


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    STATS.time_scale = float(opts.qlm_time_scale)
    for item in filter(None, (x.strip() for x in opts.qlm_slo.split(","))):
        name, _, val = item.partition("=")
        STATS.slo_s[name.strip()] = float(val)


def fire(environment: Any, protocol: str, cls: str, r: Result) -> None:
    """Locust request events: TTFT (completed only) and end-to-end (a failure unless completed)."""
    fire_event = environment.events.request.fire
    if r.ok and r.ttft_s is not None:
        fire_event(
            request_type=protocol,
            name=f"{cls} ttft",
            response_time=r.ttft_s * 1e3,
            response_length=0,
            exception=None,
            context={},
        )
    fire_event(
        request_type=protocol,
        name=f"{cls} e2e",
        response_time=r.total_s * 1e3,
        response_length=r.tokens,
        exception=None if r.ok else RuntimeError(f"{r.outcome}: {r.status}: {r.error}"),
        context={},
    )


class QlmUser(User):
    """One simulated client: a sync package client on gevent; one request at a time."""

    abstract = True
    protocol = "grpc"
    slo_class = "interactive"
    # Think time is slept inside the task, not in Locust's wait_time: Locust kills a user it finds
    # waiting, and that kill can land after the user woke and sent its next request. Inside a task
    # the user is "running", so at the end Locust lets it finish (--stop-timeout) instead.
    think_s: tuple[float, float] = (0.0, 0.0)
    wait_time = constant(0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.timeout_s = float(o.qlm_timeout_s) if o else 300.0
        self.client: Any = (
            GrpcClient(o.grpc_host if o else "127.0.0.1:8001", self.timeout_s)
            if self.protocol == "grpc"
            else HttpClient((self.host or "http://127.0.0.1:8000"), self.timeout_s)
        )

    def on_stop(self) -> None:
        # A gRPC channel left open keeps Locust from exiting.
        self.client.close()

    def think(self) -> None:
        lo, hi = self.think_s
        if hi > 0:
            gevent.sleep(random.uniform(lo, hi))
        if self._state == LOCUST_STATE_STOPPING:
            raise StopUser()

    def send(self, req: Request, cls: str) -> Result | None:
        try:
            r = self.client.generate(req)
        except GreenletExit:
            # Locust killed the user mid-request (it waits --stop-timeout for running tasks, so
            # only a user stopped without one gets here): not the server's doing, not "lost".
            STATS.abandon(cls)
            raise
        STATS.record(cls, r)
        fire(self.environment, self.protocol, cls, r)
        return r

    def make_request(self, prompt: str, max_tokens: int | None = None) -> Request:
        o = self.environment.parsed_options
        return Request(
            prompt=prompt,
            model=o.qlm_model if o else "mistral-7b",
            slo_class=self.slo_class,
            max_tokens=int(max_tokens or (o.qlm_max_tokens if o else 32)),
            ignore_eos=True,  # fixed output lengths keep runs comparable
            router=o.qlm_router if o else "qlm",
        )


# --- the report ------------------------------------------------------------------------------
def report_dict() -> dict[str, Any]:
    classes = {}
    tot = {"sent": 0, "completed": 0, "errors": 0, "lost": 0, "abandoned": 0, "attained": 0}
    for name, s in sorted(STATS.classes.items()):
        classes[name] = {
            "slo_s": s.slo_s,
            "sent": s.sent,
            "completed": s.completed,
            "errors": s.errors,
            "error_kinds": s.error_kinds,
            "lost": s.lost,
            "abandoned": s.abandoned,
            "attained": s.attained,
            # Over every request sent but those Locust abandoned: an error or a loss is a miss.
            "attainment": s.attained / (s.sent - s.abandoned) if s.sent > s.abandoned else None,
            "ttft_p50_s": percentile(s.ttft_s, 50),
            "ttft_p99_s": percentile(s.ttft_s, 99),
            "e2e_p50_wall_s": percentile(s.e2e_s, 50),
            "e2e_p99_wall_s": percentile(s.e2e_s, 99),
            "lost_examples": s.lost_examples,
        }
        for k in tot:
            tot[k] += getattr(s, k)
    return {
        "time_scale": STATS.time_scale,
        "duration_wall_s": time.time() - STATS.started,
        "classes": classes,
        "totals": tot,
    }


def write_report(out_dir: Path) -> dict[str, Any]:
    rep = report_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attainment.json").write_text(json.dumps(rep, indent=2) + "\n")
    cols = ["class", "slo_s", "sent", "completed", "errors", "lost", "abandoned", "attained",
            "attainment", "ttft_p50_s", "ttft_p99_s", "e2e_p50_wall_s", "e2e_p99_wall_s"]  # fmt: skip
    lines = [",".join(cols)]
    for name, c in rep["classes"].items():
        row = [name] + ["" if c[k] is None else f"{c[k]:.6g}" for k in cols[1:]]
        lines.append(",".join(row))
    (out_dir / "attainment.csv").write_text("\n".join(lines) + "\n")
    _plot(rep, out_dir / "attainment.png")
    return rep


def _plot(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rep["classes"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    att = [rep["classes"][n]["attainment"] or 0.0 for n in names]
    ax1.bar(names, att, color="tab:blue")
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("SLO attainment (TTFT <= SLO, of sent)")
    ax1.set_title("attainment per class")
    for n in names:
        xs = sorted(STATS.classes[n].ttft_s)
        if xs:
            ax2.plot(xs, [(k + 1) / len(xs) for k in range(len(xs))], label=n)
    ax2.set_xscale("log")
    ax2.set_xlabel("TTFT (simulated s)")
    ax2.set_ylabel("CDF")
    ax2.set_title("TTFT per class")
    if names:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_report(rep: dict[str, Any]) -> None:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3g}"

    print("\nQLM SLO attainment (TTFT in simulated seconds; attainment over requests sent)")
    print(f"{'class':12s} {'slo_s':>7s} {'sent':>6s} {'done':>6s} {'errors':>6s} {'lost':>5s} "
          f"{'aband':>5s} {'attain':>7s} {'ttft_p50':>9s} {'ttft_p99':>9s}")  # fmt: skip
    for n, c in rep["classes"].items():
        print(f"{n:12s} {f(c['slo_s']):>7s} {c['sent']:6d} {c['completed']:6d} {c['errors']:6d} "
              f"{c['lost']:5d} {c['abandoned']:5d} {f(c['attainment']):>7s} "
              f"{f(c['ttft_p50_s']):>9s} {f(c['ttft_p99_s']):>9s}")  # fmt: skip
    t = rep["totals"]
    print(
        f"completed {t['completed']}, errors {t['errors']}, lost {t['lost']}, "
        f"abandoned {t['abandoned']} of {t['sent']} sent"
    )


@events.quitting.add_listener
def _on_quit(environment: Any, **_: Any) -> None:
    o = environment.parsed_options
    out_dir = Path(o.qlm_report_dir if o else os.environ.get("QLM_REPORT_DIR", "loadtest-report"))
    rep = write_report(out_dir)
    print_report(rep)
    print(f"report: {out_dir}/attainment.json, attainment.csv, attainment.png")
    # Explicit errors (a shed request) are answers; only a lost request fails the run.
    lost = rep["totals"]["lost"]
    environment.process_exit_code = 1 if lost > 0 else 0
    if lost:
        print(f"FAIL: {lost} request(s) lost (neither completed nor answered with an error)")
