import jax
import numpy as np
import pytest
from scipy import stats

from envs_mjx import base, parity
from envs_mjx.registry import list_tasks
from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "quadruped"
# All checks share the compiled batch of envs_mjx.parity (2 lanes per task, as assert_nan_contained uses).
PER_TASK = 2


def _obs_layout(env):
    """{key: slice} of the flat observation, in dm_control's (insertion) order."""
    data = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), env._dummy_data())
    layout, start = {}, 0
    for key, value in env.domain.observation(env.mj_model, data, {}, env.params).items():
        size = int(np.prod(np.shape(value)))
        layout[key] = slice(start, start + size)
        start += size
    return layout, start


def _acceleration_entries(env):
    """Flat observation entries read from acceleration-stage sensors (accelerometer, force, torque). After
    a step they come from the pre-integration state in both simulators; dm_control's reset_context instead
    recomputes them at the copied state without actuation, so they are not comparable right after a copy
    of a state that was reached by stepping."""
    layout, size = _obs_layout(env)
    mask = np.zeros(size, bool)
    mask[layout["imu"].start:layout["imu"].start + 3] = True  # imu = [accelerometer, gyro] (model order)
    mask[layout["force_torque"]] = True
    return mask


def test_one_step_parity_from_reset():
    # Fresh episodes (falling, no contact yet): reset obs max error ~3e-6, step obs ~3e-5 (the force/torque
    # and accelerometer readings), reward ~5e-8.
    envtest.assert_one_step_parity(DOMAIN, obs_tol=1e-4, reward_tol=2e-7, per_task=PER_TASK, rollout_steps=0)


def test_one_step_parity_in_contact():
    # After 20 random steps the body lies on the floor: contact forces enter the accelerometer and the toe
    # force/torque sensors, which are the largest differences (measured up to 7.3e-4 absolute, relative
    # 1e-4 of readings of size ~10); reward differences stay below 3e-6.
    results = envtest.parity_results(DOMAIN, per_task=PER_TASK, rollout_steps=20)
    for task, r in results.items():
        assert r.step_obs_err <= 2e-3, f"{task}: stepped obs differs from dm_control by {r.step_obs_err:.3g}"
        assert r.step_reward_err <= 1e-5, f"{task}: reward differs from dm_control by {r.step_reward_err:.3g}"


def test_agent_like_parity():
    """Upright from the standing pose at each task's target speed, in contact, at action repeat 1 and 2."""
    # Measured (2 states per task; run at 2.8 m/s after the lead-in) against dm_control / dm_control's own
    # difference from 1e-6 away: egocentric_state 1.2e-4 / 9.6e-4, torso_velocity 1.2e-5 / 1.1e-4, torso_upright
    # 2.4e-7, imu 3.1e-3 / 1.2e-2, force_torque 4.7e-4 / 4.2e-3, reward 7.8e-7 / 1.9e-5.
    obs_tol = {"egocentric_state": 5e-4, "torso_velocity": 5e-5, "torso_upright": 1e-6, "imu": 1e-2,
               "force_torque": 2e-3}
    envtest.assert_agent_like_parity(DOMAIN, obs_tol=obs_tol, reward_tol=2e-6, per_task=PER_TASK)


def test_copied_contact_state_observation():
    # The harness's reset_obs_err is not meaningful for stepped states of this domain (see
    # _acceleration_entries); compare every other entry of the copied state exactly.
    env, _, lanes, snapshots = parity.sample_states(DOMAIN, list_tasks(DOMAIN), PER_TASK, 20)
    acc = _acceleration_entries(env)
    dm_envs = {t: parity.load_dm_control(t) for t in set(lanes)}
    worst = 0.0
    for states in snapshots:
        for lane, task in enumerate(lanes):
            dm_envs[task].reset()
            obs_dm = parity.copy_state_into(dm_envs[task], env, states, lane)
            worst = max(worst, float(np.max(np.abs(np.asarray(states.obs[lane])[~acc] - obs_dm[~acc]))))
    assert worst <= 3e-6, f"copied state's observation differs from dm_control by {worst:.3g}"


def test_trajectory_divergence():
    # 200 random-action control steps from the same start; float32 contact dynamics drift slowly.
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=1e-3, per_task=PER_TASK)


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN)


def test_initial_state_matches_dm_control():
    """Orientations are uniform rotations; the height is exactly the one dm_control's own
    `_find_non_contacting_height` finds for the same orientation; joints at rest pose, at rest, no contact."""
    from dm_control.suite import quadruped as dm_quadruped  # pylint: disable=import-outside-toplevel

    env, reset, _ = parity._batched_fns(DOMAIN)  # pylint: disable=protected-access
    n_lanes = PER_TASK * len(list_tasks(DOMAIN))
    params = jax.tree.map(lambda x: np.stack([x] * n_lanes), env.params)
    physics = parity.load_dm_control(f"{DOMAIN}-walk").physics
    root = base.qpos_index(env.mj_model, "root")
    qpos, uprights = [], []
    for i in range(25):
        states = reset(jax.random.split(jax.random.key(100 + i), n_lanes), params)
        assert not any(bool(base.is_penetrating(jax.tree.map(lambda x: x[lane], states.data)))
                       for lane in range(n_lanes)), "a reset state has an active contact"
        assert np.all(np.asarray(states.data.qvel) == 0) and np.all(np.asarray(states.data.act) == 0)
        qpos.append(np.asarray(states.data.qpos))
    qpos = np.concatenate(qpos)
    np.testing.assert_array_equal(qpos[:, root + 7:], np.broadcast_to(env.mj_model.qpos0[root + 7:],
                                                                      qpos[:, root + 7:].shape))
    np.testing.assert_array_equal(qpos[:, root:root + 2], 0)
    for q in qpos:
        dm_quadruped._find_non_contacting_height(physics, q[root + 3:root + 7].astype(np.float64))
        assert abs(physics.named.data.qpos["root"][2] - q[root + 2]) < 1e-5, (
            f"height {q[root + 2]:.3f}, dm_control finds {physics.named.data.qpos['root'][2]:.3f}")
        uprights.append(physics.named.data.xmat["torso", "zz"])
    # Uniform rotations: the torso's z-axis is uniform on the sphere, so its z-component is U[-1, 1].
    assert stats.kstest(uprights, "uniform", args=(-1, 2)).pvalue > 1e-3


def test_tasks_and_action_scaling_match_dm_control():
    env, _, _ = parity._batched_fns(DOMAIN)  # pylint: disable=protected-access
    for task in list_tasks(DOMAIN):
        dm_env = parity.load_dm_control(task)
        assert float(env.task_params(task.split("-")[1])["desired_speed"]) == dm_env.task._desired_speed
        spec = dm_env.action_spec()
        np.testing.assert_allclose(env.ctrl_from_action(-np.ones(env.action_size, np.float32)), spec.minimum,
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(env.ctrl_from_action(np.ones(env.action_size, np.float32)), spec.maximum,
                                   rtol=0, atol=1e-6)
        assert round(dm_env.control_timestep() / dm_env.physics.timestep()) == env.n_sub_steps
        assert dm_env._step_limit == env.episode_length  # pylint: disable=protected-access
