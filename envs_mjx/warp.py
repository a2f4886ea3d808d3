"""The Warp backend: the same tasks on MJX's MuJoCo Warp implementation (`mjx.put_model(m, impl="warp")`), with
dm_control's models as shipped (no MJX-only edits: dog keeps its ellipsoid collisions and noslip, cheetah and
quadruped their self-collisions).

    env = envs_mjx.warp.make_warp("dog-run", action_repeat=2)
    state = env.reset(jax.random.key(0))
    state = env.step(state, action)

`WarpEnv` has `Env`'s API (it subclasses it); only the physics calls differ. Warp offers `mjx.step`, `mjx.forward`
and a few stages, not MJX-JAX's per-stage functions, so:

Observation timing. A dm_control control step (its legacy step: `mj_step2`, then `mj_step1`) leaves kinematics and
position/velocity sensors of the *new* state and acceleration-stage sensors (touch, accelerometer, force, torque)
from the last substep's pre-integration forward pass. Here each control step runs its substeps as plain
`mjx.step` calls (C MuJoCo's `mj_step`), then one `mjx.forward` of the new state (the observation pass), whose
acceleration-stage sensor rows are replaced by those of the last substep. The carried data is that forward's,
except for the fields a step reads that a forward does not rewrite (the solver warm start, the overflow flags),
which are the step's: stepping it is bitwise the same as chaining `mjx.step` (tests/test_warp.py checks this).
The observation pass costs one forward per control step, i.e. (n + 1) / n Warp calls for n substeps; Warp has
a fixed cost per call on the CPU (an FFI callback), so at small batches that is nearly the whole price. See
MEASURED below.

Resets. dm_control's `initialize_episode`s are ported in the domain modules as JAX functions; those that only
draw a state, or that need only kinematics (quadruped's lowest non-penetrating height), run unchanged here with
MJX-JAX on the domain's MJX model (the same draws, key for key, as the JAX backend), and the drawn qpos, qvel and
act are put into Warp data. Redraw-while-penetrating loops (humanoid, finger, ball_in_cup) use the domain's
MJX-JAX collision for the check: humanoid's model has no collision edits, ball_in_cup's only drops the cup-ground
pair (never in contact); finger's pruned pairs are not re-checked against dm_control here.
Cheetah settles for 200 physics steps with zero control: that runs on Warp with the unchanged model, its first
step on the stale stages of qpos0 as dm_control's legacy step does it (`_cheetah_initialize`). After the draw,
dm_control's `after_reset` (a forward pass with actuation disabled) runs on Warp.

Pools and overflow. Warp's contact pool is shared by all worlds of a batch and sized when the data is made;
constraint rows are `njmax` per world. A `WarpEnv` sizes the contact pool for `worlds` worlds (per-world
capacity `nconmax`); exceeding either is never silent: the step sets `overflow` (and `nan`, so every consumer of
`nan` treats the lane as invalid), freezes the lane at its last good state and zeroes its observation and reward,
exactly as a non-finite state is contained. (Warp also prints a warning.) A contact-pool overflow flags every
lane of the batch: which worlds lost contacts is not recorded.

Batching. Warp's batching rules keep the contact pool and its counters without a batch axis: one vmapped call
shares them among its worlds, and every step rebuilds them. A `WarpEnvState` therefore carries only the per-world
fields (its data's Warp part is a plain dict of them, so every leaf has the caller's batch axes and the state can
be reshaped, stacked and checkpointed like any other); each call starts from the template's pool. Any vmap works, nested or over several axes flattened into one, as the trainer
does; `worlds` must cover the product of the axes of one call.

float32 only, as Warp.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import warp
from flax import struct
from lxml import etree
from mujoco import mjx
from mujoco.mjx.warp import types as warp_types

from envs_mjx import base
from envs_mjx.base import Domain, Env, EnvState, TaskParams
from envs_mjx.registry import get_domain, split_name

warp.config.log_level = warp.LOG_WARNING  # a run's output stays the trainer's: no banner, no line per kernel module

MEASURED = """\
2-core CPU, mujoco-mjx 3.17.0, warp-lang 1.19.0, `python -m envs_mjx.warp cheetah-run dog-run --batch 1 10
--steps 30` (physics steps/s summed over the batch, jitted lax.scan of vmapped steps; +-20% noise):
                         with the observation pass   plain mjx.step substeps
    cheetah, batch 1              38                          77       (1 substep: 2 calls vs 1)
    cheetah, batch 10            346                         726
    dog, batch 1                  19                          28       (3 substeps: 4 calls vs 3)
    dog, batch 10                149                         163
