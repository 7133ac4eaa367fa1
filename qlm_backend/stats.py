"""Percentiles, one convention for every bench, the evaluation and the load test.

Convention: linear interpolation between the closest ranks (numpy.percentile's default, method
"linear", Hyndman & Fan type 7). The values are sorted; the q-th percentile sits at fractional
rank h = (n - 1) * q / 100 (0-based) and is x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] -
x[floor(h)]). So p0 is the minimum, p100 the maximum, p50 of an even count the mean of the two
middle values, and a single value is every percentile of itself. No values: None (no figure, not
0 or NaN).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (q in [0, 100]) of `values` by linear interpolation between the closest
    ranks (numpy.percentile's default, "linear"); None when `values` is empty. A q outside
    [0, 100] (or NaN) raises ValueError."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q!r} is outside [0, 100]")
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    h = (len(xs) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    if h == lo or xs[hi] == xs[lo]:  # on a rank, or between equal values (also two infinities)
        return xs[lo]
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


__all__ = ["percentile"]
