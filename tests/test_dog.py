"""dog-stand/walk/trot/run against dm_control's dog. The MJX model differs from dm_control's (see
envs_mjx/dog.py and docs/envs/dog.md): teeth and ellipsoid-box geom pairs do not collide, no noslip. Tolerances come from
the measurements in docs/envs/dog.md. Every MJX check shares one compiled batch of 4 lanes (one per task)."""

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest
from scipy import stats
from dm_control.suite import dog as dm_dog
from mujoco.mjx._src import collision_driver

from envs_mjx import dog, make, parity
from envs_mjx.base import compile_domain
from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "dog"
PER_TASK, ROLLOUT = 1, 10  # one lane per task: the 4-lane batch every check below reuses


def _dm_model(floor_size):
    return mujoco.MjModel.from_xml_string(*dm_dog.get_model_and_assets(floor_size=floor_size))


def test_model_changes_are_only_the_declared_ones():
    """The tasks' dm_control models differ only in the floor's (visual) size; the MJX model differs from them
    only in which geom pairs collide (the teeth's, and the ellipsoid-box ones) and in noslip: same geometry,
    masses, inertias and contact parameters."""
    models = [_dm_model(s * dm_dog._DEFAULT_TIME_LIMIT) for s in (dm_dog._WALK_SPEED, dm_dog._TROT_SPEED,
                                                                     dm_dog._RUN_SPEED)]
    floor = models[0].geom("floor").id
    for other in models[1:]:
        for field in ("body_mass", "body_inertia", "geom_type", "geom_pos", "geom_contype", "jnt_range"):
            np.testing.assert_array_equal(getattr(models[0], field), getattr(other, field))
        size = other.geom_size.copy()
        size[floor] = models[0].geom_size[floor]
        np.testing.assert_array_equal(models[0].geom_size, size)

    ref = models[-1]
    mj_model, _ = compile_domain(dog.DOMAIN)
    for field in ("body_mass", "body_inertia", "body_ipos", "geom_type", "geom_size", "geom_pos",
                  "geom_friction", "geom_solref", "geom_solimp", "geom_condim", "geom_priority", "jnt_range",
                  "actuator_gainprm"):
        np.testing.assert_array_equal(getattr(mj_model, field), getattr(ref, field), err_msg=field)
    assert mj_model.opt.noslip_iterations == 0 and ref.opt.noslip_iterations == 4
    pairs_ref = {tuple(p[:2]) for p in collision_driver.geom_pairs(ref)}
    pairs = {tuple(p[:2]) for p in collision_driver.geom_pairs(mj_model)}
    assert pairs <= pairs_ref
    teeth = {ref.geom(name).id for name in dog._teeth(ref)}  # pylint: disable=protected-access
    assert len(teeth) == 42 and not any(mj_model.geom_contype[g] or mj_model.geom_conaffinity[g] for g in teeth)
    dropped = pairs_ref - pairs
    ellipsoid_box = sorted([int(mujoco.mjtGeom.mjGEOM_BOX), int(mujoco.mjtGeom.mjGEOM_ELLIPSOID)])
    others = [p for p in dropped if not teeth & set(p)]
    assert len(dropped) - len(others) == 2856 and len(others) == 13
    assert all(sorted(int(ref.geom_type[g]) for g in p) == ellipsoid_box for p in others)
    assert not any(sorted(int(ref.geom_type[g]) for g in p) == ellipsoid_box for p in pairs)


def test_reward_constants_match_dm_control():
    env = parity.load_dm_control("dog-walk")
    env.reset()
    stand_height, body_weight = dog._constants(compile_domain(dog.DOMAIN)[0])
    np.testing.assert_allclose(stand_height, env.task._stand_height, rtol=1e-6)
    np.testing.assert_allclose(body_weight, env.task._body_weight, rtol=1e-6)


def test_one_step_parity():
    # Float32 MJX without noslip against float64 C MuJoCo with it: positions agree to 1e-3 or better, while
    # velocities and contact forces differ where feet slide (as C MuJoCo without noslip differs from itself
    # with it; docs/envs/dog.md), so each observation key has its own bound.
    envtest.assert_one_step_parity(DOMAIN, obs_tol=OBS_TOL, reward_tol=REWARD_TOL, per_task=PER_TASK,
                                   rollout_steps=ROLLOUT)


@pytest.mark.xfail(strict=True, reason="the JAX backend's dog is a changed model (docs/envs/dog.md)")
def test_agent_like_parity():
    """At a trained dog's speeds the JAX backend's changed model (no ellipsoid contacts, no noslip) is not
    dm_control's dog: measured (1 state per task), dog-walk 2.9e-2 rad/s in joint velocities after one control
    step (dm_control against itself from 1e-6 away: 9.8e-5), dog-run 4.9 after two (6.1e-4). The Warp backend,
    with the unchanged model, agrees there (tests/test_warp.py); this fails until the JAX model does too."""
    envtest.assert_agent_like_parity(DOMAIN, obs_tol=1e-3, reward_tol=1e-6, per_task=PER_TASK)


