"""Finger: a two-link planar finger spins or turns a hinged body (dm_control `suite/finger.py`).

The Spin and Turn tasks observe different keys (Turn adds `target_position` and `dist_to_target`), so they
cannot share one compiled step: this module declares two `Domain`s over the same XML. `DOMAIN` serves
`spin`; `TURN_DOMAIN` serves `turn_easy` and `turn_hard` (which differ only in the target radius, a
parameter). `DOMAINS_BY_TASK` maps each task to its Domain, for the registry.

dm_control's Spin also lowers the spinner's hinge damping from 0.5 to 0.03 in `initialize_episode` (a model
edit that persists for the episode); `DOMAIN` makes the same edit in its XML.
"""

import functools

import jax
import jax.numpy as jnp
import mujoco
from dm_control.suite import finger as dm_finger
from lxml import etree
from mujoco import mjx

from envs_mjx import base

SPIN_HINGE_DAMPING = 0.03  # dm_control's Spin.initialize_episode sets dof_damping['hinge'] to this
_SPIN_VELOCITY = dm_finger._SPIN_VELOCITY  # pylint: disable=protected-access
_XZ = jnp.array([0, 2])


@functools.lru_cache(maxsize=None)
def _target_circle(mj_model: mujoco.MjModel) -> tuple[tuple[float, float], float]:
    """The hinge anchor's (x, z) after reset and the spinner's radius (`geom_size['cap1'].sum()`), from which
    dm_control's Turn places its target."""
    data = mujoco.MjData(mj_model)
    mujoco.mj_forward(mj_model, data)
    anchor = data.xanchor[mj_model.joint("hinge").id]
    radius = float(mj_model.geom_size[mj_model.geom("cap1").id].sum())
    return (float(anchor[0]), float(anchor[2])), radius


def _random_joint_angles(mj_model, mjx_model, key):
    """dm_control's `_set_random_joint_angles`: limited joints uniform in range, the hinge uniform on the
    circle, redrawn until collision-free; velocities zero (as after dm_control's reset)."""
    data0 = mjx.make_data(mjx_model)

    def sample(k):
        return data0.replace(qpos=base.randomize_limited_and_rotational_joints(mj_model, k, data0.qpos))

    return base.sample_until_not_penetrating(mjx_model, key, sample)


def initialize_spin(mj_model, mjx_model, key, params):
    return _random_joint_angles(mj_model, mjx_model, key), {}


def initialize_turn(mj_model, mjx_model, key, params):
    k_target, k_joints = jax.random.split(key)
    (hinge_x, hinge_z), radius = _target_circle(mj_model)
    angle = jax.random.uniform(k_target, (), minval=-jnp.pi, maxval=jnp.pi)
    target = jnp.stack([hinge_x + radius * jnp.sin(angle), hinge_z + radius * jnp.cos(angle)])
    return _random_joint_angles(mj_model, mjx_model, k_joints), {"target": target}


def _tip_position(mj_model, d):
    return base.sensor(mj_model, d, "tip")[_XZ] - base.sensor(mj_model, d, "spinner")[_XZ]


def _target_position(mj_model, d, task_state):
    # The target site is in the worldbody, so its sensor reads `site_pos`: here the episode's drawn target.
    return task_state["target"] - base.sensor(mj_model, d, "spinner")[_XZ]


def _dist_to_target(mj_model, d, task_state, params):
    to_target = _target_position(mj_model, d, task_state) - _tip_position(mj_model, d)
    return jnp.linalg.norm(to_target) - params["target_radius"]


def _common_observation(mj_model, d):
    s = functools.partial(base.sensor, mj_model, d)
    return {
        "position": jnp.concatenate([s("proximal"), s("distal"), _tip_position(mj_model, d)]),
        "velocity": jnp.concatenate([s("proximal_velocity"), s("distal_velocity"), s("hinge_velocity")]),
        "touch": jnp.log1p(jnp.concatenate([s("touchtop"), s("touchbottom")])),
    }


def observation_spin(mj_model, d, task_state, params):
    return _common_observation(mj_model, d)


