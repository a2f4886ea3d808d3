import pytest

from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "cartpole"


def test_one_step_parity():
    # No contacts, RK4 in both: float32 rounding only.
    envtest.assert_one_step_parity(DOMAIN, obs_tol=1e-5, reward_tol=1e-5)


def test_trajectory_divergence():
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=1e-4)


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN)
