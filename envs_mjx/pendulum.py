"""Pendulum: swing up and balance a torque-limited pendulum (dm_control `suite/pendulum.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
from dm_control.suite import pendulum as dm_pendulum
from mujoco import mjx

from envs_mjx import base
from envs_mjx.rewards import tolerance

_COSINE_BOUND = float(np.cos(np.deg2rad(8)))  # dm_control's _COSINE_BOUND (_ANGLE_BOUND = 8 degrees)


def _pole_xmat(mj_model, d):
    return d.xmat[mj_model.body("pole").id]


def initialize(mj_model, mjx_model, key, params):
    # dm_control: qpos['hinge'] ~ U[-pi, pi); qvel stays zero.
    qpos = jnp.zeros(mj_model.nq).at[base.qpos_index(mj_model, "hinge")].set(
        jax.random.uniform(key, (), minval=-jnp.pi, maxval=jnp.pi))
    return mjx.make_data(mjx_model).replace(qpos=qpos), {}


def observation(mj_model, d, task_state, params):
    xmat = _pole_xmat(mj_model, d)
    return {"orientation": jnp.stack([xmat[2, 2], xmat[0, 2]]),  # named xmat['pole', ['zz', 'xz']]
            "velocity": d.qvel[base.qvel_index(mj_model, "hinge")][None]}


def reward(mj_model, d, task_state, params):
    return tolerance(_pole_xmat(mj_model, d)[2, 2], (_COSINE_BOUND, 1.0))


DOMAIN = base.Domain(
    name="pendulum",
    model_and_assets=dm_pendulum.get_model_and_assets,
    control_timestep=0.02,  # dm_control uses the physics timestep (no control_timestep given); 20 s = 1000 steps
    tasks={"swingup": {}},
    edit_xml=base.drop_energy_flag,
    model_changes=("energy computation disabled (MJX does not support it; no effect on dynamics)",),
    initialize=initialize,
    observation=observation,
    reward=reward,
)
