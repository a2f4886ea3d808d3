"""Point mass: drive a planar point mass to the target at the origin (dm_control `suite/point_mass.py`)."""

import jax
import jax.numpy as jnp
from dm_control.suite import point_mass as dm_point_mass
from mujoco import mjx

from envs_mjx import base
from envs_mjx.rewards import tolerance


def initialize(mj_model, mjx_model, key, params):
    # dm_control: randomize_limited_and_rotational_joints, which for this model (two limited slides, nothing
    # else) draws each slide uniformly in its range [-.29, .29]; qvel stays zero. Drawn here directly rather
    # than with base.randomize_limited_and_rotational_joints, whose `jnt_type in (HINGE, SLIDE)` test is False
    # for numpy ints (pybind enum equality), so it leaves every hinge and slide at 0.
    # (`hard`'s gain randomisation is not ported: only `easy` is provided.)
    idx = [base.qpos_index(mj_model, j) for j in ("root_x", "root_y")]
    lo = jnp.array([mj_model.joint(j).range[0] for j in ("root_x", "root_y")])
    hi = jnp.array([mj_model.joint(j).range[1] for j in ("root_x", "root_y")])
    qpos = jnp.zeros(mj_model.nq).at[jnp.array(idx)].set(jax.random.uniform(key, (2,), minval=lo, maxval=hi))
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
