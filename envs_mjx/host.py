"""The host backend: dm_control's own tasks on C MuJoCo, stepped on the CPU from inside jitted programs.

`make(task, backend="host")` returns a `HostEnv`, with the same `reset`/`step`/`restore` API and observations as the
MJX env, whose physics is dm_control itself: its models unchanged (dog's ellipsoids and noslip, cheetah's and
quadruped's self-collisions), its `initialize_episode`, `get_observation` and `get_reward`, its legacy step timing.
Every call runs one `jax.pure_callback` for all lanes of a vmapped batch; the lanes are spread over threads (MuJoCo
releases the GIL while it steps). The callback is a pure function of its inputs, so the trainer's programs stay
repeatable and resumable:

- A lane's whole physics state is an array in the `EnvState`: MuJoCo's integration state (time, qpos, qvel, act,
  the solver's warm start, controls, applied forces), float64 stored bit for bit as pairs of uint32 (JAX runs
  float32), and the per-episode targets that dm_control's tasks draw into the model (`EPISODE_MODEL_FIELDS`). The
  dm_control environments behind the callback are scratch: each call writes a lane's state in, steps, and reads it
  back out, so a checkpointed state resumes in a fresh process exactly as it would have continued.
- A reset seeds the task's `numpy.random.RandomState` from the lane's JAX key, so the initial state distribution
  is dm_control's own and the draw is a function of the key.
- A physics error (dm_control's `PhysicsError`, or a non-finite state, observation or reward) sets the lane's `nan`
  flag; the state stays at the last finite one and obs and reward are zero until `reset`, as on the device.

On a GPU each call is a round trip to the host for the whole batch; on a CPU it is the fastest backend (see
envs_mjx/README.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import io
import os
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from flax import struct

from envs_mjx.base import EnvState, check_action, ctrl_bounds, episode_length
from envs_mjx.parity import flat_dm_observation
from envs_mjx.registry import get_domain, list_tasks, split_name

INTEGRATION_STATE = mujoco.mjtState.mjSTATE_INTEGRATION

# Model fields that dm_control's tasks draw afresh in every `initialize_episode` (the targets), as (model field,
# element name): they are part of a lane's state. What `initialize_episode` writes the same way every episode
# (reacher's target size, finger's hinge damping, dog's stand height) is set once, when a lane's simulator is made.
# tests/test_host.py checks this list against what two differently seeded resets of each task change.
EPISODE_MODEL_FIELDS = {
    "finger": (("site_pos", "target"),),
    "fish": (("geom_pos", "target"),),
    "reacher": (("geom_pos", "target"),),
    "swimmer": (("geom_pos", "target"), ("light_pos", "target_light")),
}


@struct.dataclass
class HostData:
    """A host lane's physics. `state` is exact; qpos, qvel and act are float32 copies of it, read by the trainer's
    replay rows (and by `restore`, which is approximate for that reason)."""

    qpos: jax.Array
    qvel: jax.Array
    act: jax.Array
    state: jax.Array  # uint32 [2 * integration state size]: float64 bits


def _to_bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float64).view(np.uint32)


def _from_bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.uint32).view(np.float64)


def _load(domain: str, task: str):
    from dm_control import suite  # pylint: disable=import-outside-toplevel

    # Importing dm_control without a display prints a GLFW error; rendering is not needed here.
    with contextlib.redirect_stderr(io.StringIO()):
        return suite.load(domain, task, task_kwargs={"random": 0})


def _finite(*arrays) -> bool:
    return all(np.all(np.isfinite(a)) for a in arrays)


class _Simulator:
    """One dm_control environment of one task: the scratch simulator that lanes are stepped in."""

    def __init__(self, domain: str, task: str, fields):
        self.env = _load(domain, task)
        self.env.reset()  # writes the task's per-task constants into the model (see EPISODE_MODEL_FIELDS)
        self.physics, self.task = self.env.physics, self.env.task
        self.model, self.data = self.physics.model.ptr, self.physics.data.ptr
        self.targets = [getattr(self.physics.named.model, field)[name] for field, name in fields]
        self.state = np.zeros(mujoco.mj_stateSize(self.model, INTEGRATION_STATE), np.float64)

    def get_targets(self) -> np.ndarray:
        return np.concatenate([np.array(t, np.float64).ravel() for t in self.targets] or [np.zeros(0)])

    def set_targets(self, values: np.ndarray) -> None:
        start = 0
        for t in self.targets:
            t[:] = values[start:start + t.size]
            start += t.size

    def get_state(self) -> np.ndarray:
        mujoco.mj_getState(self.model, self.data, self.state, INTEGRATION_STATE)
        return self.state

    def set_state(self, state: np.ndarray, targets: np.ndarray) -> None:
        """The lane's physics as dm_control leaves it after a step: kinematics and position/velocity stages (and
        their sensors) current, as `mj_step1` computes them."""
        self.set_targets(targets)
        mujoco.mj_setState(self.model, self.data, state, INTEGRATION_STATE)
        with self.physics.check_invalid_state():
            mujoco.mj_step1(self.model, self.data)


class _Simulators:
    """The dm_control environments behind one domain's host envs: one per (task, thread), made on first use and
    shared by every lane, program and batch size (each call writes a lane's whole state in before stepping it). A
    lock keeps two programs' callbacks from sharing one."""

    _pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="envs-mjx-host")

    def __init__(self, domain: str):
        self.domain = domain
        self.tasks = tuple(split_name(t)[1] for t in list_tasks(domain))
        self.fields = EPISODE_MODEL_FIELDS.get(domain, ())
        self.sims: dict[tuple[int, int], _Simulator] = {}
        self.lock = threading.Lock()
        self.threads = int(os.environ.get("ENVS_MJX_HOST_THREADS", 0)) or self._useful_threads()

    def _useful_threads(self) -> int:
        """Threads only overlap MuJoCo's C step (it releases the GIL); dm_control's observation and reward code and
        the step's own Python run one thread at a time. While one thread runs Python, the others can at best be in
        C, so more threads than (C time / Python time) per control step only contend for the GIL. Measured on 2
        cores: cheetah, walker and humanoid were faster on one thread, dog on two; this rule picks the same."""
        sim = self.simulator(0, 0)
        n_sub_steps = sim.env._n_sub_steps  # pylint: disable=protected-access
        t0 = time.perf_counter()
        for _ in range(10):
            mujoco.mj_step(sim.model, sim.data, n_sub_steps)
        t1 = time.perf_counter()
        for _ in range(10):
            sim.task.before_step(sim.physics.data.ctrl.copy(), sim.physics)
            sim.task.get_reward(sim.physics)
            flat_dm_observation(sim.task.get_observation(sim.physics))
        t2 = time.perf_counter()
        return max(1, min(os.cpu_count() or 1, round((t1 - t0) / (t2 - t1))))

    def run(self, task_index: np.ndarray, work: Callable[[_Simulator, int], None]) -> None:
        """`work(simulator, i)` for every lane i, the lanes split into one contiguous block per thread."""
        n = len(task_index)
        blocks = max(1, min(n, self.threads))
        with self.lock:
            def block(b):
                for i in range(b * n // blocks, (b + 1) * n // blocks):
                    work(self.simulator(int(task_index[i]), b), i)

            # Make every simulator a block needs first: loading a model is not thread-safe.
            for b in range(blocks):
                for t in set(task_index[b * n // blocks:(b + 1) * n // blocks].tolist()):
                    self.simulator(t, b)
            if blocks == 1:
                block(0)
            else:
                list(self._pool.map(block, range(blocks)))

    def simulator(self, task: int, thread: int) -> _Simulator:
        sim = self.sims.get((task, thread))
        if sim is None:
            sim = self.sims[(task, thread)] = _Simulator(self.domain, self.tasks[task], self.fields)
        return sim


@functools.lru_cache(maxsize=None)
def _simulators(domain: str) -> _Simulators:
    return _Simulators(domain)


def _flatten_lanes(batch_shape, *arrays):
    n = int(np.prod(batch_shape, dtype=int))
    return [np.asarray(a).reshape(n, *np.shape(a)[len(batch_shape):]) for a in arrays]


class HostEnv:
    """One dm_control task on C MuJoCo behind the `envs_mjx.Env` API (see the module docstring)."""

    backend = "host"

    def __init__(self, name: str, action_repeat: int = 1):
        domain_name, task = split_name(name)
        self.domain = get_domain(domain_name, task)  # for its time limit and task list; its MJX model is not built
        self.episode_length = episode_length(self.domain, action_repeat)
        self.name, self.task, self.action_repeat = name, task, action_repeat
        self._sims = _simulators(domain_name)
        probe = self._sims.simulator(self._sims.tasks.index(task), 0)  # made once, then shared by the lanes
        self.mj_model = probe.model
        self.n_sub_steps = probe.env._n_sub_steps  # pylint: disable=protected-access  (dm_control's own count)
        self.observation_spec = tuple((k, tuple(v.shape)) for k, v in probe.env.observation_spec().items())
        self.observation_size = int(sum(int(np.prod(s)) for _, s in self.observation_spec))
        self.action_size = int(self.mj_model.nu)
        self._ctrl_low, self._ctrl_high = ctrl_bounds(self.mj_model)
        self._state_size = probe.state.size
        self._targets_size = probe.get_targets().size
        self.params = self.task_params(task)
        for fn in ("reset", "restore", "step"):
            setattr(self, fn, jax.jit(getattr(self, fn)))

    def __repr__(self):
        return (f"HostEnv({self.name!r}, action_repeat={self.action_repeat}, obs={self.observation_size}, "
                f"act={self.action_size}, episode_length={self.episode_length})")

    @property
    def threads(self) -> int:
        """Threads the lanes of a call are spread over (`ENVS_MJX_HOST_THREADS`, or as many as help: see
        `_Simulators._useful_threads`)."""
        return self._sims.threads

    def jit(self, fun: Callable, **jit_kwargs) -> Callable:
        """`jax.jit`; the host physics needs no compiler options (the same call as `Env.jit`)."""
        return jax.jit(fun, **jit_kwargs)

    def task_params(self, task: str) -> dict[str, jax.Array]:
        """Another task of the same domain, to reset into (vmap over tasks with these)."""
        if task not in self._sims.tasks:
            raise ValueError(f"domain {self.domain.name!r} has no task {task!r}; tasks: {sorted(self._sims.tasks)}")
        return {"task": jnp.asarray(self._sims.tasks.index(task), jnp.int32)}

    def ctrl_from_action(self, action: jax.Array) -> jax.Array:
        return self._ctrl_low + (action + 1.0) * 0.5 * (self._ctrl_high - self._ctrl_low)

    # -- the shapes a callback returns, per lane
    def _lane_shapes(self, *names):
        f32, u32 = jnp.float32, jnp.uint32
        shapes = {"state": ((2 * self._state_size,), u32), "targets": ((2 * self._targets_size,), u32),
                  "obs": ((self.observation_size,), f32), "reward": ((), f32), "nan": ((), jnp.bool_),
                  "qpos": ((self.mj_model.nq,), f32), "qvel": ((self.mj_model.nv,), f32),
                  "act": ((self.mj_model.na,), f32)}
        return tuple(jax.ShapeDtypeStruct(*shapes[n]) for n in names)

    def _state_of(self, out: dict, params, task_state, step, nan) -> EnvState:
        data = HostData(qpos=out["qpos"], qvel=out["qvel"], act=out["act"], state=out["state"])
        return EnvState(data=data, obs=out["obs"], reward=out["reward"], step=step, done=step >= self.episode_length,
                        nan=nan, params=params, task_state=task_state)

    def _call(self, host_fn, names, *args):
        out = jax.pure_callback(host_fn, self._lane_shapes(*names), *args, vmap_method="broadcast_all")
        return dict(zip(names, out))

    # -- the API
    def reset(self, key: jax.Array, params=None) -> EnvState:
        """A new episode from dm_control's `initialize_episode`, its random draws seeded from `key`."""
        params = self.params if params is None else params
        names = ("state", "targets", "obs", "qpos", "qvel", "act")
        out = self._call(self._reset_host, names, params["task"], jax.random.key_data(key))
        zero = jnp.zeros((), jnp.int32)
        out["reward"] = jnp.zeros((), jnp.float32)
        return self._state_of(out, params, {"targets": out["targets"]}, zero, jnp.asarray(False))

    def restore(self, qpos: jax.Array, qvel: jax.Array, act: jax.Array, task_state, params=None) -> EnvState:
        """The state with these qpos, qvel, act and targets, as dm_control's physics is after setting them inside
        `reset_context` (the solver's warm start and the float32 rounding of qpos/qvel are not restored)."""
        params = self.params if params is None else params
        names = ("state", "obs", "qpos", "qvel", "act")
        out = self._call(self._restore_host, names, params["task"], qpos, qvel, act, task_state["targets"])
        out["reward"] = jnp.zeros((), jnp.float32)
        return self._state_of(out, params, task_state, jnp.zeros((), jnp.int32), jnp.asarray(False))

    def step(self, state: EnvState, action: jax.Array) -> EnvState:
        """Apply `action` (in [-1, 1]) for `action_repeat` control steps; rewards are summed."""
        ctrl = self.ctrl_from_action(check_action(self.name, self.action_size, action))
        names = ("state", "obs", "reward", "nan", "qpos", "qvel", "act")
        out = self._call(self._step_host, names, state.params["task"], state.data.state,
                         state.task_state["targets"], ctrl, state.nan)
        nan = state.nan | out["nan"]
        return self._state_of(out, state.params, state.task_state, state.step + 1, nan)

    # -- the host side: numpy in, numpy out, every lane of the batch at once
    def _outputs(self, n: int, names) -> dict[str, np.ndarray]:
        return {s: np.zeros((n, *shape.shape), shape.dtype) for s, shape in zip(names, self._lane_shapes(*names))}

    def _record(self, out, i, sim: _Simulator, obs=None) -> None:
        out["state"][i] = _to_bits(sim.get_state())
        out["qpos"][i], out["qvel"][i] = sim.physics.data.qpos, sim.physics.data.qvel
        out["act"][i] = sim.physics.data.act
        if obs is not None:
            out["obs"][i] = obs

    def _reset_host(self, task, key_words):
        batch = np.shape(task)
        task, key_words = _flatten_lanes(batch, task, key_words)
        names = ("state", "targets", "obs", "qpos", "qvel", "act")
        out = self._outputs(len(task), names)

        def work(sim: _Simulator, i):
            sim.task._random = np.random.RandomState(key_words[i].astype(np.uint32))  # pylint: disable=protected-access
            timestep = sim.env.reset()
            self._record(out, i, sim, flat_dm_observation(timestep.observation))
            out["targets"][i] = _to_bits(sim.get_targets())

        self._sims.run(task, work)
        return tuple(out[k].reshape(batch + out[k].shape[1:]) for k in names)

    def _restore_host(self, task, qpos, qvel, act, targets):
        batch = np.shape(task)
        task, qpos, qvel, act, targets = _flatten_lanes(batch, task, qpos, qvel, act, targets)
        names = ("state", "obs", "qpos", "qvel", "act")
        out = self._outputs(len(task), names)

        def work(sim: _Simulator, i):
            sim.set_targets(_from_bits(targets[i]))
            with sim.physics.reset_context():
                sim.physics.data.qpos[:], sim.physics.data.qvel[:] = qpos[i], qvel[i]
                sim.physics.data.act[:] = act[i]
            self._record(out, i, sim, flat_dm_observation(sim.task.get_observation(sim.physics)))

        self._sims.run(task, work)
        return tuple(out[k].reshape(batch + out[k].shape[1:]) for k in names)

    def _step_host(self, task, state, targets, ctrl, frozen):
        from dm_control.rl.control import PhysicsError  # pylint: disable=import-outside-toplevel

        batch = np.shape(task)
        task, state, targets, ctrl, frozen = _flatten_lanes(batch, task, state, targets, ctrl, frozen)
        names = ("state", "obs", "reward", "nan", "qpos", "qvel", "act")
        out = self._outputs(len(task), names)
        action_repeat, n_sub_steps = self.action_repeat, self.n_sub_steps

        def work(sim: _Simulator, i):
            start = _from_bits(state[i])
            ok = False
            if not frozen[i] and _finite(start):
                try:
                    sim.set_state(start, _from_bits(targets[i]))
                    reward = 0.0
                    for _ in range(action_repeat):  # dm_control's `Environment.step`, action_repeat times
                        sim.task.before_step(ctrl[i].astype(np.float64), sim.physics)
                        sim.physics.step(n_sub_steps)
                        sim.task.after_step(sim.physics)
                        reward += sim.task.get_reward(sim.physics)
                    obs = flat_dm_observation(sim.task.get_observation(sim.physics))
                    ok = _finite(obs, reward, sim.get_state())
                except PhysicsError:
                    pass
            if ok:
                self._record(out, i, sim, obs)
                out["reward"][i] = reward
            else:  # a frozen or failed lane keeps its last finite state; obs and reward stay zero
                out["state"][i] = state[i]
                out["qpos"][i], out["qvel"][i], out["act"][i] = self._float32_view(sim, start)
                out["nan"][i] = True

        self._sims.run(task, work)
        return tuple(out[k].reshape(batch + out[k].shape[1:]) for k in names)

    @staticmethod
    def _float32_view(sim: _Simulator, state: np.ndarray):
        """qpos, qvel, act of an integration state (laid out as time, qpos, qvel, act, ...)."""
        nq, nv, na = sim.model.nq, sim.model.nv, sim.model.na
        return state[1:1 + nq], state[1 + nq:1 + nq + nv], state[1 + nq + nv:1 + nq + nv + na]


@functools.lru_cache(maxsize=None)
def make_host(name: str, action_repeat: int = 1) -> HostEnv:
    return HostEnv(name, action_repeat)
