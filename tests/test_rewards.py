import numpy as np
import pytest
from dm_control.utils import rewards as dm_rewards

from envs_mjx import rewards

X = np.linspace(-3.0, 3.0, 121)


@pytest.mark.parametrize("sigmoid", rewards.SIGMOIDS)
@pytest.mark.parametrize("value_at_margin", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("bounds,margin", [((0.0, 0.0), 1.0), ((-0.5, 1.0), 0.7), ((1.0, np.inf), 2.0),
                                           ((-np.inf, 0.2), 0.3), ((-0.25, 0.25), 0.0)])
def test_tolerance_matches_dm_control(sigmoid, value_at_margin, bounds, margin):
    kwargs = dict(bounds=bounds, margin=margin, sigmoid=sigmoid, value_at_margin=value_at_margin)
    try:
        expected = dm_rewards.tolerance(X, **kwargs)
    except ValueError as e:
        with pytest.raises(ValueError, match=str(e)[:20]):
            rewards.tolerance(X, **kwargs)
        return
    np.testing.assert_allclose(np.asarray(rewards.tolerance(X, **kwargs)), expected, atol=2e-6)


def test_tolerance_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Lower bound"):
        rewards.tolerance(0.0, bounds=(1.0, 0.0))
    with pytest.raises(ValueError, match="non-negative"):
        rewards.tolerance(0.0, margin=-1.0)
    with pytest.raises(ValueError, match="Unknown sigmoid"):
        rewards.tolerance(0.0, margin=1.0, sigmoid="sigmoid")
