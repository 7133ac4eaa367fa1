"""Real vLLM engine on CPU (see qlm_backend/vllm_engine/model.py); engine arguments in model.json."""

from qlm_backend.vllm_engine.model import VllmEngineModel as TritonPythonModel  # noqa: F401
