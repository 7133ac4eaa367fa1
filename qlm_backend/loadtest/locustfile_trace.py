"""Locust trace replay for QLM: the trace's arrivals (time-scaled), model and class per request.

    locust -f loadtest/locustfile_trace.py --headless --host http://127.0.0.1:8000 \\
        --grpc-host 127.0.0.1:8001 --qlm-trace qlm_backend/data/traces/AzureLLMInferenceTrace_conv.csv \\
        --qlm-trace-speedup 4 --qlm-trace-max-requests 200 --stop-timeout 60

The trace is read by the evaluation's loader (Azure 2023 or generic CSV) and every request gets its
model and SLO class as the evaluation scenarios assign them (seeded, `--qlm-seed`), so a load test
and a simulation can replay the same workload. `TraceShape` keeps a pool of users alive until every
request of the trace was sent and answered; each user takes the next request and sends it at its
arrival time divided by `--qlm-trace-speedup`. A request whose time came while every user was busy
is sent late, and counted (`late` in the terminal line): raise `--qlm-trace-users` then.
"""

from __future__ import annotations  # noqa: I001 - qlm_locust first: it sets gRPC up for gevent

import time
from typing import Any

import gevent
from locust import LoadTestShape, constant, events, task
from qlm_backend.loadtest.qlm_locust import STATS, QlmUser

from qlm_backend.client import Request
from qlm_backend.eval.scenario import WorkloadRequest, build_workload, parse_scenario
from qlm_backend.eval.traces import load_trace, window

POOL_USERS = 64
# Classes as in the evaluation's scenario WA: interactive and batch mixed, batch arriving in runs.
CLASS_SHARES = {"interactive": 0.4, "batch-1": 0.3, "batch-2": 0.3}


class Schedule:
    def __init__(self) -> None:
        self.items: list[WorkloadRequest] = []
        self.next = 0
        self.in_flight = 0
        self.t0: float | None = None
        self.speedup = 1.0
        self.late = 0


SCHEDULE = Schedule()


def build_schedule(
    trace_path: str, model: str, max_requests: int, max_tokens: int, seed: int
) -> list[WorkloadRequest]:
    sc = parse_scenario(
        {
            "name": "loadtest",
            "fleet": {
                "instances": [
                    {
                        "instance_id": "any",
                        "gpu": "A100-80G",
                        "models_allowed": [model],
                        "initial_model": model,
                    }
                ]
            },
            "models": {model: 1.0},
            "classes": CLASS_SHARES,
            "class_run_mean": 4,
            "max_tokens": max_tokens,
        },
        "loadtest",
    )
    trace = window(load_trace(trace_path), max_requests=max_requests, duration_s=None)
    return build_workload(sc, trace, seed)


@events.init.add_listener
def _load(environment: Any, **_: Any) -> None:
    o = environment.parsed_options
    if o is None or not o.qlm_trace:
        raise SystemExit("locustfile_trace.py needs --qlm-trace FILE")
    SCHEDULE.items = build_schedule(
        o.qlm_trace, o.qlm_model, o.qlm_trace_max_requests, o.qlm_max_tokens, o.qlm_seed
    )
    SCHEDULE.speedup = float(o.qlm_trace_speedup)


class TraceUser(QlmUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.protocol = o.qlm_trace_protocol if o else "grpc"
        super().on_start()

    @task
    def replay(self) -> None:
        s = SCHEDULE
        if s.next >= len(s.items):
            gevent.sleep(0.1)  # the trace is done; TraceShape ends the run
            return
        w = s.items[s.next]
        s.next += 1
        if s.t0 is None:
            s.t0 = time.monotonic()
        delay = s.t0 + w.arrival_s / s.speedup - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        elif delay < -0.05:
            s.late += 1
        o = self.environment.parsed_options
        req = Request(
            prompt="x" * (4 * w.prompt_tokens - 1),  # the engines count 4 bytes per token
            model=w.model,
            slo_class=w.slo_class,
            max_tokens=w.output_tokens,
            ignore_eos=True,  # the trace's output length, exactly
            router=o.qlm_router if o else "qlm",
        )
        s.in_flight += 1
        try:
            self.send(req, w.slo_class)
        finally:
            s.in_flight -= 1


class TraceShape(LoadTestShape):
    """A pool of users while the trace lasts; stop once every request was sent and answered."""

    def tick(self) -> tuple[int, float] | None:
        s = SCHEDULE
        if s.items and s.next >= len(s.items) and s.in_flight == 0:
            print(f"trace done: {len(s.items)} requests, {s.late} sent late")
            return None
        return (POOL_USERS, POOL_USERS)


__all__ = ["STATS", "TraceShape", "TraceUser"]