def test_trajectory_divergence():
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=DIVERGENCE_TOL, per_task=PER_TASK)


def test_observation_spec_matches_dm_control():
    env = make("dog-run")
    dm_spec = parity.load_dm_control("dog-run").observation_spec()
    assert [k for k, _ in env.observation_spec] == list(dm_spec)
    for key, shape in env.observation_spec:
        assert int(np.prod(shape)) == int(np.prod(dm_spec[key].shape)), key


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN, per_task=PER_TASK)


def test_initial_state_distribution():
    """Resets (drawn with the compiled 4-lane reset) against dm_control's `initialize_episode` draws: heading,
    root velocities, actuator states, and the pose (dm_control's default pose, no joint randomisation)."""
    env, reset, _ = parity._batched_fns(DOMAIN)  # pylint: disable=protected-access
    tasks = parity.list_tasks(DOMAIN)
    params = jax.tree.map(lambda *x: jnp.stack(x), *[env.task_params(t.split("-")[1]) for t in tasks])
    draws = []
    for i in range(64):
        s = reset(jax.random.split(jax.random.key(1000 + i), len(tasks)), params)
        draws.append((np.asarray(s.data.qpos), np.asarray(s.data.qvel), np.asarray(s.data.act)))
    qpos, qvel, act = (np.concatenate(x) for x in zip(*draws))

    dm_env = parity.load_dm_control("dog-stand", seed=0)
    ref = []
    for _ in range(256):
        dm_env.reset()
        p = dm_env.physics.data
        ref.append((p.qpos.copy(), p.qvel.copy(), p.act.copy()))
    qpos_ref, qvel_ref, act_ref = (np.stack(x) for x in zip(*ref))

    n = len(qpos)
    # Pose: everything but the root orientation is dm_control's default pose.
    np.testing.assert_allclose(np.delete(qpos, np.s_[3:7], axis=1), np.delete(qpos_ref, np.s_[3:7], axis=1)[:n],
                               atol=1e-6)
    # Heading: a yaw-only unit quaternion.
    quat = qpos[:, 3:7]
    np.testing.assert_allclose(quat[:, 1:3], 0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(quat, axis=1), 1, atol=1e-6)
    # Root velocities: x, y and yaw rate drawn, all else zero.
    moving = [0, 1, 5]
    np.testing.assert_array_equal(np.delete(qvel, moving, axis=1), 0)
    np.testing.assert_array_equal(np.delete(qvel_ref, moving, axis=1), 0)
    assert act.min() >= -1 and act.max() <= 1
    # Distributions: two-sample KS against dm_control's draws (heading angle, the three velocities, actuator
    # states), each above p = 0.001.
    yaw = np.mod(2 * np.arctan2(quat[:, 3], quat[:, 0]), 2 * np.pi)
    yaw_ref = np.mod(2 * np.arctan2(qpos_ref[:, 6], qpos_ref[:, 3]), 2 * np.pi)
    samples = {"yaw": (yaw, yaw_ref), "act": (act.ravel(), act_ref.ravel())}
    samples.update({f"qvel[{j}]": (qvel[:, j], qvel_ref[:, j]) for j in moving})
    for name, (x, y) in samples.items():
        assert stats.ks_2samp(x, y).pvalue > 1e-3, name


# Measured (docs/envs/dog.md), 4 lanes (one per task) x seeds 0-3, resets and states after 10 random-action steps;
# bounds are about 3x the worst. Positions agree to 1e-3 or better; contact forces, the accelerometer and joint
# velocities differ where feet slide, as much as C MuJoCo without noslip differs from itself with noslip.
OBS_TOL = {
    "joint_angles": 0.2,  # worst 0.061 (a toe, stepped while sliding)
    "joint_velocites": 40.0,  # 14
    "torso_pelvis_height": 3e-4,  # 8.2e-5
    "z_projection": 1e-2,  # 2.9e-3
    "torso_com_velocity": 2e-2,  # 5.4e-3
    "inertial_sensors": 300.0,  # 115 (accelerometer, at a reset with sliding feet)
    "foot_forces": 300.0,  # 112 (reset)
    "touch_sensors": 300.0,  # 101 (reset)
    "actuator_state": 1e-6,  # 8.1e-8
}
REWARD_TOL = 0.1  # 0.035 (stand: its touch term reads the touch sensors)
# Mean |reward diff| over 200 random-action steps: stand up to 0.041, the others up to 1.3e-3; C MuJoCo without
# noslip against itself with noslip: 1.2e-2 (stand) and 3e-3..8e-3.
DIVERGENCE_TOL = {"dog-stand": 0.1, "dog-walk": 4e-3, "dog-trot": 4e-3, "dog-run": 4e-3}
