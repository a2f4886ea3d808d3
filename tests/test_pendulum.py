import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs_mjx import parity
from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "pendulum"
TASK = "pendulum-swingup"
N_DRAWS = 2000


def test_one_step_parity():
    # No contacts, Euler with implicit damping in both: float32 rounding only (measured 2e-7 obs, 0 reward).
    envtest.assert_one_step_parity(DOMAIN, obs_tol=5e-7, reward_tol=1e-6)


def test_trajectory_divergence():
    # Random actions never bring the pole into the 8-degree reward band, so both rewards are 0 here;
    # test_reward_near_upright covers the rewarding region.
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=1e-6)


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN)


@functools.lru_cache(maxsize=None)
def _initial_qpos(n: int, seed: int = 1):
    """qpos of `n` fresh episodes from the domain's `initialize` (cheap to compile: no forward pass)."""
    keys, data, _ = envtest.initial_draws(TASK, n, seed)
    return keys, np.asarray(data.qpos), np.asarray(data.qvel)


def test_initial_state_distribution():
    _, qpos, qvel = _initial_qpos(N_DRAWS)
    dm_env = parity.load_dm_control(TASK, seed=0)
    dm_qpos = []
    for _ in range(N_DRAWS):
        with dm_env.physics.reset_context():
            dm_env.task.initialize_episode(dm_env.physics)
        dm_qpos.append(dm_env.physics.data.qpos.copy())
        assert np.all(dm_env.physics.data.qvel == 0)
    assert np.all(qvel == 0)
    # Two-sample KS statistic; 0.062 is the 0.1% critical value for 2000 + 2000 draws.
    assert envtest.ks_statistic(qpos[:, 0], np.asarray(dm_qpos)[:, 0]) < 0.062
    assert qpos.min() >= -np.pi and qpos.max() <= np.pi


def test_reward_near_upright():
    """Start both simulators within 0.1 rad of upright (where the reward is non-zero) and compare rewards
    along 25 control steps of small random actions. Reuses the parity module's compiled reset and step."""
    keys, qpos, _ = _initial_qpos(N_DRAWS)
    picked = np.flatnonzero(np.abs(qpos[:, 0]) < 0.1)[:4]
    assert len(picked) == 4
    env, reset, step = parity._batched_fns(DOMAIN)  # pylint: disable=protected-access
    params = jax.tree.map(lambda x: jnp.stack([x, x]), env.params)
    rng = np.random.default_rng(0)
    n_rewarded = 0
    for pair in (picked[:2], picked[2:]):
        states = reset(keys[pair], params)
        dm_envs = []
        for lane in range(2):
            dm_env = parity.load_dm_control(TASK)
            dm_env.reset()
            parity.copy_state_into(dm_env, env, states, lane)
            dm_envs.append(dm_env)
        for _ in range(25):
            actions = rng.uniform(-0.3, 0.3, (2, 1)).astype(np.float32)
            states = step(states, jnp.asarray(actions))
            for lane, dm_env in enumerate(dm_envs):
                r_dm = dm_env.step(env.ctrl_from_action(actions[lane])).reward
                assert abs(float(states.reward[lane]) - r_dm) < 1e-6  # measured 0 (the reward is 0 or 1)
                n_rewarded += r_dm > 0
    assert n_rewarded >= 20, n_rewarded
