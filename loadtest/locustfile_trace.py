"""Locust entry point from a checkout: `locust -f loadtest/locustfile_trace.py ...`. The load test itself ships
inside the package (qlm_backend/loadtest/locustfile_trace.py), which `qlm-loadtest` runs when installed."""

from qlm_backend.loadtest.locustfile_trace import *  # noqa: F403 - Locust finds the user classes here
