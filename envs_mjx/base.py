"""The machinery every domain shares: model loading, the dm_control-faithful physics step, action repeat,
episode bookkeeping, NaN containment and the `Env` object that `make` returns.

A domain module (one small file each, like dm_control's suite) supplies a `Domain`: where its XML is, the
MJX-only physics edits, its tasks' parameters, and three pure functions of `mjx.Data`: `initialize`,
`observation` and `reward`. Everything here is shared by all tasks of a domain, so a trainer can vmap one
compiled step over the tasks of a domain (their parameters travel in the state as data).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from flax import struct
from lxml import etree
from mujoco import mjx

TaskParams = Mapping[str, Any]


@struct.dataclass
class EnvState:
    """One environment's state. Every field is an array, so the whole thing vmaps and scans.

    data:       the `mjx.Data`, with position- and velocity-dependent fields in sync with qpos/qvel (as after
                dm_control's step).
    obs:        float32 [observation_size]: dm_control's observation dict, flattened in its order.
    reward:     float32 []: summed over the action repeat.
    step:       int32 []: agent steps taken in this episode.
    done:       bool []: this step ended the episode (time limit; DMC tasks never terminate early).
    nan:        bool []: the physics went non-finite during this episode. From that step on, `data` stays at
                the last finite state, `obs` and `reward` are zero, and stepping is a no-op until `reset`.
    params:     the task's parameters (float32 scalars or arrays; same structure for every task of a domain).
    task_state: per-episode quantities drawn at reset (targets), an empty dict where a task has none.
    """

    data: mjx.Data
    obs: jax.Array
    reward: jax.Array
    step: jax.Array
    done: jax.Array
    nan: jax.Array
    params: Any
    task_state: Any


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: one compiled model per domain
class Domain:
    """What a domain module declares. The functions receive the static `mujoco.MjModel` (for name lookups at
    trace time) and traced arrays, and must be pure.

    initialize(mj_model, mjx_model, key, params) -> (data, task_state): a fresh episode, following the dm_control
        task's `initialize_episode`. The returned data only needs qpos/qvel/act (and ctrl) set; the base runs the
        forward pass.
    observation(mj_model, data, task_state, params) -> dict of arrays, in dm_control's key order.
    reward(mj_model, data, task_state, params) -> float32 scalar (per control step, as dm_control).
    """

    name: str
    model_and_assets: Callable[[], tuple[str, dict]]  # the dm_control module's own `get_model_and_assets`
    control_timestep: float
    tasks: Mapping[str, TaskParams]
    initialize: Callable
    observation: Callable
    reward: Callable
    time_limit: float = 1000.0  # control steps per episode
    edit_xml: Callable[[etree._Element], None] | None = None  # MJX-only physics edits of the MJCF tree
    model_changes: tuple[str, ...] = ()  # human-readable list of the MJX-only physics edits
    # Parity tests only: copy `task_state` (targets drawn at reset) into a dm_control environment of this domain,
    # inside its `physics.reset_context()`. None where the domain draws no task state.
    sync_dm_control: Callable[[Any, Any], None] | None = None
    # XLA options every program holding this domain's physics must be compiled with (`Env.jit` passes them).
    # Only `xla_cpu_*` options belong here: other backends ignore them.
    compiler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def load_model(model_and_assets: Callable[[], tuple[str, dict]],
               edit_xml: Callable[[etree._Element], None] | None = None) -> mujoco.MjModel:
    """Compile a suite model from the installed dm_control package (its `get_model_and_assets`), after
    applying `edit_xml` to the parsed MJCF tree (the MJX-only physics changes)."""
    xml, assets = model_and_assets()
    if edit_xml is not None:
        root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
        edit_xml(root)
        xml = etree.tostring(root, encoding="unicode")
    return mujoco.MjModel.from_xml_string(xml, assets)


@functools.lru_cache(maxsize=None)
def compile_domain(domain: Domain) -> tuple[mujoco.MjModel, mjx.Model]:
    """The domain's MuJoCo model (after its MJX edits) and its MJX (pure-JAX) counterpart, built once."""
    mj_model = load_model(domain.model_and_assets, domain.edit_xml)
    return mj_model, mjx.put_model(mj_model, impl="jax")


def n_sub_steps(domain: Domain, mj_model: mujoco.MjModel) -> int:
    """Physics steps per control step, computed as dm_control's `compute_n_steps` does."""
    ratio = domain.control_timestep / mj_model.opt.timestep
    n = int(round(ratio))
    if abs(ratio - n) > 1e-6:
        raise ValueError(f"{domain.name}: control timestep {domain.control_timestep} is not a multiple of "
                         f"the physics timestep {mj_model.opt.timestep}.")
    return n


# --------------------------------------------------------------------------------------------- physics step
def _integrate(m: mjx.Model, d: mjx.Data) -> mjx.Data:
    if m.opt.integrator == mjx.IntegratorType.EULER:
        return mjx.euler(m, d)
    if m.opt.integrator == mjx.IntegratorType.RK4:
        return mjx.rungekutta4(m, d)
    if m.opt.integrator == mjx.IntegratorType.IMPLICITFAST:
        return mjx.implicit(m, d)
    raise NotImplementedError(f"integrator {m.opt.integrator} is not supported by MJX")


def _position_velocity_stages(m: mjx.Model, d: mjx.Data) -> mjx.Data:
    d = mjx.fwd_position(m, d)
    d = mjx.sensor_pos(m, d)
    d = mjx.fwd_velocity(m, d)
    return mjx.sensor_vel(m, d)


def _acceleration_stages(m: mjx.Model, d: mjx.Data) -> mjx.Data:
    d = mjx.fwd_actuation(m, d)
    d = mjx.fwd_acceleration(m, d)
    # Same shortcut as mjx.forward: a model with no constraint rows has nothing to solve.
    if d._impl.efc_J.size == 0:  # pylint: disable=protected-access
        return d.replace(qacc=d.qacc_smooth)
    d = mjx.solve(m, d)
    return mjx.sensor_acc(m, d)


def physics_step(m: mjx.Model, d: mjx.Data) -> mjx.Data:
    """One physics step exactly as dm_control's (legacy) `Physics.step` does it: `mj_step2` on data whose
    position and velocity stages are current, then `mj_step1` on the new state. It costs the same as
    `mjx.step`, but leaves kinematics, positional and velocity sensors in sync with the new qpos/qvel (what
    dm_control's observations read), and acceleration sensors (touch, accelerometer, force) from the
    pre-integration state, as dm_control reports them."""
    d = _acceleration_stages(m, d)
    d = _integrate(m, d)
    return _position_velocity_stages(m, d)


def forward_without_actuation(m: mjx.Model, d: mjx.Data) -> mjx.Data:
    """dm_control's `after_reset`: a full forward pass with actuation disabled."""
    opt = m.opt.replace(disableflags=m.opt.disableflags | mjx.DisableBit.ACTUATION)
    return mjx.forward(m.replace(opt=opt), d)


def is_penetrating(d: mjx.Data) -> jax.Array:
    """True when any contact is active, the condition under which dm_control's `initialize_episode` redraws
    (`physics.data.ncon > 0`): MJX keeps a fixed-size contact list, active where dist < includemargin."""
    contact = d._impl.contact  # pylint: disable=protected-access
    if contact.dist.size == 0:
        return jnp.asarray(False)
    return jnp.any(contact.dist < contact.includemargin)


# ------------------------------------------------------------------------------- what every backend shares
def ctrl_bounds(mj_model: mujoco.MjModel) -> tuple[np.ndarray, np.ndarray]:
    """The controls that the agent's actions -1 and +1 map to. dm_control's action spec is the actuators'
    ctrlrange; agents act in [-1, 1] through dm_control's action_scale wrapper (an affine map), which is the
    identity where ctrlrange is already [-1, 1]."""
    ctrlrange = np.asarray(mj_model.actuator_ctrlrange, np.float32)
    limited = np.asarray(mj_model.actuator_ctrllimited, bool)
    return (np.where(limited, ctrlrange[:, 0], -1.0).astype(np.float32),
            np.where(limited, ctrlrange[:, 1], 1.0).astype(np.float32))


def episode_length(domain: Domain, action_repeat: int) -> int:
    """Agent steps per episode of `domain` at `action_repeat`."""
    if not isinstance(action_repeat, int) or isinstance(action_repeat, bool) or action_repeat < 1:
        raise ValueError(f"action_repeat must be a positive int, got {action_repeat!r}")
    control_steps = int(round(domain.time_limit))
    if control_steps % action_repeat:
        raise ValueError(f"action_repeat {action_repeat} does not divide the {control_steps} control steps "
                         f"of a {domain.name} episode")
    return control_steps // action_repeat


def check_action(env_name: str, action_size: int, action) -> jax.Array:
    """`action` as float32 clipped to [-1, 1]; a wrong shape or dtype fails at trace time, naming the env."""
    shape = getattr(action, "shape", None)
    dtype = getattr(action, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{env_name}: action must be an array of shape ({action_size},), got {type(action).__name__}")
    if tuple(shape) != (action_size,):
        raise ValueError(f"{env_name}: action must have shape ({action_size},) (vmap over leading axes), "
                         f"got {tuple(shape)}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{env_name}: action must be floating point in [-1, 1], got dtype {dtype}")
    return jnp.clip(jnp.asarray(action, jnp.float32), -1.0, 1.0)


# ----------------------------------------------------------------------------------------------- the env
def _as_param_arrays(params: TaskParams) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class Env:
    """One task of a domain. `reset` and `step` are pure functions of their arguments (jit- and vmap-able);
    the object only holds static things (models, shapes, the task's default parameters)."""

    def __init__(self, domain: Domain, task: str, action_repeat: int = 1):
        if task not in domain.tasks:
            raise ValueError(f"domain {domain.name!r} has no task {task!r}; tasks: {sorted(domain.tasks)}")
        self.episode_length = episode_length(domain, action_repeat)  # agent steps; checked before compiling
        self.domain = domain
        self.task = task
        self.name = f"{domain.name}-{task}"
        self.action_repeat = action_repeat
        self.mj_model, self.mjx_model = compile_domain(domain)
        self.n_sub_steps = n_sub_steps(domain, self.mj_model)
        self.params = _as_param_arrays(domain.tasks[task])
        self.action_size = int(self.mj_model.nu)
        self._ctrl_low, self._ctrl_high = ctrl_bounds(self.mj_model)
        # Keys are taken outside jax: a dict returned through a transformation comes back with sorted keys,
        # not in dm_control's order, which is the flat observation's layout.
        keys = []

        def observation_values(data, task_state, params):
            obs = self._observation_dict(data, task_state, params)
            keys.extend(obs)
            return list(obs.values())

        shapes = jax.eval_shape(observation_values, self._dummy_data(), self._dummy_task_state(), self.params)
        self.observation_spec = tuple((k, tuple(v.shape)) for k, v in zip(keys, shapes))
        self.observation_size = int(sum(int(np.prod(s)) for _, s in self.observation_spec))
        # Jitted once per Env (and `make` returns one Env per task and action repeat): every program that calls
        # them (a trainer's chunk and evaluation, each spec of a test run) reuses one traced jaxpr of MJX instead
        # of tracing the physics again, which takes seconds to minutes per trace. XLA inlines the calls.
        for name in ("reset", "restore", "step"):
            setattr(self, name, jax.jit(getattr(self, name)))

    def jit(self, fun: Callable, **jit_kwargs) -> Callable:
        """`jax.jit` with the compiler options this domain's physics needs (dog and swimmer on the CPU). Use it, or pass
        `compiler_options=env.domain.compiler_options`, for any program that steps or resets this env."""
        return jax.jit(fun, compiler_options=dict(self.domain.compiler_options) or None, **jit_kwargs)

    def __repr__(self):
        return (f"Env({self.name!r}, action_repeat={self.action_repeat}, obs={self.observation_size}, "
                f"act={self.action_size}, episode_length={self.episode_length})")

    # -- helpers for shapes
    def _dummy_data(self):
        return jax.eval_shape(lambda: mjx.make_data(self.mjx_model))

    def _dummy_task_state(self):
        return jax.eval_shape(lambda k: self.domain.initialize(self.mj_model, self.mjx_model, k, self.params)[1],
                              jax.random.key(0))

    def _observation_dict(self, data, task_state, params):
        return self.domain.observation(self.mj_model, data, task_state, params)

    def _flat_observation(self, data, task_state, params) -> jax.Array:
        obs = self._observation_dict(data, task_state, params)
        return jnp.concatenate([jnp.ravel(jnp.asarray(v, jnp.float32)) for v in obs.values()])

    def task_params(self, task: str) -> dict[str, jax.Array]:
        """Parameters of another task of the same domain, to reset into (vmap over tasks with these)."""
        if task not in self.domain.tasks:
            raise ValueError(f"domain {self.domain.name!r} has no task {task!r}; tasks: {sorted(self.domain.tasks)}")
        return _as_param_arrays(self.domain.tasks[task])

    def ctrl_from_action(self, action: jax.Array) -> jax.Array:
        return self._ctrl_low + (action + 1.0) * 0.5 * (self._ctrl_high - self._ctrl_low)

    # -- the API
    def reset(self, key: jax.Array, params: TaskParams | None = None) -> EnvState:
        """A new episode drawn as the dm_control task's `initialize_episode` draws it. `params` defaults to this
        env's task; pass another task's (from `task_params`) to reset into it."""
        params = self.params if params is None else params
        data, task_state = self.domain.initialize(self.mj_model, self.mjx_model, key, params)
        return self._episode_start(forward_without_actuation(self.mjx_model, data), task_state, params)

    def restore(self, qpos: jax.Array, qvel: jax.Array, act: jax.Array, task_state: Any,
                params: TaskParams | None = None) -> EnvState:
        """The state of a stored physics snapshot (qpos, qvel, act and the episode's task_state), ready to step,
        as dm_control's physics is after `set_state` inside `reset_context`: kinematics and position/velocity
        sensors recomputed. The solver's warm start is not part of the snapshot, so a contact-rich step from a
        restored state agrees with the original step only up to the solver's tolerance."""
        params = self.params if params is None else params
        data = mjx.make_data(self.mjx_model).replace(qpos=qpos, qvel=qvel, act=act)
        return self._episode_start(_position_velocity_stages(self.mjx_model, data), task_state, params)

    def _episode_start(self, data, task_state, params) -> EnvState:
        obs = self._flat_observation(data, task_state, params)
        return EnvState(data=data, obs=obs, reward=jnp.zeros((), jnp.float32), step=jnp.zeros((), jnp.int32),
                        done=jnp.asarray(False), nan=jnp.asarray(False), params=params, task_state=task_state)

    def step(self, state: EnvState, action: jax.Array) -> EnvState:
        """Apply `action` (in [-1, 1]) for `action_repeat` control steps; rewards are summed."""
        action = check_action(self.name, self.action_size, action)
        m, ctrl = self.mjx_model, self.ctrl_from_action(action)

        def control_step(data, _):
            data = data.replace(ctrl=ctrl)
            data = jax.lax.fori_loop(0, self.n_sub_steps, lambda _, d: physics_step(m, d), data)
            return data, self.domain.reward(self.mj_model, data, state.task_state, state.params)

        data, rewards = jax.lax.scan(control_step, state.data, None, length=self.action_repeat)
        obs = self._flat_observation(data, state.task_state, state.params)
        reward = jnp.sum(rewards).astype(jnp.float32)
        finite = _all_finite((data.qpos, data.qvel, data.act, obs, reward))
        nan = state.nan | ~finite
        step = state.step + 1
        return state.replace(
            data=jax.tree.map(lambda new, old: jnp.where(nan, old, new), data, state.data),
            obs=jnp.where(nan, jnp.zeros_like(obs), obs),
            reward=jnp.where(nan, jnp.zeros_like(reward), reward),
            step=step,
            done=step >= self.episode_length,
            nan=nan,
        )


# ------------------------------------------------------------------------------------------ shared helpers
def sensor(mj_model: mujoco.MjModel, d: mjx.Data, name: str) -> jax.Array:
    """The named sensor's reading (dm_control's `physics.named.data.sensordata[name]`)."""
    s = mj_model.sensor(name)
    adr, dim = int(s.adr[0]), int(s.dim[0])
    return d.sensordata[adr:adr + dim]


def qpos_index(mj_model: mujoco.MjModel, joint: str) -> int:
    return int(mj_model.joint(joint).qposadr[0])


def qvel_index(mj_model: mujoco.MjModel, joint: str) -> int:
    return int(mj_model.joint(joint).dofadr[0])


def _axis_angle_quat(axis: jax.Array, angle: jax.Array) -> jax.Array:
    return jnp.concatenate([jnp.cos(angle / 2)[None], jnp.sin(angle / 2) * axis])


def randomize_limited_and_rotational_joints(mj_model: mujoco.MjModel, key: jax.Array, qpos: jax.Array):
    """JAX port of dm_control's `randomizers.randomize_limited_and_rotational_joints` (same distribution):
    limited hinges/slides uniform in range, unlimited hinges uniform in [-pi, pi], ball joints uniform
    quaternions (or within `range[1]` of identity when limited), free joints' orientation from dm_control's
    normalised U[0, 1]^4 (its documented quirk), their position untouched."""
    keys = jax.random.split(key, max(int(mj_model.njnt), 1))
    for j in range(mj_model.njnt):
        # Compare plain ints: numpy integers never equal mujoco's pybind enum members.
        jtype, adr = int(mj_model.jnt_type[j]), int(mj_model.jnt_qposadr[j])
        limited = bool(mj_model.jnt_limited[j])
        lo, hi = (float(x) for x in mj_model.jnt_range[j])
        k1, k2 = jax.random.split(keys[j])
        if jtype in (int(mujoco.mjtJoint.mjJNT_HINGE), int(mujoco.mjtJoint.mjJNT_SLIDE)):
            if limited:
                qpos = qpos.at[adr].set(jax.random.uniform(k1, (), minval=lo, maxval=hi))
            elif jtype == int(mujoco.mjtJoint.mjJNT_HINGE):
                qpos = qpos.at[adr].set(jax.random.uniform(k1, (), minval=-jnp.pi, maxval=jnp.pi))
        elif jtype == int(mujoco.mjtJoint.mjJNT_BALL):
            if limited:
                axis = jax.random.normal(k1, (3,))
                axis = axis / jnp.linalg.norm(axis)
                quat = _axis_angle_quat(axis, jax.random.uniform(k2, ()) * hi)
            else:
                quat = jax.random.normal(k1, (4,))
                quat = quat / jnp.linalg.norm(quat)
            qpos = qpos.at[adr:adr + 4].set(quat)
        elif jtype == int(mujoco.mjtJoint.mjJNT_FREE) and not limited:
            quat = jax.random.uniform(k1, (4,))
            qpos = qpos.at[adr + 3:adr + 7].set(quat / jnp.linalg.norm(quat))
    return qpos


def sample_until_not_penetrating(mjx_model: mjx.Model, key: jax.Array,
                                 sample: Callable[[jax.Array], mjx.Data], max_tries: int = 100):
    """Redraw `sample(key) -> data` until no contact is active, as dm_control's humanoid/finger/quadruped/dog
    `initialize_episode` loops do. Bounded so a vmapped batch cannot spin forever; after `max_tries` the last
    draw is kept (dm_control loops unboundedly, but these tasks succeed within a few draws)."""

    def penetrating(data):
        return is_penetrating(mjx.fwd_position(mjx_model, data))

    def cond(carry):
        i, _, data = carry
        return (i < max_tries) & penetrating(data)

    def body(carry):
        i, key, _ = carry
        key, sub = jax.random.split(key)
        return i + 1, key, sample(sub)

    key, sub = jax.random.split(key)
    _, _, data = jax.lax.while_loop(cond, body, (jnp.asarray(1), key, sample(sub)))
    return data


# ------------------------------------------------------------------------------------------ MJCF edits
def drop_energy_flag(root: etree._Element) -> None:
    """MJX cannot compute energy (`<flag energy="enable"/>`); nothing dm_control's tasks read depends on it."""
    for flag in root.iter("flag"):
        flag.attrib.pop("energy", None)


def set_option(root: etree._Element, **attrs) -> None:
    """Set attributes of `<option>` (e.g. iterations, ls_iterations, solver), creating it if absent."""
    option = root.find("option")
    if option is None:
        option = etree.SubElement(root, "option")
    for k, v in attrs.items():
        option.set(k, str(v))


def exclude_body_pairs(root: etree._Element, bodies: list[str], keep: set[frozenset[str]]) -> list[tuple[str, str]]:
    """Add a contact `<exclude>` for every pair of `bodies` except those in `keep` and parent-child pairs (MuJoCo
    filters those itself): MJX evaluates every candidate geom pair every step, where MuJoCo's broad phase prunes far
    ones, so pairs that can never touch are dropped here. Returns the excluded pairs."""
    parent = {b.get("name"): b.getparent().get("name") for b in root.iter("body")}
    contact = root.find("contact")
    if contact is None:
        contact = etree.SubElement(root, "contact")
    excluded = []
    for i, a in enumerate(bodies):
        for b in bodies[i + 1:]:
            if frozenset((a, b)) in keep or parent.get(a) == b or parent.get(b) == a:
                continue
            etree.SubElement(contact, "exclude", body1=a, body2=b)
            excluded.append((a, b))
    return excluded


def no_collisions(root: etree._Element) -> None:
    """For models whose contacts dm_control already disables (`<flag contact="disable"/>` in swimmer,
    `constraint="disable"` in fish): MJX still builds their geom pairs and refuses to load ellipsoid-box ones.
    Making every geom non-colliding leaves the dynamics exactly as they are."""
    if not any("disable" in (f.get("contact"), f.get("constraint")) for f in root.iter("flag")):
        raise ValueError("no_collisions is only for models whose contacts or constraints are disabled")
    for geom in root.iter("geom"):
        geom.set("contype", "0")
        geom.set("conaffinity", "0")
