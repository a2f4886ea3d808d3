"""Parity of envs_mjx against dm_control itself (the reference), as used by the tests and the README table.

One-step parity: MJX states (fresh resets and states along a random-action rollout) are copied into a
dm_control environment of the same task (qpos, qvel, act, the solver warm start and any per-episode targets,
inside `reset_context`, which runs dm_control's own forward pass); then both take the same action and their
observations and rewards are compared. Trajectory divergence: both simulators start from the same state and
take the same 200 random actions; the per-step reward difference measures how far the float32 MJX physics
(and any MJX model change) drifts from dm_control's float64 MuJoCo.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from envs_mjx.base import Domain, Env, EnvState
from envs_mjx.registry import get_domain, list_tasks, program_groups, split_name


@dataclasses.dataclass
class ParityResult:
    task: str
    reset_obs_err_by_key: dict[str, float]  # per obs key: max |obs_mjx - obs_dm| right after copying the state in
    step_obs_err_by_key: dict[str, float]  # per obs key: max |obs| difference after one control step
    step_reward_err: float  # max |reward| difference after one control step
    n_states: int

    @property
    def reset_obs_err(self) -> float:
        return max(self.reset_obs_err_by_key.values())

    @property
    def step_obs_err(self) -> float:
        return max(self.step_obs_err_by_key.values())


@dataclasses.dataclass
class DivergenceResult:
    task: str
    steps: int
    mean_abs_reward_diff: float  # mean over steps of |r_mjx - r_dm|
    max_abs_reward_diff: float
    return_mjx: float
    return_dm: float


def load_dm_control(name: str, seed: int = 0):
    from dm_control import suite  # pylint: disable=import-outside-toplevel

    domain, task = split_name(name)
    return suite.load(domain, task, task_kwargs={"random": seed})


def flat_dm_observation(observation) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in observation.values()])


def copy_state_into(dm_env, env: Env, state: EnvState, lane: int | None = None) -> np.ndarray:
    """Put one MJX state into `dm_env`'s physics (dm_control runs its forward pass on leaving reset_context);
    returns dm_control's observation of it."""
    take = (lambda x: np.asarray(x)) if lane is None else (lambda x: np.asarray(x)[lane])
    physics = dm_env.physics
    with physics.reset_context():
        physics.data.qpos[:] = take(state.data.qpos)
        physics.data.qvel[:] = take(state.data.qvel)
        if physics.model.na:
            physics.data.act[:] = take(state.data.act)
        physics.data.qacc_warmstart[:] = take(state.data.qacc_warmstart)
        if env.domain.sync_dm_control is not None:
            env.domain.sync_dm_control(dm_env, jax.tree.map(take, state.task_state))
    return flat_dm_observation(dm_env.task.get_observation(physics))


def task_groups(domain_name: str, tasks: list[str] | None = None) -> list[list[str]]:
    """`tasks` (default: all of the domain's) grouped by the compiled reset and step they share."""
    return list(program_groups(tasks or list_tasks(domain_name)).values())


@functools.lru_cache(maxsize=None)
def _batched_fns_of(domain: Domain):
    env = Env(domain, next(iter(domain.tasks)))
    return env, env.jit(jax.vmap(env.reset)), env.jit(jax.vmap(env.step))


def _batched_fns(domain_name: str, task: str | None = None):
    """jit(vmap(reset)) and jit(vmap(step)) for the Domain serving `task` (default: the domain's first task),
    compiled once per batch shape and shared by every task of that Domain (tasks differ only in the params
    carried by the state)."""
    return _batched_fns_of(get_domain(*split_name(task or list_tasks(domain_name)[0])))


def _stack(trees):
    return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def sample_states(domain_name: str, tasks: list[str], per_task: int, rollout_steps: int, seed: int = 0):
    """States of each task: fresh resets, then the same lanes after `rollout_steps` random actions (so that
    moving, contact-rich states are covered). Returns (env, step_fn, [(task, states), ...])."""
    if len(task_groups(domain_name, tasks)) > 1:
        raise ValueError(f"{tasks} are served by different Domains; sample each of parity.task_groups apart")
    env, reset, step = _batched_fns(domain_name, tasks[0])
    lanes = [t for t in tasks for _ in range(per_task)]
    params = _stack([env.task_params(split_name(t)[1]) for t in lanes])
    key = jax.random.key(seed)
    states = reset(jax.random.split(key, len(lanes)), params)
    snapshots = [states]
    for i in range(rollout_steps):
        actions = jax.random.uniform(jax.random.fold_in(key, i), (len(lanes), env.action_size), minval=-1, maxval=1)
        states = step(states, actions)
    if rollout_steps:
        snapshots.append(states)
    return env, step, lanes, snapshots


