"""qlm_backend.stats.percentile: linear interpolation between the closest ranks (numpy's default),
None for no values, q in [0, 100]."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qlm_backend.stats import percentile


def test_empty_input_has_no_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile(iter(()), 99) is None  # any iterable, a generator too


def test_a_single_value_is_every_percentile_of_itself() -> None:
    for q in (0, 1, 50, 99, 100):
        assert percentile([7.5], q) == 7.5


def test_p50_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    # sorted [1, 2, 4, 10]: rank h = 3 * 0.5 = 1.5, halfway between 2 and 4
    assert percentile([10, 1, 4, 2], 50) == 3.0


def test_interpolates_between_closest_ranks() -> None:
    # sorted [0, 10, 20, 30, 40]: p90 at rank 4 * 0.9 = 3.6 -> 30 + 0.6 * (40 - 30) = 36
    assert percentile([40, 0, 30, 10, 20], 90) == pytest.approx(36.0)
    # p0 and p100 are the minimum and the maximum
    assert percentile([3, -1, 8], 0) == -1.0
    assert percentile([3, -1, 8], 100) == 8.0


def test_p99_of_100_values_matches_numpy() -> None:
    # 1..100: rank 99 * 0.99 = 98.01 -> 99 + 0.01 * (100 - 99) = 99.01, numpy's "linear" too
    xs = [float(v) for v in range(100, 0, -1)]
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile(xs, 99) == pytest.approx(float(np.percentile(xs, 99)))


def test_matches_numpy_linear_on_random_values() -> None:
    rng = np.random.default_rng(15)
    for n in (2, 3, 17, 1000):
        xs = rng.lognormal(0.0, 2.0, n).tolist()
        for q in (0, 5, 25, 50, 75, 90, 99, 99.9, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_equal_infinite_values_stay_infinite() -> None:
    assert percentile([math.inf, math.inf], 50) == math.inf


@pytest.mark.parametrize("q", [-0.1, -1.0, 100.5, math.nan])
def test_q_outside_0_to_100_raises_naming_q(q: float) -> None:
    with pytest.raises(ValueError, match=r"q="):
        percentile([1.0, 2.0], q)


def test_q_is_checked_even_without_values() -> None:
    # q is a percent (99 for p99): a wrong q fails at once, not only once values arrive
    with pytest.raises(ValueError, match=r"q=101"):
        percentile([], 101)
