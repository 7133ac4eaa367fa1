"""qlm-true-lengths: QLM's planner given the true output lengths (Request.true_output_tokens), for
the evaluation only: no real system knows a request's output length before it runs. It shows
what QLM loses to its learnt length distributions; it is not an upper bound on attainment (QLM's
planner is a heuristic, and wc at load 2 has it below qlm)."""

from __future__ import annotations

from typing import Any

from qlm_backend.core.policies.qlm import QlmPolicy


class QlmTrueLengthsPolicy(QlmPolicy):
    name = "qlm-true-lengths"

    def __init__(self, **kwargs: Any) -> None:
        kwargs["oracle"] = True  # the planner's and estimator's switch for the true lengths
        super().__init__(**kwargs)
        self.planner.policy_name = self.name


__all__ = ["QlmTrueLengthsPolicy"]
