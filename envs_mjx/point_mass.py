"""Point mass: drive a planar point mass to the target at the origin (dm_control `suite/point_mass.py`)."""

import jax.numpy as jnp
from dm_control.suite import point_mass as dm_point_mass
from mujoco import mjx

from envs_mjx import base
from envs_mjx.rewards import tolerance


def initialize(mj_model, mjx_model, key, params):
    # dm_control: randomize_limited_and_rotational_joints (the two limited slides uniform in [-.29, .29]); qvel
    # stays zero. (`hard`'s gain randomisation is not ported: only `easy` is provided.)
    qpos = base.randomize_limited_and_rotational_joints(mj_model, key, jnp.zeros(mj_model.nq))
    return mjx.make_data(mjx_model).replace(qpos=qpos), {}


def observation(mj_model, d, task_state, params):
    return {"position": d.qpos, "velocity": d.qvel}


def reward(mj_model, d, task_state, params):
    target_size = float(mj_model.geom("target").size[0])
    mass_to_target = d.geom_xpos[mj_model.geom("target").id] - d.geom_xpos[mj_model.geom("pointmass").id]
    near_target = tolerance(jnp.linalg.norm(mass_to_target), bounds=(0.0, target_size), margin=target_size)
    control_reward = jnp.mean(tolerance(d.ctrl, margin=1, value_at_margin=0, sigmoid="quadratic"))
    small_control = (control_reward + 4) / 5
    return near_target * small_control


DOMAIN = base.Domain(
    name="point_mass",
    model_and_assets=dm_point_mass.get_model_and_assets,
    control_timestep=0.02,  # dm_control uses the physics timestep (no control_timestep given); 20 s = 1000 steps
    tasks={"easy": {}},
    initialize=initialize,
    observation=observation,
    reward=reward,
)
