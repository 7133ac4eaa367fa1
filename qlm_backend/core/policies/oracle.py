"""Oracle: QLM's planner given the true output lengths (Request.true_output_tokens). A reference
bound for the evaluation, not a product policy: no real system knows output lengths."""

from __future__ import annotations

from typing import Any

from qlm_backend.core.policies.qlm import QlmPolicy


class OraclePolicy(QlmPolicy):
    name = "oracle"

    def __init__(self, **kwargs: Any) -> None:
        kwargs["oracle"] = True
        super().__init__(**kwargs)
        self.planner.policy_name = self.name


__all__ = ["OraclePolicy"]
