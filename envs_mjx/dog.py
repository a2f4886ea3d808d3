"""Dog: stand, walk, trot and run with dm_control's 38-actuator dog (dm_control `suite/dog.py`).

The four tasks share one model: dm_control builds each with `get_model_and_assets(floor_size=speed * 15)`, and
the floor size is the only difference between the compiled models (a plane collides as an infinite plane, so
only rendering sees it). Stand is Move without the forward-speed factor; the tasks' differences are data
(`move_speed`, `move`).

dm_control's dog does not load into MJX as shipped; see `MODEL_CHANGES` and docs/envs/dog.md for what is
changed and the measured effect of each change.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from dm_control.suite import dog as dm_dog
from lxml import etree
from mujoco import mjx

from envs_mjx import base, xla_flags
from envs_mjx.rewards import tolerance

_TIME_LIMIT_S = dm_dog._DEFAULT_TIME_LIMIT  # 15 s = 1000 control steps of 0.015 s
_CONTROL_TIMESTEP = dm_dog._CONTROL_TIMESTEP
# The largest floor of the four tasks (run: 9 m/s * 15 s); floor size has no effect on the physics.
_FLOOR_SIZE = dm_dog._RUN_SPEED * _TIME_LIMIT_S
_STAND_HEIGHT_FRACTION = dm_dog._STAND_HEIGHT_FRACTION
_MIN_UPRIGHT_COSINE = float(dm_dog._MIN_UPRIGHT_COSINE)


# ------------------------------------------------------------------------------------------- model changes
# MJX has no ellipsoid-box collision function, and its ellipsoid collisions against anything but a plane are
# iterative SDF optimisations (slow to compile and to run). dm_control's dog has 44 colliding ellipsoids: the
# torso, the skull, and 42 teeth (millimetre-sized, condim 6, there to bite the ball in `fetch`, which is not
# ported). Measured with C MuJoCo (docs/envs/dog.md), the changes below make it load with the least effect:
#   1. the teeth do not collide (contype = conaffinity = 0; skull and jaw have explicit inertials, so no mass
#      changes): removes 2856 of the 5557 geom pairs, all the condim-6 ones; its effect on the four tasks is
#      at the level of a float32 rounding of the state (making them capsules instead measures the same and
#      keeps twice the pairs);
#   2. the remaining ellipsoid-box pairs (torso vs head/jaw/paw boxes, skull vs paw/scapula boxes) are removed
#      from collision by giving ellipsoids and boxes disjoint contype/conaffinity bits (every other geom keeps
#      both bits), which drops exactly those pairs and no other;
#   3. noslip_iterations 4 -> 0 (MJX has no noslip solver).
# Replacing the torso or skull ellipsoid instead (by a capsule or a sphere) costs 15-30x more divergence.
_ELLIPSOID, _BOX = int(mujoco.mjtGeom.mjGEOM_ELLIPSOID), int(mujoco.mjtGeom.mjGEOM_BOX)


def _colliding(model, g) -> bool:
    return bool(model.geom_contype[g] or model.geom_conaffinity[g])


def _teeth(model) -> list[str]:
    """The geoms of dm_control's `tooth_primitive` class: colliding ellipsoids with priority 2 on skull/jaw."""
    heads = {model.body("skull").id, model.body("jaw").id}
    return [model.geom(g).name for g in range(model.ngeom)
            if _colliding(model, g) and model.geom_type[g] == _ELLIPSOID and model.geom_priority[g] == 2
            and model.geom_bodyid[g] in heads]


def _teeth_do_not_collide(root: etree._Element, model: mujoco.MjModel) -> None:
    teeth = set(_teeth(model))
    for el in root.iter("body"):  # masses come from explicit inertials, not from the teeth
        if el.get("name") in ("skull", "jaw") and el.find("inertial") is None:
            raise ValueError(f"dog body {el.get('name')!r} has no explicit inertial: re-derive the edit")
    for el in root.iter("geom"):
        if el.get("name") in teeth:
            el.set("contype", "0")
            el.set("conaffinity", "0")


def _drop_ellipsoid_box_pairs(root: etree._Element, model: mujoco.MjModel) -> None:
    for el in root.iter("geom"):
        name = el.get("name")
        if name is None:
            continue
        g = model.geom(name).id
        if not _colliding(model, g):
            continue
        contype, conaffinity, gtype = int(model.geom_contype[g]), int(model.geom_conaffinity[g]), model.geom_type[g]
        if contype & ~1 or conaffinity & ~1:
            raise ValueError(f"dog geom {name!r} uses contype/conaffinity bits beyond bit 0; re-derive the edit")
        if gtype == _ELLIPSOID:  # bit 1 only
            contype, conaffinity = contype << 1, conaffinity << 1
        elif gtype != _BOX:  # bits 0 and 1: collide with both ellipsoids and boxes, as before
            contype, conaffinity = contype * 3, conaffinity * 3
        el.set("contype", str(contype))
        el.set("conaffinity", str(conaffinity))


