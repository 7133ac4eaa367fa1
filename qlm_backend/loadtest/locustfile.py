"""Locust load test for QLM on Triton: SLO classes as weighted user classes, gRPC and HTTP.

    locust -f loadtest/locustfile.py --headless -u 12 -r 4 -t 30s --stop-timeout 60 \\
        --host http://127.0.0.1:8000 --grpc-host 127.0.0.1:8001 [GrpcInteractiveUser ...]

Six user classes: {gRPC streaming (tritonclient, gevent-compatible), HTTP generate_stream} x
{interactive, batch-1, batch-2}; name some on the command line to run only those. Interactive
users send short requests often; batch users send long ones back to back, so batch work piles up in
front of interactive work, the head-of-line blocking QLM is for. `make loadtest` runs this through
`qlm_backend.loadtest_runner`, which can also start a server. A report per SLO class (terminal,
attainment.json/.csv/.png under --qlm-report-dir) is written at the end; exit code 1 when any request
was lost.
"""

from __future__ import annotations

import random

from locust import task

from qlm_backend.loadtest.qlm_locust import QlmUser


class _Interactive(QlmUser):
    abstract = True
    slo_class = "interactive"
    weight = 4
    think_s = (0.2, 1.0)

    @task
    def chat(self) -> None:
        self.think()
        self.send(self.make_request(f"question {random.randrange(10**6)}"), self.slo_class)


class _Batch1(QlmUser):
    abstract = True
    slo_class = "batch-1"
    weight = 3
    think_s = (0.0, 0.2)

    @task
    def job(self) -> None:
        self.think()
        o = self.environment.parsed_options
        n = 4 * (o.qlm_max_tokens if o else 32)  # batch jobs generate more
        self.send(self.make_request(f"summarise {random.randrange(10**6)}", n), self.slo_class)


class _Batch2(_Batch1):
    abstract = True
    slo_class = "batch-2"
    weight = 3


class GrpcInteractiveUser(_Interactive):
    protocol = "grpc"


class GrpcBatch1User(_Batch1):
    protocol = "grpc"


class GrpcBatch2User(_Batch2):
    protocol = "grpc"


class HttpInteractiveUser(_Interactive):
    protocol = "http"


class HttpBatch1User(_Batch1):
    protocol = "http"


class HttpBatch2User(_Batch2):
    protocol = "http"