def record_max_by_key(env: Env, per_key: dict[str, float], diff: np.ndarray) -> None:
    """Raise each observation key's entry of `per_key` to the largest value of `diff` (a flat observation-sized
    vector) in that key's slice."""
    ends = np.cumsum([int(np.prod(shape)) for _, shape in env.observation_spec])
    for (k, _), part in zip(env.observation_spec, np.split(diff, ends[:-1])):
        per_key[k] = max(per_key[k], float(np.max(part)))


def one_step_parity(domain_name: str, tasks: list[str] | None = None, per_task: int = 2, rollout_steps: int = 20,
                    seed: int = 0) -> list[ParityResult]:
    groups = task_groups(domain_name, tasks)
    if len(groups) > 1:
        return [r for g in groups for r in one_step_parity(domain_name, g, per_task, rollout_steps, seed)]
    tasks = groups[0]
    env, step, lanes, snapshots = sample_states(domain_name, tasks, per_task, rollout_steps, seed)
    rng = np.random.default_rng(seed)
    keys = [k for k, _ in env.observation_spec]
    obs_errs = {t: ({k: 0.0 for k in keys}, {k: 0.0 for k in keys}) for t in tasks}  # (reset, step) per key
    reward_err, n_states = dict.fromkeys(tasks, 0.0), dict.fromkeys(tasks, 0)
    record = functools.partial(record_max_by_key, env)
    dm_envs = {t: load_dm_control(t, seed) for t in tasks}
    for states in snapshots:
        actions = rng.uniform(-1, 1, (len(lanes), env.action_size)).astype(np.float32)
        stepped = step(states, jnp.asarray(actions))
        for lane, task in enumerate(lanes):
            dm_env = dm_envs[task]
            dm_env.reset()
            obs_dm = copy_state_into(dm_env, env, states, lane)
            record(obs_errs[task][0], np.abs(np.asarray(states.obs[lane]) - obs_dm))
            ts = dm_env.step(env.ctrl_from_action(actions[lane]))
            record(obs_errs[task][1], np.abs(np.asarray(stepped.obs[lane]) - flat_dm_observation(ts.observation)))
            reward_err[task] = max(reward_err[task], abs(float(stepped.reward[lane]) - float(ts.reward)))
            n_states[task] += 1
    return [ParityResult(t, *obs_errs[t], reward_err[t], n_states[t]) for t in tasks]


def trajectory_divergence(domain_name: str, tasks: list[str] | None = None, per_task: int = 2, steps: int = 200,
                          seed: int = 0) -> list[DivergenceResult]:
    """Same start, same random actions, `steps` control steps in both simulators, for `per_task` episodes of
    each task (the lanes of `one_step_parity`, so the compiled functions are shared). Figures are the worst
    lane's."""
    groups = task_groups(domain_name, tasks)
    if len(groups) > 1:
        return [r for g in groups for r in trajectory_divergence(domain_name, g, per_task, steps, seed)]
    tasks = groups[0]
    env, step, lanes, snapshots = sample_states(domain_name, tasks, per_task, 0, seed)
    states = snapshots[0]
    dm_envs = []
    for lane, task in enumerate(lanes):
        dm_envs.append(load_dm_control(task, seed))
        dm_envs[-1].reset()
        copy_state_into(dm_envs[-1], env, states, lane)
    rng = np.random.default_rng(seed)
    r_mjx, r_dm = np.zeros((steps, len(lanes))), np.zeros((steps, len(lanes)))
    for i in range(steps):
        actions = rng.uniform(-1, 1, (len(lanes), env.action_size)).astype(np.float32)
        states = step(states, jnp.asarray(actions))
        r_mjx[i] = np.asarray(states.reward)
        for lane, dm_env in enumerate(dm_envs):
            r_dm[i, lane] = dm_env.step(env.ctrl_from_action(actions[lane])).reward
    results = []
    for task in tasks:
        cols = [i for i, t in enumerate(lanes) if t == task]
        diff = np.abs(r_mjx[:, cols] - r_dm[:, cols])
        worst = int(np.argmax(diff.mean(axis=0)))
        results.append(DivergenceResult(task, steps, float(diff.mean(axis=0)[worst]), float(diff.max()),
                                        float(r_mjx[:, cols[worst]].sum()), float(r_dm[:, cols[worst]].sum())))
    return results


