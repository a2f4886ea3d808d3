"""Humanoid: a 21-actuator humanoid learns to stand, walk and run (dm_control `suite/humanoid.py`).

The three tasks share one model and differ only in `move_speed` (0 for stand, which switches the reward's
movement term to "don't move"), carried as data so that one compiled step serves all of them.
"""

import jax.numpy as jnp
from dm_control.suite import humanoid as dm_humanoid
from lxml import etree
from mujoco import mjx

from envs_mjx import base
from envs_mjx.rewards import tolerance

_STAND_HEIGHT = dm_humanoid._STAND_HEIGHT  # pylint: disable=protected-access
_EXTREMITIES = ("left_hand", "left_foot", "right_hand", "right_foot")  # dm_control's order: side, then limb


def _body(mj_model, name: str) -> int:
    return int(mj_model.body(name).id)


def _head_height(mj_model, d):
    return d.xpos[_body(mj_model, "head"), 2]


def _torso_frame(mj_model, d):
    return d.xmat[_body(mj_model, "torso")]


def _com_velocity(mj_model, d):
    return base.sensor(mj_model, d, "torso_subtreelinvel")


def initialize(mj_model, mjx_model, key, params):
    """dm_control's `initialize_episode`: redraw `randomize_limited_and_rotational_joints` (every hinge of the
    humanoid is limited and redrawn, the free joint gets a random orientation at the default position) until
    the pose has no contact (about 3 draws in 4 are accepted); velocities are zero."""
    blank = mjx.make_data(mjx_model)

    def sample(k):
        return blank.replace(qpos=base.randomize_limited_and_rotational_joints(mj_model, k, mjx_model.qpos0))

    return base.sample_until_not_penetrating(mjx_model, key, sample), {}


def observation(mj_model, d, task_state, params):
    torso = _body(mj_model, "torso")
    frame, torso_pos = d.xmat[torso], d.xpos[torso]
    limbs = jnp.array([_body(mj_model, n) for n in _EXTREMITIES])
    extremities = ((d.xpos[limbs] - torso_pos) @ frame).ravel()
    return {
        "joint_angles": d.qpos[7:],
        "head_height": _head_height(mj_model, d),
        "extremities": extremities,
        "torso_vertical": frame[2],  # zx, zy, zz
        "com_velocity": _com_velocity(mj_model, d),
        "velocity": d.qvel,
    }


def reward(mj_model, d, task_state, params):
    standing = tolerance(_head_height(mj_model, d), bounds=(_STAND_HEIGHT, float("inf")), margin=_STAND_HEIGHT / 4)
    upright = tolerance(_torso_frame(mj_model, d)[2, 2], bounds=(0.9, float("inf")), sigmoid="linear",
                        margin=1.9, value_at_margin=0)
    stand_reward = standing * upright
    small_control = tolerance(d.ctrl, margin=1, value_at_margin=0, sigmoid="quadratic").mean()
    small_control = (4 + small_control) / 5
    horizontal_velocity = _com_velocity(mj_model, d)[:2]
    dont_move = tolerance(horizontal_velocity, margin=2).mean()
    speed = params["move_speed"]
    moving = speed > 0
    safe_speed = jnp.where(moving, speed, 1.0)  # the stand task never reads `move`; keep it finite anyway
    move = tolerance(jnp.linalg.norm(horizontal_velocity), bounds=(safe_speed, float("inf")), margin=safe_speed,
                     value_at_margin=0, sigmoid="linear")
    move = (5 * move + 1) / 6
    return small_control * stand_reward * jnp.where(moving, move, dont_move)


# MJX-only edits (measured with and without in docs/envs/humanoid.md).
_SOLVER_ITERATIONS = 10  # Newton; MuJoCo's float64 solve needs <= 8, MJX's float32 one <= 10 (measured)
_LINESEARCH_ITERATIONS = 8  # real line searches take <= 7; the rest are float32 bisection to no avail (~24)
_MAX_CONTACT_POINTS = 16  # per condim group; at most 12 floor / 9 self contacts active at once (measured)
_OBSERVED_SENSOR = "torso_subtreelinvel"


def _drop_unused_sensors(root):
    """Only `torso_subtreelinvel` is read (com_velocity); the other 37 sensors (touch, force, torque,
    accelerometer, velocimeter, gyro) cost a pass over contacts and bodies every physics step."""
    for sensors in root.iter("sensor"):
        for s in list(sensors):
            if s.get("name") != _OBSERVED_SENSOR:
                sensors.remove(s)


def _limit_contact_points(root, n):
    """MJX's `max_contact_points` custom numeric: keep the `n` deepest contacts of each condim group (floor
    contacts are condim 3, self-collisions condim 1) instead of all 35 floor and 142 self-collision candidates.
    Only inactive contacts are dropped while no more than `n` are active."""
    custom = root.find("custom")
    if custom is None:
        custom = etree.SubElement(root, "custom")
    etree.SubElement(custom, "numeric", name="max_contact_points", data=str(n))


def edit_xml(root):
    base.drop_energy_flag(root)
    _drop_unused_sensors(root)
    _limit_contact_points(root, _MAX_CONTACT_POINTS)
    base.set_option(root, iterations=_SOLVER_ITERATIONS, ls_iterations=_LINESEARCH_ITERATIONS)


DOMAIN = base.Domain(
    name="humanoid",
    model_and_assets=dm_humanoid.get_model_and_assets,
    control_timestep=dm_humanoid._CONTROL_TIMESTEP,  # pylint: disable=protected-access
    tasks={
        "stand": {"move_speed": 0.0},
        "walk": {"move_speed": float(dm_humanoid._WALK_SPEED)},  # pylint: disable=protected-access
        "run": {"move_speed": float(dm_humanoid._RUN_SPEED)},  # pylint: disable=protected-access
    },
    edit_xml=edit_xml,
    model_changes=(
        "energy computation disabled (MJX does not support it; no effect on dynamics)",
        "sensors other than torso_subtreelinvel removed (unobserved; no effect on dynamics or observations)",
        f"max_contact_points={_MAX_CONTACT_POINTS}: constraint rows 303 -> 101 (the deepest {_MAX_CONTACT_POINTS} "
        "floor and self contacts are kept; exact while no more are active)",
        f"solver iterations 100 -> {_SOLVER_ITERATIONS}, ls_iterations 50 -> {_LINESEARCH_ITERATIONS} (caps above what "
        "converging solves use; under vmap MJX runs every line-search iteration)",
    ),
    initialize=initialize,
    observation=observation,
    reward=reward,
)
