"""Locust load tests for QLM on Triton, shipped inside the package (`qlm-loadtest` runs them):
locustfile.py (SLO classes as weighted users), locustfile_trace.py (a trace replayed at its
arrival times), qlm_locust.py (the gevent-compatible users both build on). Importing qlm_locust
sets up gRPC for gevent, so nothing here is imported by the rest of the package."""
