"""Settings of a Triton model of ours: a JSON file next to model.py, overridden by config.pbtxt
parameters. Shared by the engine and router configs, so both read, coerce and report errors alike."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# Parameters the Python backend itself reads; never settings of ours.
BACKEND_PARAMETERS = frozenset({"EXECUTION_ENV_PATH", "REPORT_CUSTOM_METRICS"})


def read_settings(
    model_config: Mapping[str, Any],
    version_dir: Path | None,
    filename: str,
    error: Callable[[str, str], Exception],
) -> dict[str, Any]:
    """The raw settings: `<version_dir>/<filename>` (JSON object) updated by config.pbtxt parameters."""
    raw: dict[str, Any] = {}
    path = version_dir / filename if version_dir is not None else None
    if path is not None and path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise error(filename, f"is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise error(filename, "must hold a JSON object")
        raw.update(data)
    for key, val in (model_config.get("parameters") or {}).items():
        if key in BACKEND_PARAMETERS:
            continue
        raw[key] = val.get("string_value", "") if isinstance(val, dict) else val
    return raw


def coerce(key: str, value: Any, default: Any, error: Callable[[str, str], Exception]) -> Any:
    """`value` as the type of `default`. config.pbtxt parameters are always strings; JSON is typed."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ValueError
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, Mapping):
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise error(key, f"must be {type(default).__name__}, got {value!r}") from None
