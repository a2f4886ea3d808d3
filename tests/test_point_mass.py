import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs_mjx import parity
from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "point_mass"
TASK = "point_mass-easy"
N_DRAWS = 2000
# Measured: walls obs 9.5e-7 (soft joint-limit constraint solved in float32), reward 0 (reward ~0 there);
# near the target obs 4.2e-9, reward 2.7e-7.
WALL_OBS_TOL, WALL_REWARD_TOL = 3e-6, 1e-7
TARGET_OBS_TOL, TARGET_REWARD_TOL = 1e-8, 6e-7


def test_one_step_parity():
    # No contacts; Euler in both; joint limits only near the walls: float32 rounding (measured 1.25e-8 obs).
    # The random starts are far from the target, so rewards are ~1e-100 in both: test_reward_near_target
    # measures the reward.
    envtest.assert_one_step_parity(DOMAIN, obs_tol=3e-8, reward_tol=1e-7)


def test_trajectory_divergence():
    # Measured mean ~1e-279: random actions keep these lanes far from the target (rewards ~0 in both).
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=1e-7)


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN)


@functools.lru_cache(maxsize=None)
def _initial_state(n: int, seed: int = 1):
    """keys, qpos, qvel of `n` fresh episodes from the domain's `initialize` (cheap to compile: no forward pass)."""
    keys, data, _ = envtest.initial_draws(TASK, n, seed)
    return keys, np.asarray(data.qpos), np.asarray(data.qvel)


def test_initial_state_distribution():
    _, qpos, qvel = _initial_state(N_DRAWS)
    dm_env = parity.load_dm_control(TASK, seed=0)
    dm_qpos = []
    for _ in range(N_DRAWS):
        with dm_env.physics.reset_context():
            dm_env.task.initialize_episode(dm_env.physics)
        dm_qpos.append(dm_env.physics.data.qpos.copy())
        assert np.all(dm_env.physics.data.qvel == 0)
    dm_qpos = np.asarray(dm_qpos)
    assert np.all(qvel == 0)
    # Both slides uniform in their range [-.29, .29], independently.
    for j in range(2):
        # Two-sample KS statistic; 0.062 is the 0.1% critical value for 2000 + 2000 draws.
        assert envtest.ks_statistic(qpos[:, j], dm_qpos[:, j]) < 0.062, j
    assert abs(np.corrcoef(qpos.T)[0, 1]) < 0.08
    assert qpos.min() >= -0.29 and qpos.max() <= 0.29


def _rollout_parity(picked, actions_for, steps: int):
    """Reset the lanes drawn with keys `picked` (pairs), copy them into dm_control, take `steps` control
    steps with `actions_for(qpos0, rng)` in both; returns max obs err, max reward err, max |qpos| reached and
    the dm_control rewards. Reuses the parity module's compiled reset and step (batch of 2)."""
    keys, qpos, _ = _initial_state(N_DRAWS)
    env, reset, step = parity._batched_fns(DOMAIN)  # pylint: disable=protected-access
    params = jax.tree.map(lambda x: jnp.stack([x, x]), env.params)
    rng = np.random.default_rng(0)
    obs_err = reward_err = max_pos = 0.0
    rewards = []
    for pair in np.reshape(picked, (-1, 2)):
        states = reset(keys[pair], params)
        dm_envs = []
        for lane in range(2):
            dm_env = parity.load_dm_control(TASK)
            dm_env.reset()
            parity.copy_state_into(dm_env, env, states, lane)
            dm_envs.append(dm_env)
        for _ in range(steps):
            actions = np.clip(actions_for(qpos[pair], rng), -1, 1).astype(np.float32)
            states = step(states, jnp.asarray(actions))
            for lane, dm_env in enumerate(dm_envs):
                ts = dm_env.step(env.ctrl_from_action(actions[lane]))
                obs_dm = parity.flat_dm_observation(ts.observation)
                obs_err = max(obs_err, float(np.max(np.abs(np.asarray(states.obs[lane]) - obs_dm))))
                reward_err = max(reward_err, abs(float(states.reward[lane]) - ts.reward))
                max_pos = max(max_pos, float(np.max(np.abs(dm_env.physics.data.qpos))))
                rewards.append(ts.reward)
    return obs_err, reward_err, max_pos, np.asarray(rewards)


def test_walls():
    """Start near the joint limits (the walls) and push into them for 30 steps: the limit constraints must act
    as in dm_control."""
    _, qpos, _ = _initial_state(N_DRAWS)
    picked = np.flatnonzero(np.all(np.abs(qpos) > 0.26, axis=1))[:4]
    assert len(picked) == 4
    obs_err, reward_err, max_pos, _ = _rollout_parity(
        picked, lambda q0, rng: np.sign(q0) * rng.uniform(0.5, 1.0, q0.shape), 30)
    assert max_pos > 0.29, "the walls were not reached"
    assert obs_err < WALL_OBS_TOL, obs_err
    assert reward_err < WALL_REWARD_TOL, reward_err


def test_reward_near_target():
    """Start within 3 cm of the target (where the reward is not ~0) and take 30 random-action steps."""
    _, qpos, _ = _initial_state(N_DRAWS)
    picked = np.flatnonzero(np.all(np.abs(qpos) < 0.03, axis=1))[:4]
    assert len(picked) == 4
    obs_err, reward_err, _, rewards = _rollout_parity(picked, lambda q0, rng: rng.uniform(-1, 1, q0.shape), 30)
    assert np.mean(rewards > 0.1) > 0.2, "the target region was not exercised"
    assert obs_err < TARGET_OBS_TOL, obs_err
    assert reward_err < TARGET_REWARD_TOL, reward_err