First call of a rollout program (XLA compile + one 30-step run): 2-14 s. Kernel build on a cold ~/.cache/warp:
about 45 s per model (cheetah's first step call, 45.5 s), once per machine.
Dog, 100 control steps from the same state with the same random actions, against C MuJoCo (float64): max |qpos|
difference 3e-6 for the first 12 steps, then 6e-5 to 3e-3 jumps at contact onsets (paw fingers touching down)
and 0.1 by step 100; mean |reward diff| 1.8e-4. C MuJoCo against itself with qpos perturbed by 1e-6: 2.5e-5 at
step 10, 2e-2 at step 50, 8e-2 at step 100; mean |reward diff| 4.8e-5. The jumps come from the constraint solve
at contact onset: contacts and constraint rows are the same, smooth forces agree to 1e-4 (qacc_smooth to 7e-2), but the light finger and wrist
bodies make the solve ill-conditioned, and Warp's float32 Newton solve ends ~240 rad/s^2 away in those dofs
even when warm-started at C's converged answer (C itself is that far apart after 4 of its 6 iterations).
Disabling noslip in both changes nothing (1e-4 mean |reward diff|)."""

# Overflow bits that mean lost contacts or constraint rows. ITERATIONS / LS_ITERATIONS (solver caps reached)
# are not pool overflows: C MuJoCo stops at the same caps.
_POOL_OVERFLOW_BITS = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) \
    | (1 << 8) | (1 << 11)

# Per-world pool sizes where Warp's defaults (48 contacts, 64 constraint rows) are too small. dm_control
# rollouts (2 x 300 random-action control steps, C MuJoCo) peak at dog: 25 contacts / 99 rows; Warp keeps every
# contact inside the margin of all candidate pairs, so it needs more (default 64 rows overflow at dog's resets).
_POOL_SIZES = {"dog": {"nconmax": 128, "njmax": 512}}

# Model edits Warp itself needs, per domain; every other domain's XML loads as shipped.
_ENERGY = ("energy computation disabled (Warp refuses `<flag energy=\"enable\"/>`; nothing observed depends on it)",)
_WARP_EDITS: dict[str, Callable[[etree._Element], None]] = {
    d: base.drop_energy_flag for d in ("acrobot", "cartpole", "pendulum")}
_WARP_MODEL_CHANGES: dict[str, tuple[str, ...]] = {d: _ENERGY for d in _WARP_EDITS}


@struct.dataclass
class WarpEnvState(EnvState):
    """`EnvState` plus `overflow`: a Warp contact or constraint pool overflowed during this episode. An
    overflowed lane is also flagged `nan` (frozen, zero observation and reward, a no-op until reset)."""

    overflow: jax.Array = None


@dataclasses.dataclass(frozen=True)
class _Models:
    mj_model: mujoco.MjModel
    warp: mjx.Model
    warp_no_actuation: mjx.Model


@functools.lru_cache(maxsize=None)
def compile_warp_domain(domain: Domain) -> _Models:
    """dm_control's model for `domain` as shipped (plus any edit Warp itself needs), on Warp, with and without
    actuation (dm_control's reset-time forward pass)."""
    mj_model = base.load_model(domain.model_and_assets, _WARP_EDITS.get(domain.name))
    warp = mjx.put_model(mj_model, impl="warp")
    opt = warp.opt.replace(disableflags=warp.opt.disableflags | mjx.DisableBit.ACTUATION)
    return _Models(mj_model, warp, warp.replace(opt=opt))


def _acc_sensor_rows(mj_model: mujoco.MjModel) -> np.ndarray:
    rows = []
    for s in range(mj_model.nsensor):
        if int(mj_model.sensor_needstage[s]) == int(mujoco.mjtStage.mjSTAGE_ACC):
            adr, dim = int(mj_model.sensor_adr[s]), int(mj_model.sensor_dim[s])
            rows.extend(range(adr, adr + dim))
    return np.asarray(rows, np.int32)


def _check_same_state_layout(warp_model: mujoco.MjModel, jax_model: mujoco.MjModel, name: str) -> None:
    """The JAX-side initializer draws qpos/qvel/act on the domain's MJX model: its state layout must be the
    Warp model's."""
    for f in ("nq", "nv", "na", "nu", "njnt"):
        if getattr(warp_model, f) != getattr(jax_model, f):
            raise ValueError(f"{name}: the MJX model's {f} differs from dm_control's; cannot reuse its initializer")
    if not (np.array_equal(warp_model.qpos0, jax_model.qpos0) and np.array_equal(warp_model.jnt_type, jax_model.jnt_type)
            and np.array_equal(warp_model.jnt_range, jax_model.jnt_range)):
        raise ValueError(f"{name}: the MJX model's joints differ from dm_control's; cannot reuse its initializer")


class WarpEnv(Env):
    """One task of a domain on MJX-Warp, with dm_control's model as shipped. Same API as `Env`; states are
    `WarpEnvState`s. `worlds` is the largest batch the shared contact pool is sized for."""

    def __init__(self, domain: Domain, task: str, action_repeat: int = 1, worlds: int = 64,
                 nconmax: int | None = None, njmax: int | None = None):
        if task not in domain.tasks:
            raise ValueError(f"domain {domain.name!r} has no task {task!r}; tasks: {sorted(domain.tasks)}")
        if not isinstance(worlds, int) or isinstance(worlds, bool) or worlds < 1:
            raise ValueError(f"worlds must be a positive int, got {worlds!r}")
        self.domain = domain
        self.task = task
        self.name = f"{domain.name}-{task}"
        self.action_repeat = action_repeat
        models = compile_warp_domain(domain)
        self.mj_model, self.mjx_model = models.mj_model, models.warp
        self._no_actuation = models.warp_no_actuation
        self.model_changes = _WARP_MODEL_CHANGES.get(domain.name, ())
        self.n_sub_steps = base.n_sub_steps(domain, self.mj_model)
        self.episode_length = base.episode_length(domain, action_repeat)
        self.params = base._as_param_arrays(domain.tasks[task])  # pylint: disable=protected-access
        self.action_size = int(self.mj_model.nu)
        self._ctrl_low, self._ctrl_high = base.ctrl_bounds(self.mj_model)
        sizes = dict(_POOL_SIZES.get(domain.name, {}))
        sizes.update({k: v for k, v in (("nconmax", nconmax), ("njmax", njmax)) if v is not None})
        self.worlds = worlds
        self.nconmax = int(sizes.get("nconmax", 48))
        self.njmax = int(sizes.get("njmax", 64))
        self.naconmax = self.nconmax * worlds
        self._acc_rows = _acc_sensor_rows(self.mj_model)
        self._template = mjx.make_data(self.mj_model, impl="warp", naconmax=self.naconmax, njmax=self.njmax)
        self._per_world_fields = tuple(
            path[0].name for path, _ in jax.tree_util.tree_flatten_with_path(self._template._impl)[0]  # pylint: disable=protected-access
            if path[0].name not in warp_types.DATA_NON_VMAP)
        if domain.name == "cheetah":
            self._initialize = functools.partial(_cheetah_initialize, self)
        else:
            jax_mj_model, jax_model = base.compile_domain(domain)
            _check_same_state_layout(self.mj_model, jax_mj_model, self.name)
            draw = functools.partial(domain.initialize, jax_mj_model, jax_model)
            self._initialize = lambda key, params: (*draw(key, params), jnp.asarray(False))
        keys = []

        def observation_values(data, task_state, params):
            obs = self._observation_dict(data, task_state, params)
            keys.extend(obs)
            return list(obs.values())

        task_state = jax.eval_shape(lambda k: self._initialize(k, self.params)[1], jax.random.key(0))
        shapes = jax.eval_shape(observation_values, self._template, task_state, self.params)
        self.observation_spec = tuple((k, tuple(v.shape)) for k, v in zip(keys, shapes))
        self.observation_size = int(sum(int(np.prod(s)) for _, s in self.observation_spec))
        for name in ("reset", "restore", "step"):
            setattr(self, name, jax.jit(getattr(self, name)))

    def jit(self, fun: Callable, **jit_kwargs) -> Callable:
        """`jax.jit`: Warp's physics needs no XLA options (the domain's are for MJX-JAX's own code)."""
        return jax.jit(fun, **jit_kwargs)

    def __repr__(self):
        return (f"WarpEnv({self.name!r}, action_repeat={self.action_repeat}, obs={self.observation_size}, "
                f"act={self.action_size}, episode_length={self.episode_length}, worlds={self.worlds})")

    # -- physics helpers
    def per_world(self, data: mjx.Data) -> mjx.Data:
        """`data` without the fields a vmapped call shares among its worlds (Warp's `DATA_NON_VMAP`: the contact
        pool, its counters, the pool sizes), its Warp part as a plain dict: what a `WarpEnvState` carries. Every
        leaf then has the caller's batch axes, and nothing a step reads is lost: every step rebuilds the pool."""
        impl = data._impl  # pylint: disable=protected-access
        return data.replace(_impl={name: getattr(impl, name) for name in self._per_world_fields})

    def full_data(self, data: mjx.Data) -> mjx.Data:
        """A `WarpEnvState`'s data with the template's shared fields put back: what Warp's functions take. Call
        it inside the vmapped function, so that the pool stays shared."""
        return data.replace(_impl=self._template._impl.replace(**data._impl))  # pylint: disable=protected-access

    def _overflowed(self, d: mjx.Data) -> jax.Array:
        """A pool overflowed in the call that produced `d`, or before (Warp's flags are sticky per world). The
        counters catch a forward pass too, which sets no flags."""
        impl = d._impl  # pylint: disable=protected-access
        flags = (impl.overflow & _POOL_OVERFLOW_BITS) != 0
        counts = (impl.nefc > self.njmax) | jnp.any(impl.nacon > self.naconmax) | jnp.any(impl.ncollision > self.naconmax)
        return flags | counts

    def _observed(self, stepped: mjx.Data) -> mjx.Data:
        """dm_control's data after a control step: `stepped`'s state, its kinematics and position/velocity
        sensors recomputed (a forward pass), acceleration-stage sensors and the dynamics' carried fields from
        the step."""
        fwd = mjx.forward(self.mjx_model, stepped)
        sensordata = fwd.sensordata
        if self._acc_rows.size:
            sensordata = sensordata.at[self._acc_rows].set(stepped.sensordata[self._acc_rows])
        impl = fwd._impl.replace(overflow=stepped._impl.overflow)  # pylint: disable=protected-access
        return fwd.replace(sensordata=sensordata, qacc_warmstart=stepped.qacc_warmstart, _impl=impl)

    def _fresh_data(self, qpos, qvel, act) -> mjx.Data:
        return self._template.replace(qpos=jnp.asarray(qpos, jnp.float32), qvel=jnp.asarray(qvel, jnp.float32),
                                      act=jnp.asarray(act, jnp.float32))

    def _start(self, data: mjx.Data, task_state, params, overflow=False) -> WarpEnvState:
        """dm_control's `after_reset`: a forward pass with actuation disabled, then the episode's first state.
        `overflow`: a pool overflowed while drawing the state (cheetah's settle)."""
        data = mjx.forward(self._no_actuation, data)
        obs = self._flat_observation(data, task_state, params)
        overflow = overflow | self._overflowed(data)
        bad = overflow | ~base._all_finite((data.qpos, data.qvel, data.act, obs))  # pylint: disable=protected-access
        return WarpEnvState(data=self.per_world(data), obs=jnp.where(bad, jnp.zeros_like(obs), obs),
                            reward=jnp.zeros((), jnp.float32), step=jnp.zeros((), jnp.int32),
                            done=jnp.asarray(False), nan=bad, params=params, task_state=task_state,
                            overflow=overflow)

    # -- the API
    def reset(self, key: jax.Array, params: TaskParams | None = None) -> WarpEnvState:
        params = self.params if params is None else params
        drawn, task_state, overflow = self._initialize(key, params)
        return self._start(self._fresh_data(drawn.qpos, drawn.qvel, drawn.act), task_state, params, overflow)

    def restore(self, qpos: jax.Array, qvel: jax.Array, act: jax.Array, task_state: Any,
                params: TaskParams | None = None) -> WarpEnvState:
        """The state of a stored physics snapshot, as dm_control's physics is after `set_state` inside
        `reset_context` (a forward pass with actuation disabled). The solver's warm start is not part of the
        snapshot."""
        params = self.params if params is None else params
        return self._start(self._fresh_data(qpos, qvel, act), task_state, params)

    def step(self, state: WarpEnvState, action: jax.Array) -> WarpEnvState:
        """Apply `action` (in [-1, 1]) for `action_repeat` control steps; rewards are summed."""
        action = base.check_action(self.name, self.action_size, action)
        m, ctrl = self.mjx_model, self.ctrl_from_action(action)

        def control_step(carry, _):
            data, overflow = carry
            data = data.replace(ctrl=ctrl)

            def substep(_, c):
                d, o = c
                d = mjx.step(m, d)
                return d, o | self._overflowed(d)

            data, overflow = jax.lax.fori_loop(0, self.n_sub_steps, substep, (data, overflow))
            data = self._observed(data)
            overflow = overflow | self._overflowed(data)
            return (data, overflow), self.domain.reward(self.mj_model, data, state.task_state, state.params)

        (data, overflow), rewards = jax.lax.scan(control_step, (self.full_data(state.data), state.overflow), None,
                                                 length=self.action_repeat)
        obs = self._flat_observation(data, state.task_state, state.params)
        reward = jnp.sum(rewards).astype(jnp.float32)
        finite = base._all_finite((data.qpos, data.qvel, data.act, obs, reward))  # pylint: disable=protected-access
        overflow = state.overflow | overflow
        nan = state.nan | ~finite | overflow
        step = state.step + 1
        return state.replace(
            data=jax.tree.map(lambda new, old: jnp.where(nan, old, new), self.per_world(data), state.data),
            obs=jnp.where(nan, jnp.zeros_like(obs), obs),
            reward=jnp.where(nan, jnp.zeros_like(reward), reward),
            step=step,
            done=step >= self.episode_length,
            nan=nan,
            overflow=overflow,
        )


# ------------------------------------------------------------------------------------------ initializers
def _cheetah_initialize(env: WarpEnv, key: jax.Array, params) -> tuple[mjx.Data, dict, jax.Array]:
    """dm_control's cheetah `initialize_episode` on Warp with the unchanged model: limited joints uniform in
    range (the JAX backend's draw, key for key), then 200 physics steps with zero control. dm_control's first
    step is `mj_step2` on the stages of qpos0 (the state `physics.reset()` computed) applied to the drawn qpos:
    the same accelerations as a step from qpos0 at rest, integrated from the drawn qpos. With every joint a
    hinge or slide and qpos0 = 0, that is the drawn qpos plus the qpos a step from qpos0 reaches."""
    from envs_mjx import cheetah  # pylint: disable=import-outside-toplevel

    mj_model, m = env.mj_model, env.mjx_model
    if np.any(mj_model.qpos0 != 0) or np.any(mj_model.jnt_type == int(mujoco.mjtJoint.mjJNT_FREE)) \
            or np.any(mj_model.jnt_type == int(mujoco.mjtJoint.mjJNT_BALL)):
        raise ValueError("cheetah: the stale first settle step assumes hinge/slide joints and qpos0 = 0")
    adr, lo, hi = cheetah._limited_joints(mj_model)  # pylint: disable=protected-access
    draw = jax.random.uniform(key, (len(adr),), minval=lo, maxval=hi)
    # (Zero control: the actuation that `physics.reset()` disabled adds nothing to cheetah's motors.)
    first = mjx.step(m, env._template)  # pylint: disable=protected-access
    data = first.replace(qpos=first.qpos.at[adr].add(draw))
    data = jax.lax.fori_loop(0, cheetah._SETTLE_STEPS - 1, lambda _, d: mjx.step(m, d), data)  # pylint: disable=protected-access
    # Warp's overflow flags are sticky, so the last step's tell about all 200.
    return data, {}, env._overflowed(data)  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------ constructor
def make_warp(name: str, action_repeat: int = 1, *, worlds: int = 64, nconmax: int | None = None,
              njmax: int | None = None) -> WarpEnv:
    """The named task on MJX-Warp (see `WarpEnv`). `worlds`: the largest batch the shared contact pool is sized
    for (`nconmax` contacts per world); `njmax`: constraint rows per world. One env per arguments, shared."""
    domain, task = split_name(name)
    if not isinstance(action_repeat, int) or isinstance(action_repeat, bool) or action_repeat < 1:
        raise ValueError(f"action_repeat must be a positive int, got {action_repeat!r}")
    return _make_warp(get_domain(domain, task), task, action_repeat, worlds, nconmax, njmax)


@functools.lru_cache(maxsize=None)
def _make_warp(domain: Domain, task: str, action_repeat: int, worlds: int, nconmax, njmax) -> WarpEnv:
    return WarpEnv(domain, task, action_repeat=action_repeat, worlds=worlds, nconmax=nconmax, njmax=njmax)


# ------------------------------------------------------------------------------------------ measurement
def physics_rates(name: str, batch: int, control_steps: int, seed: int = 0) -> dict:
    """Physics steps/s summed over `batch` worlds (jitted `lax.scan` of vmapped steps, random actions): through
    `WarpEnv.step` (with the observation pass), and through plain `mjx.step` substeps (without it); the first
    call's seconds (compile, and kernel build when ~/.cache/warp is cold) of each."""
    import time  # pylint: disable=import-outside-toplevel

    env = make_warp(name, worlds=max(batch, 1))
    states = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.key(seed), batch))
    keys = jax.random.split(jax.random.key(seed + 1), control_steps)

    def actions(k):
        return jax.random.uniform(k, (batch, env.action_size), minval=-1, maxval=1)

    @jax.jit
    def with_observation(states, keys):
        return jax.lax.scan(lambda s, k: (jax.vmap(env.step)(s, actions(k)), None), states, keys)[0]

    @jax.jit
    def without_observation(data, keys):
        def substeps(d, ctrl):
            d = env.full_data(d).replace(ctrl=ctrl)
            return jax.lax.fori_loop(0, env.n_sub_steps, lambda _, x: mjx.step(env.mjx_model, x), d)

        def body(d, k):
            return jax.vmap(substeps)(d, jax.vmap(env.ctrl_from_action)(actions(k))), None

        return jax.lax.scan(body, data, keys)[0]

    out = {"task": name, "batch": batch, "control_steps": control_steps, "substeps": env.n_sub_steps}
    for label, fn, arg in (("with_obs", with_observation, states), ("without_obs", without_observation, states.data)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg, keys))
        out[f"{label}_first_call_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg, keys))
        out[f"{label}_physics_steps_per_s"] = round(batch * control_steps * env.n_sub_steps
                                                     / (time.perf_counter() - t0), 1)
    return out


if __name__ == "__main__":
    import argparse  # pylint: disable=import-outside-toplevel
    import json  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(description="Warp physics steps/s with and without the observation pass")
    parser.add_argument("tasks", nargs="+")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--steps", type=int, default=30, help="control steps per measured rollout")
    args = parser.parse_args()
    for task_name in args.tasks:
        for b in args.batch:
            print(json.dumps(physics_rates(task_name, b, args.steps)), flush=True)
