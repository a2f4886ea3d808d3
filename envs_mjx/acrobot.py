"""Acrobot: swing up and balance a two-link underactuated pendulum (dm_control `suite/acrobot.py`)."""

import jax
import jax.numpy as jnp
from dm_control.suite import acrobot as dm_acrobot
from mujoco import mjx

from envs_mjx import base
from envs_mjx.rewards import tolerance


def _arm_xmats(mj_model, d):
    return d.xmat[jnp.array([mj_model.body("upper_arm").id, mj_model.body("lower_arm").id])]


def initialize(mj_model, mjx_model, key, params):
    # dm_control: qpos[['shoulder', 'elbow']] ~ U[-pi, pi)^2; qvel stays zero.
    idx = jnp.array([base.qpos_index(mj_model, "shoulder"), base.qpos_index(mj_model, "elbow")])
    qpos = jnp.zeros(mj_model.nq).at[idx].set(jax.random.uniform(key, (2,), minval=-jnp.pi, maxval=jnp.pi))
    return mjx.make_data(mjx_model).replace(qpos=qpos), {}


def observation(mj_model, d, task_state, params):
    xmat = _arm_xmats(mj_model, d)
    # orientations: [horizontal (xz) of upper, lower arm; vertical (zz) of upper, lower arm]
    return {"orientations": jnp.concatenate([xmat[:, 0, 2], xmat[:, 2, 2]]), "velocity": d.qvel}


def reward(mj_model, d, task_state, params):
    target_radius = float(mj_model.site("target").size[0])
    tip_to_target = d.site_xpos[mj_model.site("target").id] - d.site_xpos[mj_model.site("tip").id]
    return tolerance(jnp.linalg.norm(tip_to_target), bounds=(0.0, target_radius), margin=1.0)


DOMAIN = base.Domain(
    name="acrobot",
    model_and_assets=dm_acrobot.get_model_and_assets,
    control_timestep=0.01,  # dm_control uses the physics timestep (no control_timestep given); 10 s = 1000 steps
    tasks={"swingup": {}},
    edit_xml=base.drop_energy_flag,
    model_changes=("energy computation disabled (MJX does not support it; no effect on dynamics)",),
    initialize=initialize,
    observation=observation,
    reward=reward,
)