def _compile(root: etree._Element) -> mujoco.MjModel:
    _, assets = dm_dog.get_model_and_assets(floor_size=_FLOOR_SIZE)
    return mujoco.MjModel.from_xml_string(etree.tostring(root, encoding="unicode"), assets)


# MJX speed settings (C MuJoCo ignores the first two; the third is the same arithmetic). None: MJX's default.
# See docs/envs/dog.md for their measured effect.
# - max_geom_pairs: per collision-function group, only the K pairs whose bounding spheres are closest reach the
#   narrow phase. Exact while no group has more than K overlapping bounding spheres: at most 125 seen (capsule-
#   capsule) in 4000 random-action control steps of C MuJoCo; the groups are 1142, 660, 531, 139 and <= 91 pairs.
# - max_contact_points: per condim, only the K deepest contacts enter the solver (3404 potential contacts ->
#   128). Exact while at most K are active: at most 27 per condim seen in the same C rollouts.
# - dense mass matrix: MJX would pick its sparse path for nv >= 60.
# - solver iterations 100 -> 10, line-search iterations 50 -> 8: caps, not a coarser solve. In float64 C MuJoCo
#   the Newton solve takes 4 iterations on average (at most 12, 99th percentile 8) in 7200 random-action physics
#   steps; MJX's float32 solve gives bit-identical accelerations with 10/8 and with 100/50 on 64 states sampled
#   from such rollouts (6/6 does not). Under vmap every lane runs the slowest lane's iterations, and each of
#   them every line-search step; the caps cut a batch-64 forward pass on those states from 378 to 239 ms (CPU).
MAX_GEOM_PAIRS = 192
MAX_CONTACT_POINTS = 64
JACOBIAN = "dense"
SOLVER_ITERATIONS = 10
LS_ITERATIONS = 8


def edit_xml(root: etree._Element) -> None:
    _teeth_do_not_collide(root, _compile(root))
    _drop_ellipsoid_box_pairs(root, _compile(root))
    base.set_option(root, noslip_iterations=0)  # MJX has no noslip solver
    options = {"iterations": SOLVER_ITERATIONS, "ls_iterations": LS_ITERATIONS, "jacobian": JACOBIAN}
    base.set_option(root, **{k: v for k, v in options.items() if v is not None})
    numerics = {"max_geom_pairs": MAX_GEOM_PAIRS, "max_contact_points": MAX_CONTACT_POINTS}
    numerics = {k: v for k, v in numerics.items() if v is not None}
    if numerics:
        custom = root.find("custom")
        if custom is None:
            custom = etree.SubElement(root, "custom")
        for k, v in numerics.items():
            etree.SubElement(custom, "numeric", name=k, data=str(v))


MODEL_CHANGES = (
    "the 42 tooth ellipsoids (mm-sized, condim 6, for fetch's ball) do not collide; skull and jaw masses and "
    "inertias are explicit in dm_control's XML, so unchanged",
    "the remaining ellipsoid-box geom pairs (torso vs head/jaw/paw boxes, skull vs scapula/paw boxes) are "
    "removed from collision via contype/conaffinity bits: MJX has no ellipsoid-box collision function",
    "noslip_iterations 4 -> 0: MJX has no noslip solver",
)


# ------------------------------------------------------------------------------------------------ the task
@functools.lru_cache(maxsize=None)
def _constants(mj_model: mujoco.MjModel):
    """What dm_control's `initialize_episode` measures at the default pose: the stand heights (torso, pelvis)
    and the body weight."""
    d = mujoco.MjData(mj_model)
    mujoco.mj_forward(mj_model, d)
    torso, pelvis = mj_model.body("torso").id, mj_model.body("pelvis").id
    stand_height = np.array([d.xpos[torso, 2], d.xpos[pelvis, 2]]) * _STAND_HEIGHT_FRACTION
    body_weight = -mj_model.opt.gravity[2] * mj_model.body_subtreemass[torso]
    return stand_height.astype(np.float32), np.float32(body_weight)


def _hinges(mj_model):
    hinge = mj_model.jnt_type == mujoco.mjtJoint.mjJNT_HINGE
    return np.asarray(mj_model.jnt_qposadr[hinge]), np.asarray(mj_model.jnt_dofadr[hinge])


def _body_ids(mj_model, names):
    return np.array([mj_model.body(n).id for n in names])


def _sensors(mj_model, d, names):
    return jnp.concatenate([base.sensor(mj_model, d, n) for n in names])


def _torso_pelvis_height(mj_model, d):
    return d.xpos[_body_ids(mj_model, ("torso", "pelvis")), 2]


