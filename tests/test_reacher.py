import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs_mjx import parity
from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "reacher"
TASKS = ("reacher-easy", "reacher-hard")
N_DRAWS = 2000
KS_CRITICAL = 0.062  # two-sample KS, 0.1% level, 2000 + 2000 draws
# Measured: near the target obs 8.0e-7, reward 0 (the reward is 0 or 1); wrist against its limit obs 4.4e-6
# (1.4e-3 with the solver warm start MuJoCo uses, see reacher.py's model_changes).
NEAR_OBS_TOL, NEAR_REWARD_TOL = 2e-6, 1e-6
WRIST_OBS_TOL = 1.5e-5


def test_one_step_parity():
    # No contacts, Euler in both, float32 rounding: measured obs 7.5e-7, reward 0 (0 or 1 reward).
    envtest.assert_one_step_parity(DOMAIN, obs_tol=2e-6, reward_tol=1e-6)


def test_trajectory_divergence():
    # Random actions from random starts rarely touch the target: test_reward_near_target covers the reward.
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=1e-6)


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN)


@functools.lru_cache(maxsize=None)
def _initial_state(n: int, seed: int = 1):
    """keys, qpos, qvel, targets of `n` fresh episodes from the domain's `initialize` (cheap to compile: no
    forward pass)."""
    keys, data, task_state = envtest.initial_draws(TASKS[0], n, seed)
    return keys, np.asarray(data.qpos), np.asarray(data.qvel), np.asarray(task_state["target"])


def _finger_xy(qpos):
    """Planar forward kinematics of the arm (links of .12 m, hinges about z)."""
    s, w = qpos[:, 0], qpos[:, 0] + qpos[:, 1]
    return 0.12 * np.stack([np.cos(s) + np.cos(w), np.sin(s) + np.sin(w)], axis=1)


def test_initial_state_and_target_distribution():
    _, qpos, qvel, target = _initial_state(N_DRAWS)
    dm_env = parity.load_dm_control(TASKS[0], seed=0)
    dm_qpos, dm_target = [], []
    for _ in range(N_DRAWS):
        with dm_env.physics.reset_context():
            dm_env.task.initialize_episode(dm_env.physics)
        dm_qpos.append(dm_env.physics.data.qpos.copy())
        dm_target.append(dm_env.physics.named.model.geom_pos["target"].copy())
        assert np.all(dm_env.physics.data.qvel == 0)
    dm_qpos, dm_target = np.asarray(dm_qpos), np.asarray(dm_target)
    assert np.all(qvel == 0)
    for j in range(2):  # shoulder U[-pi, pi], wrist U[-160deg, 160deg]
        assert envtest.ks_statistic(qpos[:, j], dm_qpos[:, j]) < KS_CRITICAL, j
    for j in range(2):  # target x, y
        assert envtest.ks_statistic(target[:, j], dm_target[:, j]) < KS_CRITICAL, j
    assert envtest.ks_statistic(np.linalg.norm(target, axis=1), np.linalg.norm(dm_target[:, :2], axis=1)) < KS_CRITICAL
    assert envtest.ks_statistic(np.arctan2(target[:, 0], target[:, 1]),
                         np.arctan2(dm_target[:, 0], dm_target[:, 1])) < KS_CRITICAL
    assert np.abs(qpos[:, 1]).max() <= np.deg2rad(160) + 1e-6
    # The kinematics used below to pick near-target starts agree with dm_control's.
    with dm_env.physics.reset_context():
        dm_env.physics.data.qpos[:] = qpos[0]
    assert np.allclose(dm_env.physics.named.data.geom_xpos["finger", :2], _finger_xy(qpos[:1])[0], atol=1e-6)


def test_wrist_limit():
    """Start with the wrist beyond 150 degrees and drive it into its 160-degree limit for 60 steps (it comes
    to rest pressed against the limit): the limit constraint must act as in dm_control. This is where the
    solver warm start had to be disabled (model_changes)."""
    _, qpos, _, _ = _initial_state(N_DRAWS)
    picked = np.flatnonzero(np.abs(qpos[:, 1]) > np.deg2rad(150))[:4]
    assert len(picked) == 4
    obs_err, _, max_wrist, _ = _rollout_parity(
        picked, TASKS[:1] * 2, 60, lambda q0, rng: np.stack([np.zeros(2), np.sign(q0[:, 1])], axis=1))
    assert max_wrist > np.deg2rad(160), "the limit was not reached"
    assert obs_err < WRIST_OBS_TOL, obs_err


