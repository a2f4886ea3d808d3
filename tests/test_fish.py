import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs_mjx import fish, parity
from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "fish"
TASK = "fish-swim"
OBS_TOL, REWARD_TOL = 5e-6, 3e-8  # measured 2.1e-6, 1.1e-8
DIVERGENCE_TOL = 6e-7  # measured 2.4e-7 (returns 19.04989 vs 19.04984)


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
    """Uniformly random orientation, fin/tail angles uniform in +-.2, at rest at (0, 0, .1); the target
    uniform in dm_control's box."""
    env, reset, _, params = _batch()
    batches = [reset(jax.random.split(jax.random.key(i), 2), params) for i in range(200)]  # 400 draws
    qpos = np.concatenate([np.asarray(s.data.qpos) for s in batches])
    upright = np.concatenate([np.asarray(s.data.xmat[:, env.mj_model.body("torso").id, 2, 2]) for s in batches])
    targets = np.concatenate([np.asarray(s.task_state["target"]) for s in batches])
    assert all(np.all(np.asarray(s.data.qvel) == 0) for s in batches)
    np.testing.assert_allclose(qpos[:, :3], np.tile([0, 0, 0.1], (len(qpos), 1)), atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(qpos[:, 3:7], axis=1), 1, atol=1e-6)
    dm_env = parity.load_dm_control(TASK, seed=1)
    dm_qpos, dm_upright, dm_targets = [], [], []
    for _ in range(2000):
        dm_env.reset()
        dm_qpos.append(dm_env.physics.data.qpos.copy())
        dm_upright.append(dm_env.physics.named.data.xmat["torso", "zz"])
        dm_targets.append(dm_env.physics.named.model.geom_pos["target"].copy())
    dm_qpos, dm_upright, dm_targets = np.asarray(dm_qpos), np.asarray(dm_upright), np.asarray(dm_targets)
    envtest.assert_same_mean_and_spread(upright, dm_upright, "upright")  # uniform on [-1, 1] for a uniform rotation
    for i in range(4):
        envtest.assert_same_mean_and_spread(np.abs(qpos[:, 3 + i]), np.abs(dm_qpos[:, 3 + i]), f"|quat[{i}]|")
    joints = np.array([env.mj_model.joint(j).qposadr[0] for j in fish.JOINTS])
    assert np.all(np.abs(qpos[:, joints]) <= 0.2)
    envtest.assert_same_mean_and_spread(qpos[:, joints].ravel(), dm_qpos[:, joints].ravel(), "joint angles")
    assert np.all(targets >= fish.TARGET_LOW) and np.all(targets <= fish.TARGET_HIGH)
    for i in range(3):
        envtest.assert_same_mean_and_spread(targets[:, i], dm_targets[:, i], f"target[{i}]")


def test_mouth_at_the_target():
    """Rewarded states that random actions never reach: the target placed just in front of the mouth (inside
    and at the edge of the reward's bounds); one control step matches dm_control and pays ~1."""
    env, reset, step, params = _batch()
    states = reset(jax.random.split(jax.random.key(3), 2), params)
    mouth = env.mj_model.geom("mouth").id
    offsets = jnp.array([[0.0, 0.02, 0.0], [0.01, 0.04, -0.01]])  # in the mouth's frame
    target = states.data.geom_xpos[:, mouth] + jnp.einsum("bij,bj->bi", states.data.geom_xmat[:, mouth], offsets)
    states = states.replace(task_state={"target": target})
    actions = np.random.default_rng(0).uniform(-1, 1, (2, env.action_size)).astype(np.float32)
    stepped = step(states, jnp.asarray(actions))
    dm_env = parity.load_dm_control(TASK)
    for lane in range(2):
        dm_env.reset()
        parity.copy_state_into(dm_env, env, states, lane)  # (states.obs still holds the reset's target)
        ts = dm_env.step(env.ctrl_from_action(actions[lane]))
        assert np.max(np.abs(np.asarray(stepped.obs[lane]) - parity.flat_dm_observation(ts.observation))) < OBS_TOL
        assert abs(float(stepped.reward[lane]) - ts.reward) < REWARD_TOL
        assert ts.reward > 0.8, ts.reward
