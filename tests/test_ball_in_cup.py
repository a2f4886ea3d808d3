import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs_mjx import ball_in_cup, parity
from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "ball_in_cup"
TASK = "ball_in_cup-catch"
OBS_TOL_CONTACT = 1.5e-4  # measured 5.6e-5 (float32 contact solve)
TRAJECTORY_OBS_TOL = 3e-4  # measured 9.6e-5 over 40 steps


def test_one_step_parity():
    # Euler in both, the string a tendon limit; float32 rounding only (measured 2.4e-7 obs, 0 reward).
    envtest.assert_one_step_parity(DOMAIN, obs_tol=7e-7, reward_tol=1e-6)


def test_trajectory_divergence():
    # Random actions never catch the ball (both returns 0): see test_ball_in_the_cup for the rewarded case.
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=1e-6)


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN)


def _batch(n_lanes=2):
    """The batch-2 reset and step that the parity checks compiled (no new compilation)."""
    env, reset, step = parity._batched_fns(DOMAIN)  # pylint: disable=protected-access
    params = jax.tree.map(lambda x: jnp.stack([x] * n_lanes), env.params)
    return env, reset, step, params


def test_initial_state_distribution():
    """Ball start uniform in dm_control's box minus the penetrating region, cup at rest, no contact."""
    env, reset, _, params = _batch()
    starts = np.concatenate([np.asarray(reset(jax.random.split(jax.random.key(i), 2), params).data.qpos)
                             for i in range(200)])  # 400 draws
    states = reset(jax.random.split(jax.random.key(1000), 2), params)
    dm_env = parity.load_dm_control(TASK, seed=0)
    dm_starts = []
    for _ in range(2000):
        dm_env.reset()
        dm_starts.append(dm_env.physics.data.qpos.copy())
    dm_starts = np.asarray(dm_starts)
    assert np.all(starts[:, :2] == 0) and np.all(np.asarray(states.data.qvel) == 0)
    x, z = starts[:, 2], starts[:, 3]
    assert x.min() >= ball_in_cup.BALL_X_RANGE[0] and x.max() <= ball_in_cup.BALL_X_RANGE[1]
    assert z.min() >= ball_in_cup.BALL_Z_RANGE[0] and z.max() <= ball_in_cup.BALL_Z_RANGE[1]
    for col in (2, 3):  # means and spreads within ~4 standard errors of dm_control's
        a, b = starts[:, col], dm_starts[:, col]
        se = np.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se, (col, a.mean(), b.mean())
        assert abs(a.std() - b.std()) < 0.1 * b.std(), (col, a.std(), b.std())
    # The rejection: near the cup (|x| < .083, world z > .467) the box holds 32% of uniform draws but only
    # 18% of dm_control's starts (those between the cup's walls survive); MJX must agree within 4 standard errors.
    near_a, near_b = (np.mean((np.abs(q[:, 2]) < 0.083) & (q[:, 3] > 0.267)) for q in (starts, dm_starts))
    se = np.sqrt(near_b * (1 - near_b) * (1 / len(starts) + 1 / len(dm_starts)))
    assert abs(near_a - near_b) < 4 * se, (near_a, near_b)
    for lane in range(2):  # the MJX starts are contact-free for MuJoCo itself
        dm_env.reset()
        parity.copy_state_into(dm_env, env, states, lane)
        assert dm_env.physics.data.ncon == 0


def test_ball_in_the_cup():
    """Rewarded, contact-rich states (the ball resting in / dropping into the cup) that random actions never
    reach: one-step parity from each of 40 states along an MJX rollout with small actions, and the 40-step
    trajectory of both simulators from the same start, where the reward must stay 1 in both."""
    env, reset, step, params = _batch()
    states = reset(jax.random.split(jax.random.key(0), 2), params)
    # Lane 0: ball resting on the cup's floor; lane 1: ball dropping in, off centre.
    qpos = jnp.array([[0.0, 0.0, 0.0, 0.333], [0.0, 0.0, 0.01, 0.36]])
    qvel = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -0.5]])
    # The compiled step brings the edited state's kinematics up to date (its first substep uses the stale
    # ones, so the result is simply some nearby consistent state).
    states = step(states.replace(data=states.data.replace(qpos=qpos, qvel=qvel)), jnp.zeros((2, 2)))
    one_step_env = parity.load_dm_control(TASK, seed=0)
    trajectory_envs = [parity.load_dm_control(TASK, seed=lane) for lane in range(2)]
    for lane, dm_env in enumerate(trajectory_envs):
        dm_env.reset()
        parity.copy_state_into(dm_env, env, states, lane)
    rng = np.random.default_rng(0)
    obs_err, traj_obs_err, contacts, rewards = 0.0, 0.0, 0, []
    for _ in range(40):
        actions = rng.uniform(-0.2, 0.2, (2, 2)).astype(np.float32)
        stepped = step(states, jnp.asarray(actions))
        for lane in range(2):
            one_step_env.reset()
            parity.copy_state_into(one_step_env, env, states, lane)
            contacts += one_step_env.physics.data.ncon > 0
            ts = one_step_env.step(actions[lane])
            obs_err = max(obs_err, float(np.max(np.abs(np.asarray(stepped.obs[lane])
                                                        - parity.flat_dm_observation(ts.observation)))))
            assert float(stepped.reward[lane]) == ts.reward
            ts = trajectory_envs[lane].step(actions[lane])
            traj_obs_err = max(traj_obs_err, float(np.max(np.abs(np.asarray(stepped.obs[lane])
                                                                  - parity.flat_dm_observation(ts.observation)))))
            rewards.append((float(stepped.reward[lane]), ts.reward))
        states = stepped
    assert contacts >= 60, f"only {contacts} of 80 states touch the cup"
    assert obs_err < OBS_TOL_CONTACT, obs_err
    assert traj_obs_err < TRAJECTORY_OBS_TOL, traj_obs_err
    assert all(r == (1.0, 1.0) for r in rewards), "the ball should stay in the cup under small actions"