def _rollout_parity(picked, tasks, steps: int, actions_for=None):
    """Reset lanes with keys `picked` (pairs) into `tasks` (a pair), copy them into dm_control, take `steps`
    actions (`actions_for(qpos0, rng)`, by default small random ones) in both; returns max obs err, max reward
    err, max |wrist| reached and dm_control's rewards. Reuses the parity module's compiled reset and step."""
    keys, qpos, *_ = _initial_state(N_DRAWS)
    if actions_for is None:
        actions_for = lambda q0, rng: rng.uniform(-0.3, 0.3, q0.shape)  # noqa: E731
    env, reset, step = parity._batched_fns(DOMAIN)  # pylint: disable=protected-access
    params = jax.tree.map(lambda *x: jnp.stack(x), *[env.task_params(t.split("-")[1]) for t in tasks])
    rng = np.random.default_rng(0)
    obs_err = reward_err = max_wrist = 0.0
    rewards = []
    for pair in np.reshape(picked, (-1, 2)):
        states = reset(keys[pair], params)
        dm_envs = []
        for lane, task in enumerate(tasks):
            dm_env = parity.load_dm_control(task)
            dm_env.reset()
            parity.copy_state_into(dm_env, env, states, lane)
            dm_envs.append(dm_env)
        for _ in range(steps):
            actions = np.asarray(actions_for(qpos[pair], rng), np.float32)
            states = step(states, jnp.asarray(actions))
            for lane, dm_env in enumerate(dm_envs):
                ts = dm_env.step(env.ctrl_from_action(actions[lane]))
                obs_dm = parity.flat_dm_observation(ts.observation)
                obs_err = max(obs_err, float(np.max(np.abs(np.asarray(states.obs[lane]) - obs_dm))))
                reward_err = max(reward_err, abs(float(states.reward[lane]) - ts.reward))
                max_wrist = max(max_wrist, float(np.max(np.abs(dm_env.physics.named.data.qpos["wrist"]))))
                rewards.append(ts.reward)
    return obs_err, reward_err, max_wrist, np.asarray(rewards)


def test_reward_near_target():
    """Start with the fingertip within 2 cm of the target (inside both tasks' reward radius: .06 easy,
    .025 hard) and compare 30 steps of small random actions; lane 0 runs easy, lane 1 hard."""
    _, qpos, _, target = _initial_state(N_DRAWS)
    near = np.flatnonzero(np.linalg.norm(_finger_xy(qpos) - target, axis=1) < 0.02)[:4]
    assert len(near) == 4
    obs_err, reward_err, _, rewards = _rollout_parity(near, TASKS, 30)
    assert np.mean(rewards) > 0.2, "the target region was not exercised"
    assert obs_err < NEAR_OBS_TOL, obs_err
    assert reward_err < NEAR_REWARD_TOL, reward_err


def test_target_size_is_a_task_param():
    """easy and hard differ only in the target radius: a start 3-5 cm from the target is rewarded in easy
    (radius .05 + .01) and not in hard (.015 + .01), in both simulators."""
    keys, qpos, _, target = _initial_state(N_DRAWS)
    dist = np.linalg.norm(_finger_xy(qpos) - target, axis=1)
    picked = np.flatnonzero((dist > 0.03) & (dist < 0.05))[:2]
    assert len(picked) == 2
    env, reset, step = parity._batched_fns(DOMAIN)  # pylint: disable=protected-access
    for task in TASKS:
        params = jax.tree.map(lambda x: jnp.stack([x, x]), env.task_params(task.split("-")[1]))
        states = reset(keys[picked], params)
        stepped = step(states, jnp.zeros((2, 2)))
        for lane in range(2):
            dm_env = parity.load_dm_control(task)
            dm_env.reset()
            parity.copy_state_into(dm_env, env, states, lane)
            r_dm = dm_env.step(np.zeros(2)).reward
            assert float(stepped.reward[lane]) == r_dm == (1.0 if task == "reacher-easy" else 0.0), (task, lane)
