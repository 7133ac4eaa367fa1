"""Policy registry: one module per policy, looked up by name."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, get_args

from qlm_backend.core.policies.base import Policy, PolicyName

# name -> "module:factory"; imported lazily so a broken baseline cannot break the others' import.
_FACTORIES: dict[str, str] = {
    "qlm": "qlm_backend.core.policies.qlm:QlmPolicy",
    "fcfs": "qlm_backend.core.policies.fcfs:FcfsPolicy",
    "edf": "qlm_backend.core.policies.edf:EdfPolicy",
    "priority": "qlm_backend.core.policies.priority:PriorityPolicy",
    "shepherd": "qlm_backend.core.policies.shepherd:ShepherdPolicy",
    "flow-control": "qlm_backend.core.policies.flow_control:FlowControlPolicy",
    "qlm-true-lengths": "qlm_backend.core.policies.qlm_true_lengths:QlmTrueLengthsPolicy",
}
assert set(_FACTORIES) == set(get_args(PolicyName))


def _load(name: str) -> Callable[..., Policy]:
    mod, _, attr = _FACTORIES[name].partition(":")
    return getattr(importlib.import_module(mod), attr)


class _Registry(dict[str, Callable[..., Policy]]):
    def __missing__(self, key: str) -> Callable[..., Policy]:
        if key not in _FACTORIES:
            raise KeyError(key)
        f = _load(key)
        self[key] = f
        return f

    def __contains__(self, key: object) -> bool:
        return key in _FACTORIES

    def names(self) -> list[str]:
        return sorted(_FACTORIES)


POLICIES: _Registry = _Registry()
POLICY_NAMES: tuple[str, ...] = tuple(sorted(_FACTORIES))


def validate_policy_name(name: str) -> PolicyName:
    if name not in _FACTORIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    return name  # type: ignore[return-value]


def make_policy(name: str, **kwargs: Any) -> Policy:
    """Build a policy by name; an unknown name raises ValueError listing the known ones."""
    return POLICIES[validate_policy_name(name)](**kwargs)


__all__ = ["POLICIES", "POLICY_NAMES", "make_policy", "validate_policy_name"]
