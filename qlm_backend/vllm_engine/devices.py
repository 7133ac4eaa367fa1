"""Which GPU(s) an engine model instance uses: Triton's instance group, turned into CUDA_VISIBLE_DEVICES.

Triton's Python backend tells a model instance its kind and device (`args["model_instance_kind"]`:
"GPU", "CPU" or "MODEL"; `args["model_instance_device_id"]`) but sets no CUDA_VISIBLE_DEVICES
(python_backend src/stub_launcher.cc builds those initialize args; nothing in its src/ sets the
variable, read at f9088ff): a KIND_GPU instance with `gpus: [k]` would still see every GPU, and vLLM
takes the first. Triton's vllm_backend (src/model.py, `_validate_device_config`, read at 8de0c14)
therefore sets CUDA_VISIBLE_DEVICES to the device id for KIND_GPU instances (device id >= 0) and
refuses KIND_GPU for an engine over several GPUs (tensor_parallel_size x pipeline_parallel_size > 1:
those must be KIND_MODEL and use the GPUs the server sees). Our engine
model does the same, before vLLM (and torch's CUDA) starts, with one difference: where the server
itself runs under CUDA_VISIBLE_DEVICES, Triton's device id k is the k-th of those devices (CUDA
numbers the visible ones from 0), so the pin is that entry, not k.

Pure Python, unit-tested on CPU machines.
"""

from __future__ import annotations

ENV = "CUDA_VISIBLE_DEVICES"


def cuda_visible_devices(kind: str, device_id: str | int, current: str | None) -> str | None:
    """The CUDA_VISIBLE_DEVICES a model instance must run with, or None to leave it as it is.

    `kind`, `device_id`: Triton's `model_instance_kind` and `model_instance_device_id`; `current`:
    the server's CUDA_VISIBLE_DEVICES (None or "" when unset)."""
    if kind != "GPU":
        return None  # KIND_CPU, or KIND_MODEL: the engine uses what the server sees
    try:
        k = int(device_id)
    except (TypeError, ValueError):
        raise ValueError(
            f"model_instance_device_id: expected a GPU index, got {device_id!r}"
        ) from None
    if k < 0:
        return None  # as vllm_backend: no device assigned, nothing to pin
    if not current:
        return str(k)
    visible = [d.strip() for d in current.split(",") if d.strip()]
    if k >= len(visible):
        raise ValueError(
            f"KIND_GPU device {k}: the server sees only {len(visible)} GPU(s) ({ENV}={current!r})"
        )
    return visible[k]


def check_instance_kind(kind: str, world_size: int) -> None:
    """Refuse KIND_GPU for an engine over several GPUs, as vllm_backend does: Triton's KIND_GPU
    gives an instance one device, so pinning it would leave the engine's other workers no GPU."""
    if kind == "GPU" and world_size > 1:
        raise ValueError(
            f"KIND_GPU is for single-GPU engines; this one spans {world_size} GPUs "
            "(tensor_parallel_size x pipeline_parallel_size): use instance_group "
            "[{ kind: KIND_MODEL }] in config.pbtxt and give its server only those GPUs"
        )