# ------------------------------------------------------------------------------------ states of trained agents
# The forward speed each task rewards (dm_control's `_RUN_SPEED`, `_WALK_SPEED`, ...; 0 for standing): a trained
# agent spends its episodes near it, upright, where random-action rollouts never go.
TARGET_SPEEDS = {
    "cheetah-run": 10.0,
    "walker-stand": 0.0, "walker-walk": 1.0, "walker-run": 8.0,
    "humanoid-stand": 0.0, "humanoid-walk": 1.0, "humanoid-run": 10.0,
    "quadruped-walk": 0.5, "quadruped-run": 5.0,
    "dog-stand": 0.0, "dog-walk": 1.0, "dog-trot": 3.0, "dog-run": 9.0,
}
# Domains whose reset does not leave the body upright: they start from the model's standing pose (qpos0).
_STAND_FROM_QPOS0 = ("walker", "humanoid", "quadruped")


@dataclasses.dataclass
class AgentLikeResult:
    task: str
    step_obs_err_by_key: dict[str, dict[str, float]]  # per action repeat ("1", "2"): max |obs_env - obs_dm|
    step_reward_err: dict[str, float]  # per action repeat: max |reward summed over the repeat| difference
    # The same differences between dm_control and itself started 1e-6 away in qpos: how far float rounding alone
    # carries two copies of the true physics from such a state (contact onsets amplify it by orders of magnitude)
    self_obs_err_by_key: dict[str, dict[str, float]]
    self_reward_err: dict[str, float]
    n_states: int
    speed: float  # the mean forward speed of the states, as dm_control measures it (m/s, along the heading)


def _forward_direction(physics) -> tuple[np.ndarray, np.ndarray]:
    """The dofs and unit vector of the body's forward motion: a planar body's slide x, or a free root's linear
    velocity along its heading (its x axis, projected on the floor)."""
    if physics.model.jnt_type[0] == 0:  # mjJNT_FREE
        x_axis = physics.data.xmat[1].reshape(3, 3)[:, 0].copy()
        x_axis[2] = 0.0
        return np.arange(3), x_axis / np.linalg.norm(x_axis)
    return np.arange(1), np.ones(1)


