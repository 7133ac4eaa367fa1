"""QLM: the policy (policy.py) and everything only it uses: the global planner (planner.py) over
request groups, its assignment problem (problem.py), the assignment LP (lp.py, reduced by
lp_compact.py), the swap-aware EDF fallback (heuristic.py), the within-instance order
(ordering.py) and shedding under overload (shedding.py).

Shared pieces stay in core: the plan types (core/plan.py), the RWT estimator (core/estimator.py),
the LSO executor (core/lso.py), HiGHS process state (core/highs.py, also used by eval/bound.py)
and the helpers the baselines use as well (core/policies/common.py).
"""

from qlm_backend.core.policies.qlm.policy import QlmPolicy

__all__ = ["QlmPolicy"]
