"""The input and output sections of a Triton model config, rendered from a table.

Triton checks every request against these sections, so they are written only from the tables the
models decode with (config.pbtxt files and the JSON config a load may carry alike).
"""

from __future__ import annotations

from typing import Any

from qlm_backend.contract.tensors import TensorSpec


def _dims(spec: TensorSpec) -> str:
    return ", ".join(str(d) for d in spec.dims)


def io_pbtxt(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> str:
    """The `input [...]` and `output [...]` blocks of a config.pbtxt."""
    ins = ",\n".join(
        f'  {{ name: "{s.name}" data_type: {s.config_type} dims: [ {_dims(s)} ]'
        f"{' optional: true' if s.optional else ''} }}"
        for s in inputs
    )
    outs = ",\n".join(
        f'  {{ name: "{s.name}" data_type: {s.config_type} dims: [ {_dims(s)} ] }}' for s in outputs
    )
    return f"input [\n{ins}\n]\noutput [\n{outs}\n]\n"


def io_config(
    inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]
) -> dict[str, list[dict[str, Any]]]:
    """The same sections as model config JSON (a `load_model(config=...)` override)."""
    return {
        "input": [
            {
                "name": s.name,
                "data_type": s.config_type,
                "dims": list(s.dims),
                **({"optional": True} if s.optional else {}),
            }
            for s in inputs
        ],
        "output": [
            {"name": s.name, "data_type": s.config_type, "dims": list(s.dims)} for s in outputs
        ],
    }
