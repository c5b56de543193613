import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mugato_ray.metrics import bootstrap_ci, iqm, normalized_score


def test_normalized_score_anchors():
    assert normalized_score(500.0, expert=500.0, random=20.0) == pytest.approx(1.0)
    assert normalized_score(20.0, expert=500.0, random=20.0) == pytest.approx(0.0)
    assert normalized_score(260.0, expert=500.0, random=20.0) == pytest.approx(0.5)
    # Negative-return tasks (Pendulum, Acrobot): the expert is the less negative one.
    assert normalized_score(-150.0, expert=-150.0, random=-1200.0) == pytest.approx(1.0)
    assert normalized_score(1.0, expert=None, random=0.0) is None
    assert normalized_score(1.0, expert=2.0, random=2.0) is None


def test_iqm_matches_definition():
    assert iqm([1, 2, 3, 4]) == pytest.approx(2.5)  # middle two
    assert iqm([0, 1, 2, 3, 4, 5, 6, 100]) == pytest.approx(np.mean([2, 3, 4, 5]))  # outliers ignored
    assert iqm([5.0]) == 5.0
    assert iqm([]) is None
    assert iqm([None, 1.0]) == 1.0
    # Size not a multiple of 4: scipy's trim_mean-like fractional weighting.
    x = [1, 2, 3, 4, 5]  # [1.25, 3.75) -> 0.75*2 + 3 + 0.75*4 over 2.5
    assert iqm(x) == pytest.approx((0.75 * 2 + 3 + 0.75 * 4) / 2.5)


@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=50))
def test_bootstrap_ci_contains_mean_and_is_ordered(values):
    lo, hi = bootstrap_ci(values, samples=200, seed=1)
    m = float(np.mean(values))
    assert lo <= hi
    assert lo - 1e-6 <= m <= hi + 1e-6 or np.ptp(values) == 0


def test_bootstrap_ci_width_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small = rng.normal(size=10)
    big = rng.normal(size=1000)
    w_small = np.subtract(*bootstrap_ci(small)[::-1])
    w_big = np.subtract(*bootstrap_ci(big)[::-1])
    assert w_big < w_small / 3
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])