def observation_turn(mj_model, d, task_state, params):
    obs = _common_observation(mj_model, d)
    obs["target_position"] = _target_position(mj_model, d, task_state)
    obs["dist_to_target"] = _dist_to_target(mj_model, d, task_state, params)
    return obs


def reward_spin(mj_model, d, task_state, params):
    return (base.sensor(mj_model, d, "hinge_velocity")[0] <= -_SPIN_VELOCITY).astype(jnp.float32)


def reward_turn(mj_model, d, task_state, params):
    return (_dist_to_target(mj_model, d, task_state, params) <= 0).astype(jnp.float32)


def sync_turn(dm_env, task_state):
    """Parity tests: write the episode's target into dm_control's model, where its Turn task keeps it."""
    physics = dm_env.physics
    physics.named.model.site_pos["target", ["x", "z"]] = task_state["target"]
    physics.named.model.site_size["target", 0] = dm_env.task._target_radius  # pylint: disable=protected-access


# Body pairs whose geoms can never touch: the ground lies below everything's reach (the finger's lowest
# point stays >= 0.029 above it, the spinner's >= 0.23), and the proximal link (reach x <= 0) cannot meet the
# spinner (x >= 0.07). Only the fingertip meets the spinner.
_NEVER_IN_CONTACT = (("world", "proximal"), ("world", "distal"), ("world", "spinner"), ("proximal", "spinner"))
MODEL_CHANGES = (
    "collision checks limited to fingertip-cap1 and fingertip-cap2: contact excludes for the body pairs "
    "world-proximal, world-distal, world-spinner, proximal-spinner (geometrically never in contact)",
    "spinner_decoration cylinder made non-colliding (it lies inside the spinner's capsules: the fingertip would "
    "have to sink >= 2 cm into a capsule to reach it; never seen in dm_control rollouts)",
)


def prune_collisions(root):
    """MJX evaluates every candidate geom pair every step (15 pairs here, 5 of them cylinder-capsule or
    cylinder-plane through the general convex path); MuJoCo prunes far pairs in its broad phase. Keep the two
    pairs that ever touch."""
    contact = root.find("contact")
    if contact is None:
        contact = etree.SubElement(root, "contact")
    for body1, body2 in _NEVER_IN_CONTACT:
        etree.SubElement(contact, "exclude", body1=body1, body2=body2)
    for geom in root.iter("geom"):
        if geom.get("name") == "spinner_decoration":
            geom.set("contype", "0")
            geom.set("conaffinity", "0")


def _spin_edit_xml(root):
    prune_collisions(root)
    for joint in root.iter("joint"):
        if joint.get("name") == "hinge":
            joint.set("damping", str(SPIN_HINGE_DAMPING))


DOMAIN = base.Domain(
    name="finger",
    model_and_assets=dm_finger.get_model_and_assets,
    control_timestep=dm_finger._CONTROL_TIMESTEP,  # pylint: disable=protected-access
    tasks={"spin": {}},
    edit_xml=_spin_edit_xml,
    model_changes=MODEL_CHANGES + (f"hinge damping {SPIN_HINGE_DAMPING} (not an MJX change: dm_control's Spin "
                                   "task sets it in initialize_episode)",),
    initialize=initialize_spin,
    observation=observation_spin,
    reward=reward_spin,
)

TURN_DOMAIN = base.Domain(
    name="finger",
    model_and_assets=dm_finger.get_model_and_assets,
    control_timestep=dm_finger._CONTROL_TIMESTEP,  # pylint: disable=protected-access
    tasks={
        "turn_easy": {"target_radius": dm_finger._EASY_TARGET_SIZE},  # pylint: disable=protected-access
        "turn_hard": {"target_radius": dm_finger._HARD_TARGET_SIZE},  # pylint: disable=protected-access
    },
    edit_xml=prune_collisions,
    model_changes=MODEL_CHANGES,
    initialize=initialize_turn,
    observation=observation_turn,
    reward=reward_turn,
    sync_dm_control=sync_turn,
)

DOMAINS_BY_TASK = {"spin": DOMAIN, "turn_easy": TURN_DOMAIN, "turn_hard": TURN_DOMAIN}
