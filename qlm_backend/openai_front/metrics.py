"""qlm-openai's own metrics, with prometheus-client on `/metrics` (Prometheus scrapes it beside
Triton's :8002): requests by model, SLO class and HTTP status (429 = shed), time to first token as
its clients see it. A registry per app, so that several apps in one
process (the tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

# The shipped classes' TTFT SLOs (20, 60, 3600 s) are bucket bounds, as in the router's histograms.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 120, 300, 600, 1800, 3600)
UNKNOWN = "unknown"  # label of a request refused before its model or class was read


class FrontMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "qlm_openai_requests",
            "Generate requests answered, by model, SLO class and HTTP status (429: shed; for a "
            "stream, the status it began with).",
            ["model", "slo_class", "code"],
            registry=self.registry,
        )
        self._ttft = Histogram(
            "qlm_openai_ttft_seconds",
            "Seconds from a request's arrival at qlm-openai to its first token from the router.",
            ["model", "slo_class"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )

    def answered(self, model: str | None, slo_class: str | None, code: int) -> None:
        self._requests.labels(model or UNKNOWN, slo_class or UNKNOWN, str(code)).inc()

    def first_token(self, model: str, slo_class: str, seconds: float) -> None:
        self._ttft.labels(model, slo_class).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["FrontMetrics"]
