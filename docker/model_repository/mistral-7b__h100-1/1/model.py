"""Our vLLM engine (see qlm_backend/vllm_engine/model.py) on GPU; engine arguments in model.json."""

from qlm_backend.vllm_engine.model import VllmEngineModel as TritonPythonModel  # noqa: F401