def agent_like_parity(env: Env, restore, step, lane_tasks: list[str], states: EnvState, lead_in: int = 10,
                      seed: int = 0) -> dict[str, AgentLikeResult]:
    """One-step parity at states of the kind a trained agent visits, at action repeat 1 and 2.

    Each lane's state is built in dm_control (float64 C MuJoCo, the task's unchanged model) from `states`' lane
    (a fresh reset: its episode targets go into dm_control): the body upright (the model's standing pose for
    walker, humanoid and quadruped; the reset's own pose for cheetah, settled on the floor, and dog, standing),
    moving at its task's target speed along its heading (`TARGET_SPEEDS`) with N(0, 0.5) added to every velocity,
    then `lead_in` control steps of uniform random actions, so that contacts, joint velocities and the gait's
    forces are those of a moving body and not of an initial condition. That state (rounded to float32, the solver
    warm start zeroed) goes into both simulators: `restore` (a batched `env.restore`) and dm_control's
    `reset_context`; then both take the same random action for 1 and 2 control steps (`step` is the env's batched
    step at action repeat 1; holding an action for two of its calls is action repeat 2's physics). dm_control also
    steps from the state with qpos moved by N(0, 1e-6), for the physics' own sensitivity at that state.

    These are built states, not states recorded from trained policies: they put the body where trained agents
    are (upright, fast, in contact), which random rollouts from a reset never reach."""
    rng = np.random.default_rng(seed)
    keys = [k for k, _ in env.observation_spec]
    tasks = list(dict.fromkeys(lane_tasks))
    dm_envs = {t: load_dm_control(t, seed) for t in tasks}

    def per_repeat():
        return {t: {"1": dict.fromkeys(keys, 0.0), "2": dict.fromkeys(keys, 0.0)} for t in tasks}

    step_err, self_err = per_repeat(), per_repeat()
    reward_err = {t: {"1": 0.0, "2": 0.0} for t in tasks}
    self_reward_err = {t: {"1": 0.0, "2": 0.0} for t in tasks}
    speeds: dict[str, list[float]] = {t: [] for t in tasks}

    record = functools.partial(record_max_by_key, env)

    def dm_steps(dm_env, q, v, a, lane, action):
        """dm_control from (q, v, a): the flat observation and summed reward after 1 and 2 control steps."""
        physics = dm_env.physics
        with physics.reset_context():
            physics.data.qpos[:], physics.data.qvel[:] = q, v
            if physics.model.na:
                physics.data.act[:] = a
            physics.data.qacc_warmstart[:] = 0.0
            if env.domain.sync_dm_control is not None:
                env.domain.sync_dm_control(dm_env, jax.tree.map(lambda x: np.asarray(x)[lane], states.task_state))
        out, reward = [], 0.0
        for _ in range(2):
            ts = dm_env.step(env.ctrl_from_action(action))
            reward += ts.reward
            out.append((flat_dm_observation(ts.observation), reward))
        return out

    lo, hi = (np.asarray(b, np.float64) for b in (env._ctrl_low, env._ctrl_high))  # pylint: disable=protected-access
    built = []
    for lane, task in enumerate(lane_tasks):
        dm_env = dm_envs[task]
        dm_env.reset()
        copy_state_into(dm_env, env, states, lane)  # the reset's pose and the episode's targets
        physics = dm_env.physics
        with physics.reset_context():
            if env.domain.name in _STAND_FROM_QPOS0:
                physics.data.qpos[:] = physics.model.qpos0
        dofs, direction = _forward_direction(physics)
        with physics.reset_context():
            physics.data.qvel[:] += rng.normal(0.0, 0.5, physics.model.nv)
            physics.data.qvel[dofs] += TARGET_SPEEDS[task] * direction
        for _ in range(lead_in):
            dm_env.step(rng.uniform(lo, hi))
        dofs, direction = _forward_direction(physics)
        speeds[task].append(float(physics.data.qvel[dofs] @ direction))
        built.append([np.asarray(x, np.float32) for x in (physics.data.qpos, physics.data.qvel, physics.data.act)])
    q, v, a = (np.stack(x) for x in zip(*built))
    restored = restore(jnp.asarray(q), jnp.asarray(v), jnp.asarray(a), states.task_state, states.params)
    actions = rng.uniform(-1, 1, (len(lane_tasks), env.action_size)).astype(np.float32)
    once = step(restored, jnp.asarray(actions))
    twice = step(once, jnp.asarray(actions))
    for lane, task in enumerate(lane_tasks):
        if np.any(np.asarray(twice.nan[lane])):
            raise AssertionError(f"{task}: lane {lane} went non-finite from an agent-like state")
        dm = dm_steps(dm_envs[task], q[lane], v[lane], a[lane], lane, actions[lane])
        nudged = q[lane] + rng.normal(0.0, 1e-6, q.shape[1])
        dm_nudged = dm_steps(dm_envs[task], nudged, v[lane], a[lane], lane, actions[lane])
        env_reward = 0.0
        for i, (repeat, stepped) in enumerate((("1", once), ("2", twice))):
            env_reward += float(stepped.reward[lane])
            (obs_dm, reward_dm), (obs_nudged, reward_nudged) = dm[i], dm_nudged[i]
            record(step_err[task][repeat], np.abs(np.asarray(stepped.obs[lane]) - obs_dm))
            record(self_err[task][repeat], np.abs(obs_nudged - obs_dm))
            reward_err[task][repeat] = max(reward_err[task][repeat], abs(env_reward - reward_dm))
            self_reward_err[task][repeat] = max(self_reward_err[task][repeat], abs(reward_nudged - reward_dm))
    return {t: AgentLikeResult(t, step_err[t], reward_err[t], self_err[t], self_reward_err[t], lane_tasks.count(t),
                               float(np.mean(speeds[t]))) for t in tasks}


@functools.lru_cache(maxsize=None)
def _batched_restore_of(domain: Domain):
    env = _batched_fns_of(domain)[0]
    return env.jit(jax.vmap(env.restore))


def agent_like_results(domain_name: str, tasks: list[str], per_task: int = 2, seed: int = 0
                       ) -> dict[str, AgentLikeResult]:
    """`agent_like_parity` on the JAX backend for `tasks` (one task group), on the lanes and compiled step of
    `one_step_parity` (same `per_task`), plus one batched restore."""
    env, step, lanes, snapshots = sample_states(domain_name, tasks, per_task, 0, seed)
    restore = _batched_restore_of(get_domain(*split_name(tasks[0])))
    return agent_like_parity(env, restore, step, lanes, snapshots[0], seed=seed)
