"""Swimmer: a 6-link planar swimmer in a fluid reaches a random target (dm_control `suite/swimmer.py`,
`swimmer6`, the model procedurally built by dm_control's `get_model_and_assets(6)`).

The target is a worldbody geom whose (x, y) dm_control redraws per episode in the model; here it is
per-episode `task_state`.
"""

import functools

import jax
import jax.numpy as jnp
from dm_control.suite import swimmer as dm_swimmer
from mujoco import mjx

from envs_mjx import base, xla_flags
from envs_mjx.rewards import tolerance

N_BODIES = 6
CLOSE_TARGET_PROBABILITY = 0.2  # dm_control: the target's (x, y) box is +-.3 with this probability, else +-2
CLOSE_BOX, FAR_BOX = 0.3, 2.0
_BODY_SENSORS_START = 12  # dm_control's `sensordata[12:]`: per body, velocimeter (3) then gyro (3)


def initialize(mj_model, mjx_model, key, params):
    k_joints, k_close, k_xy = jax.random.split(key, 3)
    data = mjx.make_data(mjx_model)
    qpos = base.randomize_limited_and_rotational_joints(mj_model, k_joints, data.qpos)
    box = jnp.where(jax.random.uniform(k_close) < CLOSE_TARGET_PROBABILITY, CLOSE_BOX, FAR_BOX)
    xy = jax.random.uniform(k_xy, (2,), minval=-box, maxval=box)
    target_z = float(mj_model.geom_pos[mj_model.geom("target").id, 2])
    return data.replace(qpos=qpos), {"target": jnp.concatenate([xy, jnp.array([target_z])])}


def _nose_to_target(mj_model, d, task_state):
    """From nose to target in the head's frame, (x, y). The target geom hangs off the worldbody, so its
    global position is its (per-episode) `geom_pos`."""
    nose = d.geom_xpos[mj_model.geom("nose").id]
    return ((task_state["target"] - nose) @ d.xmat[mj_model.body("head").id])[:2]


def observation(mj_model, d, task_state, params):
    body_velocities = d.sensordata[_BODY_SENSORS_START:].reshape((-1, 6))[:, jnp.array([0, 1, 5])]
    return {
        "joints": d.qpos[3:],
        "to_target": _nose_to_target(mj_model, d, task_state),
        "body_velocities": body_velocities.ravel(),
    }


def reward(mj_model, d, task_state, params):
    target_size = float(mj_model.geom_size[mj_model.geom("target").id, 0])
    return tolerance(jnp.linalg.norm(_nose_to_target(mj_model, d, task_state)), bounds=(0, target_size),
                     margin=5 * target_size, sigmoid="long_tail")


def sync_dm_control(dm_env, task_state):
    """Parity tests: dm_control keeps the episode's target (and its light) in its model."""
    model = dm_env.physics.named.model
    model.geom_pos["target", ["x", "y"]] = task_state["target"][:2]
    model.light_pos["target_light", ["x", "y"]] = task_state["target"][:2]


DOMAIN = base.Domain(
    name="swimmer",
    model_and_assets=functools.partial(dm_swimmer.get_model_and_assets, N_BODIES),
    control_timestep=dm_swimmer._CONTROL_TIMESTEP,  # pylint: disable=protected-access
    tasks={"swimmer6": {}},
    initialize=initialize,
    observation=observation,
    reward=reward,
    sync_dm_control=sync_dm_control,
    edit_xml=base.no_collisions,
    model_changes=("geoms made non-colliding: needed for MJX to load the model (ellipsoid-box pairs unsupported); "
                   "no effect on the dynamics, whose contacts dm_control's model already disables",),
    # On the CPU the default fusion emitters ran swimmer's step 28x slower at batch 100 (docs/envs/swimmer.md).
    compiler_options=xla_flags.LEGACY_CPU_FUSION_EMITTERS,
)
