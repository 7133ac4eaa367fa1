"""Simulated vLLM engine (see qlm_backend/triton/sim_engine.py); its settings are in engine.json."""

from qlm_backend.triton.sim_engine import SimEngineModel as TritonPythonModel  # noqa: F401
