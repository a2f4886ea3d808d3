import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs_mjx import parity, swimmer
from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "swimmer"
TASK = "swimmer-swimmer6"
OBS_TOL, REWARD_TOL = 2e-5, 3e-7  # measured 5.7e-6, 7.1e-8
DIVERGENCE_TOL = 1e-5  # measured 2.3e-6 (returns 100.9209 vs 100.9204)


def test_one_step_parity():
    envtest.assert_one_step_parity(DOMAIN, obs_tol=OBS_TOL, reward_tol=REWARD_TOL)


def test_trajectory_divergence():
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=DIVERGENCE_TOL)


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN)


def _batch():
    """The batch-2 reset and step that the parity checks compiled (no new compilation)."""
    env, reset, step = parity._batched_fns(DOMAIN)  # pylint: disable=protected-access
    return env, reset, step, jax.tree.map(lambda x: jnp.stack([x, x]), env.params)


def test_initial_state_distribution():
    """Heading uniform on the circle, joint angles uniform in their +-60 degrees, at rest at the origin; the
    target in the +-.3 box with probability .2, else in the +-2 box."""
    env, reset, _, params = _batch()
    batches = [reset(jax.random.split(jax.random.key(i), 2), params) for i in range(200)]  # 400 draws
    qpos = np.concatenate([np.asarray(s.data.qpos) for s in batches])
    targets = np.concatenate([np.asarray(s.task_state["target"]) for s in batches])
    assert all(np.all(np.asarray(s.data.qvel) == 0) for s in batches)
    assert np.all(qpos[:, :2] == 0) and np.all(np.abs(qpos[:, 2]) <= np.pi)
    assert np.all(np.abs(qpos[:, 3:]) <= np.deg2rad(360 / swimmer.N_BODIES) + 1e-6)
    np.testing.assert_allclose(targets[:, 2], 0.05)
    dm_env = parity.load_dm_control(TASK, seed=1)
    dm_qpos, dm_targets = [], []
    for _ in range(2000):
        dm_env.reset()
        dm_qpos.append(dm_env.physics.data.qpos.copy())
        dm_targets.append(dm_env.physics.named.model.geom_pos["target"].copy())
    dm_qpos, dm_targets = np.asarray(dm_qpos), np.asarray(dm_targets)
    envtest.assert_same_mean_and_spread(qpos[:, 2], dm_qpos[:, 2], "heading")
    envtest.assert_same_mean_and_spread(qpos[:, 3:].ravel(), dm_qpos[:, 3:].ravel(), "joint angles")
    for i in range(2):
        envtest.assert_same_mean_and_spread(targets[:, i], dm_targets[:, i], f"target[{i}]")
    # The close-target mixture: P(|x|, |y| <= .3) = .2 + .8 * .15**2 = .218.
    close, dm_close = (np.mean(np.all(np.abs(t[:, :2]) <= 0.3, axis=1)) for t in (targets, dm_targets))
    se = np.sqrt(0.218 * 0.782 * (1 / len(targets) + 1 / len(dm_targets)))
    assert abs(close - dm_close) < 4 * se and abs(close - 0.218) < 4 * se, (close, dm_close)
    np.testing.assert_allclose(np.abs(targets[:, :2]).max(), 2, atol=0.05)


def test_nose_at_the_target():
    """Rewarded states that random actions rarely reach: the target placed at and beyond the reward's
    bounds around the nose; one control step matches dm_control."""
    env, reset, step, params = _batch()
    states = reset(jax.random.split(jax.random.key(3), 2), params)
    nose = states.data.geom_xpos[:, env.mj_model.geom("nose").id]
    target = nose + jnp.array([[0.05, 0.0, 0.0], [0.0, -0.2, 0.0]])  # inside the bounds; in the margin
    states = states.replace(task_state={"target": target.at[:, 2].set(0.05)})
    actions = np.random.default_rng(0).uniform(-1, 1, (2, env.action_size)).astype(np.float32)
    stepped = step(states, jnp.asarray(actions))
    dm_env = parity.load_dm_control(TASK)
    rewards = []
    for lane in range(2):
        dm_env.reset()
        parity.copy_state_into(dm_env, env, states, lane)  # (states.obs still holds the reset's target)
        ts = dm_env.step(env.ctrl_from_action(actions[lane]))
        assert np.max(np.abs(np.asarray(stepped.obs[lane]) - parity.flat_dm_observation(ts.observation))) < OBS_TOL
        assert abs(float(stepped.reward[lane]) - ts.reward) < REWARD_TOL
        rewards.append(ts.reward)
    assert rewards[0] == 1.0 and 0.05 < rewards[1] < 0.9, rewards
