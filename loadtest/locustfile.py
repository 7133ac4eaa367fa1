"""Locust entry point from a checkout: `locust -f loadtest/locustfile.py ...`. The load test itself ships
inside the package (qlm_backend/loadtest/locustfile.py), which `qlm-loadtest` runs when installed."""

from qlm_backend.loadtest.locustfile import *  # noqa: F403 - Locust finds the user classes here
