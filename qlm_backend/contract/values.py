"""Reading one value out of a request, and the error that names the field it came from.

Clients get a message that names the field at fault (vllm_backend's habit, kept), so every reader
here takes the field's name.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ContractError(ValueError):
    """A client error in one field of the request."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def scalar(arr: np.ndarray | None, name: str) -> Any:
    """The one element of an input tensor (None when the request left the input out)."""
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise ContractError(name, f"expected exactly one element, got shape {list(np.shape(arr))}")
    return flat[0]


def decode_text(value: Any, name: str) -> str:
    """A BYTES element (or a str from request parameters) as text; invalid UTF-8 is the client's."""
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ContractError(
                name, f"is not valid UTF-8 ({e.reason} at byte {e.start})"
            ) from None
    if isinstance(value, str):
        return value
    raise ContractError(name, f"must be a string, got {type(value).__name__}")
