import functools

import numpy as np
import pytest

from envs_mjx import parity
from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "acrobot"
TASK = "acrobot-swingup"
N_DRAWS = 2000


def test_one_step_parity():
    # No constraints, RK4 in both: float32 rounding only (measured 1.7e-7 obs, 2.4e-8 reward over 4 lanes).
    envtest.assert_one_step_parity(DOMAIN, obs_tol=5e-7, reward_tol=1e-7)


def test_trajectory_divergence():
    # Measured mean 1.4e-10 (2 lanes; 6e-9 with 4 lanes) over 200 random-action steps.
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=2e-8)


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN)


@functools.lru_cache(maxsize=None)
def _initial_state(n: int, seed: int = 1):
    """qpos, qvel of `n` fresh episodes from the domain's `initialize` (cheap to compile: no forward pass)."""
    _, data, _ = envtest.initial_draws(TASK, n, seed)
    return np.asarray(data.qpos), np.asarray(data.qvel)


def test_initial_state_distribution():
    qpos, qvel = _initial_state(N_DRAWS)
    dm_env = parity.load_dm_control(TASK, seed=0)
    dm_qpos = []
    for _ in range(N_DRAWS):
        with dm_env.physics.reset_context():
            dm_env.task.initialize_episode(dm_env.physics)
        dm_qpos.append(dm_env.physics.data.qpos.copy())
        assert np.all(dm_env.physics.data.qvel == 0)
    dm_qpos = np.asarray(dm_qpos)
    assert np.all(qvel == 0)
    # Two-sample KS statistic per joint; 0.062 is the 0.1% critical value for 2000 + 2000 draws.
    for j in range(2):
        assert envtest.ks_statistic(qpos[:, j], dm_qpos[:, j]) < 0.062, j
    # The two joints are drawn independently in both.
    assert abs(np.corrcoef(qpos.T)[0, 1]) < 0.08
    assert qpos.min() >= -np.pi and qpos.max() <= np.pi