def _z_projection(mj_model, d):
    return d.xmat[_body_ids(mj_model, ("skull", "torso", "pelvis")), 2, :]  # rows 'zx', 'zy', 'zz'


def _torso_com_velocity(mj_model, d):
    torso_frame = d.xmat[mj_model.body("torso").id]
    return base.sensor(mj_model, d, "torso_linvel") @ torso_frame


def initialize(mj_model, mjx_model, key, params):
    """dm_control's `Stand.initialize_episode`: default pose, uniform heading, N(0, 2^2) horizontal root
    velocities and yaw rate, uniform actuator states. (No joint randomisation and no penetration check.)"""
    k_azimuth, k_vel, k_act = jax.random.split(key, 3)
    azimuth = jax.random.uniform(k_azimuth, (), minval=0.0, maxval=2 * jnp.pi)
    root = base.qpos_index(mj_model, "root")
    qpos = jnp.asarray(mj_model.qpos0, jnp.float32)
    qpos = qpos.at[root + 3:root + 7].set(jnp.stack([jnp.cos(azimuth / 2), 0.0, 0.0, jnp.sin(azimuth / 2)]))
    qvel = jnp.zeros(mj_model.nv, jnp.float32).at[jnp.array([0, 1, 5])].set(2 * jax.random.normal(k_vel, (3,)))
    ctrlrange = np.asarray(mj_model.actuator_ctrlrange, np.float32)
    act = jax.random.uniform(k_act, (mj_model.na,), minval=ctrlrange[:, 0], maxval=ctrlrange[:, 1])
    return mjx.make_data(mjx_model).replace(qpos=qpos, qvel=qvel, act=act), {}


def observation(mj_model, d, task_state, params):
    qpos_adr, dof_adr = _hinges(mj_model)
    return {
        "joint_angles": d.qpos[qpos_adr],
        "joint_velocites": d.qvel[dof_adr],  # sic: dm_control's key
        "torso_pelvis_height": _torso_pelvis_height(mj_model, d),
        "z_projection": _z_projection(mj_model, d).ravel(),
        "torso_com_velocity": _torso_com_velocity(mj_model, d),
        "inertial_sensors": _sensors(mj_model, d, ("accelerometer", "velocimeter", "gyro")),
        "foot_forces": _sensors(mj_model, d, ("foot_L", "foot_R", "hand_L", "hand_R")),
        "touch_sensors": _sensors(mj_model, d, ("palm_L", "palm_R", "sole_L", "sole_R")),
        "actuator_state": d.act,
    }


def reward(mj_model, d, task_state, params):
    stand_height, body_weight = _constants(mj_model)
    height = _torso_pelvis_height(mj_model, d)
    torso = tolerance(height[0], bounds=(float(stand_height[0]), float("inf")), margin=float(stand_height[0]))
    pelvis = tolerance(height[1], bounds=(float(stand_height[1]), float("inf")), margin=float(stand_height[1]))
    upright = tolerance(_z_projection(mj_model, d)[:, 2], bounds=(_MIN_UPRIGHT_COSINE, float("inf")),
                        sigmoid="linear", margin=_MIN_UPRIGHT_COSINE + 1, value_at_margin=0)
    touch_sum = jnp.sum(_sensors(mj_model, d, ("palm_L", "palm_R", "sole_L", "sole_R")))
    touch = tolerance(touch_sum, bounds=(float(body_weight), float("inf")), margin=float(body_weight),
                      sigmoid="linear", value_at_margin=0.9)
    standing = torso * pelvis * jnp.prod(upright) * touch
    speed = params["move_speed"]
    forward = tolerance(_torso_com_velocity(mj_model, d)[0], bounds=(speed, 2 * speed),
                        margin=jnp.maximum(1.0, speed), value_at_margin=0, sigmoid="linear")
    move = (4 * forward + 1) / 5
    return jnp.where(params["move"] > 0, standing * move, standing)


DOMAIN = base.Domain(
    name="dog",
    model_and_assets=lambda: dm_dog.get_model_and_assets(floor_size=_FLOOR_SIZE),
    control_timestep=_CONTROL_TIMESTEP,
    tasks={
        "stand": {"move": 0.0, "move_speed": 0.0},
        "walk": {"move": 1.0, "move_speed": float(dm_dog._WALK_SPEED)},
        "trot": {"move": 1.0, "move_speed": float(dm_dog._TROT_SPEED)},
        "run": {"move": 1.0, "move_speed": float(dm_dog._RUN_SPEED)},
    },
    edit_xml=edit_xml,
    model_changes=MODEL_CHANGES,
    # Without them a vmapped step did not compile in 10 minutes on a 2-core CPU (docs/envs/dog.md).
    compiler_options=xla_flags.LEGACY_CPU_FUSION_EMITTERS,
    initialize=initialize,
    observation=observation,
    reward=reward,
)
