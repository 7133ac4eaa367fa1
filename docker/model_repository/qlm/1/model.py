"""The QLM router (see qlm_backend/triton/router_model.py); its settings are in router.json."""

from qlm_backend.triton.router_model import RouterModel as TritonPythonModel  # noqa: F401
