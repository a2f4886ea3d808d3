"""Fish: a fish swims to a randomly placed target in a fluid (dm_control `suite/fish.py`, the Swim task).

The target is a worldbody geom whose position dm_control redraws per episode in the model
(`geom_pos['target']`); here it is per-episode `task_state`. No mocap bodies are involved.
"""

import jax
import jax.numpy as jnp
from dm_control.suite import fish as dm_fish
from mujoco import mjx

from envs_mjx import base
from envs_mjx.rewards import tolerance

JOINTS = tuple(dm_fish._JOINTS)  # pylint: disable=protected-access
JOINT_RANGE = (-0.2, 0.2)  # dm_control draws each of JOINTS uniformly in this range
TARGET_LOW, TARGET_HIGH = (-0.4, -0.4, 0.1), (0.4, 0.4, 0.3)  # the target's uniform box (x, y, z)


def initialize(mj_model, mjx_model, key, params):
    k_quat, k_joints, k_target = jax.random.split(key, 3)
    data = mjx.make_data(mjx_model)  # qpos0: the torso at (0, 0, .1), zero velocity
    root = base.qpos_index(mj_model, "root")
    quat = jax.random.normal(k_quat, (4,))
    qpos = data.qpos.at[root + 3:root + 7].set(quat / jnp.linalg.norm(quat))
    angles = jax.random.uniform(k_joints, (len(JOINTS),), minval=JOINT_RANGE[0], maxval=JOINT_RANGE[1])
    qpos = qpos.at[jnp.array([base.qpos_index(mj_model, j) for j in JOINTS])].set(angles)
    target = jax.random.uniform(k_target, (3,), minval=jnp.array(TARGET_LOW), maxval=jnp.array(TARGET_HIGH))
    return data.replace(qpos=qpos), {"target": target}


def _upright(mj_model, d):
    return d.xmat[mj_model.body("torso").id, 2, 2]


def _mouth_to_target(mj_model, d, task_state):
    """The vector from mouth to target in the mouth's frame. The target geom hangs off the worldbody, so its
    global position is its (per-episode) `geom_pos`."""
    mouth = mj_model.geom("mouth").id
    return (task_state["target"] - d.geom_xpos[mouth]) @ d.geom_xmat[mouth]


def observation(mj_model, d, task_state, params):
    return {
        "joint_angles": d.qpos[jnp.array([base.qpos_index(mj_model, j) for j in JOINTS])],
        "upright": _upright(mj_model, d),
        "target": _mouth_to_target(mj_model, d, task_state),
        "velocity": d.qvel,
    }


def reward(mj_model, d, task_state, params):
    radii = float(mj_model.geom_size[[mj_model.geom("mouth").id, mj_model.geom("target").id], 0].sum())
    in_target = tolerance(jnp.linalg.norm(_mouth_to_target(mj_model, d, task_state)), bounds=(0, radii),
                          margin=2 * radii)
    is_upright = 0.5 * (_upright(mj_model, d) + 1)
    return (7 * in_target + is_upright) / 8


def sync_dm_control(dm_env, task_state):
    """Parity tests: dm_control keeps the episode's target in its model."""
    dm_env.physics.named.model.geom_pos["target"] = task_state["target"]


DOMAIN = base.Domain(
    name="fish",
    model_and_assets=dm_fish.get_model_and_assets,
    control_timestep=dm_fish._CONTROL_TIMESTEP,  # pylint: disable=protected-access
    tasks={"swim": {}},
    edit_xml=base.no_collisions,
    model_changes=("collisions off (every geom contype/conaffinity 0, contact flag disabled): needed for MJX to "
                   "load the model (ellipsoid-box pairs unsupported); no effect on the dynamics, whose "
                   "constraints dm_control's model already disables",),
    initialize=initialize,
    observation=observation,
    reward=reward,
    sync_dm_control=sync_dm_control,
)
