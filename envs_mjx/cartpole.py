"""Cartpole: balance and swing up a pole on a cart (dm_control `suite/cartpole.py`, one pole)."""

import jax
import jax.numpy as jnp
from dm_control.suite import cartpole as dm_cartpole
from mujoco import mjx

from envs_mjx import base
from envs_mjx.rewards import tolerance

_CART_RANGE = (-0.25, 0.25)
_ANGLE_COSINE_RANGE = (0.995, 1.0)


def _cart_position(mj_model, d):
    return d.qpos[base.qpos_index(mj_model, "slider")]


def _pole_angle_cosine(d):
    return d.xmat[2:, 2, 2]  # bodies after world and cart: the poles' zz


def initialize(mj_model, mjx_model, key, params):
    nv = mj_model.nv
    k_slider, k_hinge, k_vel = jax.random.split(key, 3)
    qpos_swing = jnp.concatenate([0.01 * jax.random.normal(k_slider, (1,)),
                                  jnp.pi + 0.01 * jax.random.normal(k_hinge, (1,)),
                                  0.1 * jax.random.normal(k_hinge, (nv - 2,))])
    qpos_balance = jnp.concatenate([jax.random.uniform(k_slider, (1,), minval=-0.1, maxval=0.1),
                                    jax.random.uniform(k_hinge, (nv - 1,), minval=-0.034, maxval=0.034)])
    qpos = jnp.where(params["swing_up"] > 0, qpos_swing, qpos_balance)
    qvel = 0.01 * jax.random.normal(k_vel, (nv,))
    return mjx.make_data(mjx_model).replace(qpos=qpos, qvel=qvel), {}


def observation(mj_model, d, task_state, params):
    xmat = d.xmat[2:]
    position = jnp.concatenate([_cart_position(mj_model, d)[None],
                                jnp.stack([xmat[:, 2, 2], xmat[:, 0, 2]], axis=-1).ravel()])
    return {"position": position, "velocity": d.qvel}


def reward(mj_model, d, task_state, params):
    cart_position = _cart_position(mj_model, d)
    pole_angle_cosine = _pole_angle_cosine(d)
    sparse = tolerance(cart_position, _CART_RANGE) * jnp.prod(tolerance(pole_angle_cosine, _ANGLE_COSINE_RANGE))
    upright = (pole_angle_cosine + 1) / 2
    centered = (1 + tolerance(cart_position, margin=2)) / 2
    small_control = (4 + tolerance(d.ctrl, margin=1, value_at_margin=0, sigmoid="quadratic")[0]) / 5
    small_velocity = (1 + jnp.min(tolerance(d.qvel[1:], margin=5))) / 2
    smooth = jnp.mean(upright) * small_control * small_velocity * centered
    return jnp.where(params["sparse"] > 0, sparse, smooth)


DOMAIN = base.Domain(
    name="cartpole",
    model_and_assets=lambda: dm_cartpole.get_model_and_assets(num_poles=1),
    control_timestep=0.01,  # dm_control uses the physics timestep (no control_timestep given)
    tasks={
        "balance": {"swing_up": 0.0, "sparse": 0.0},
        "balance_sparse": {"swing_up": 0.0, "sparse": 1.0},
        "swingup": {"swing_up": 1.0, "sparse": 0.0},
        "swingup_sparse": {"swing_up": 1.0, "sparse": 1.0},
    },
    edit_xml=base.drop_energy_flag,
    model_changes=("energy computation disabled (MJX does not support it; no effect on dynamics)",),
    initialize=initialize,
    observation=observation,
    reward=reward,
)
