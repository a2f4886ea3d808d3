"""The fused many-seed trainer.

Per domain of a spec, all (seed, task) lanes form one pytree with leading axes [seed, task]; a chunk is
    jit(scan over K agent steps(vmap over seeds(vmap over tasks(act -> env step -> insert -> updates))))
with the carry donated, so nothing leaves the device inside a chunk. Every schedule (warm-up, update start,
episode resets) is a function of the unbatched step counter, so under vmap each `lax.cond` stays a real branch.
A Python loop over chunks (see `run.py`) logs, evaluates and checkpoints between them.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct

import envs_mjx
from vecrl import replay
from vecrl.agents.base import DROPPED, Agent
from vecrl.agents import AGENTS
from vecrl.config import RunSpec


@struct.dataclass
class Lane:
    """Everything one (seed, task) needs; the trainer holds these with leading axes [seed, task]."""

    agent: Any
    buffer: replay.TrainBuffer
    held_out: replay.HeldOutBuffer
    env: envs_mjx.EnvState
    key: jax.Array  # training stream
    eval_key: jax.Array  # evaluation stream, folded with the step, so evaluating never perturbs training
    episode_return: jax.Array  # running return of the current training episode


@struct.dataclass
class DomainState:
    lanes: Lane  # [seed, task, ...]
    step: jax.Array  # int32 [], agent steps done; unbatched, drives every schedule


def make_agent(spec: RunSpec, observation_size: int, action_size: int) -> Agent:
    _, make = AGENTS[spec.agent]
    return make(spec.agent_config, observation_size, action_size)


def lane_key(seed: int, task: str) -> jax.Array:
    """A lane's key depends only on its seed and its task's name (not on the task's place in any list), so seed i of
    a many-seed run replays a 1-seed run, and adding a task to the registry changes no other run's streams."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(task.encode()))


# jax's dot algorithm for each `train.matmul_precision` (None: the backend's default).
MATMUL_ALGORITHMS = {"default": None, "float32": "F32_F32_F32", "tf32": "TF32_TF32_F32", "bfloat16": "BF16_BF16_F32"}


def matmul_precision_problem(spec: RunSpec, backend: str) -> str | None:
    """Why `spec`'s matmul precision cannot run on `backend`, or None. XLA's CPU compiler has no TF32 and rejects
    bfloat16 products inside batched programs: there only float32 is available."""
    precision = spec.train.matmul_precision
    if backend == "cpu" and precision in ("tf32", "bfloat16"):
        return (f"train.matmul_precision = {precision!r} needs an accelerator: XLA's CPU compiler computes float32 "
                "products only; use 'default' or 'float32' here")
    return None


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class DomainProgram:
    """The compiled programs of one domain of a spec: init, chunk, evaluate."""

    def __init__(self, spec: RunSpec, tasks: list[str]):
        self.spec, self.tasks = spec, list(tasks)
        self.train = spec.train
        self.num_seeds, self.num_tasks = len(spec.seeds), len(tasks)
        make = functools.partial(envs_mjx.make, tasks[0], spec.train.action_repeat, spec.train.physics)
        # Warp sizes the contact pool one vmapped call shares by that call's lanes: training steps [seed, task],
        # evaluation [seed, task, episode or held-out row]. The other backends return one env for both.
        lanes = self.num_seeds * self.num_tasks
        self.env = make(worlds=lanes)
        self.eval_env = make(worlds=lanes * max(spec.train.eval_episodes, spec.train.diagnostic_rows, 1))
        self.agent = make_agent(spec, self.env.observation_size, self.env.action_size)
        self.task_params = [self.env.task_params(t.split("-", 1)[1]) for t in tasks]
        self.held_out_capacity = max(1, math.ceil(spec.train.capacity * spec.train.holdout_fraction))
        self.chunk = self.env.jit(self._with_precision(self._chunk), donate_argnums=0)
        self.evaluate = self.env.jit(self._with_precision(self._evaluate))
        self._abstract_state = None

    def _with_precision(self, f):
        """`f` traced under the spec's matmul precision (a trace-time setting: it is part of the compiled program)."""
        algorithm = MATMUL_ALGORITHMS[self.train.matmul_precision]
        if algorithm is None:
            return f

        @functools.wraps(f)
        def traced(*args):
            with jax.default_matmul_precision(algorithm):
                return f(*args)

        return traced

    # ------------------------------------------------------------------------------------------ init
    def _init_lane(self, key: jax.Array, params) -> Lane:
        k_agent, k_env, k_train, k_eval = jax.random.split(key, 4)
        env_state = self.env.reset(k_env, params)
        d = env_state.data
        row = {"obs": env_state.obs, "action": jnp.zeros((self.env.action_size,)), "reward": jnp.zeros(()),
               "next_obs": env_state.obs, "mask": jnp.zeros(()), "qpos": d.qpos, "qvel": d.qvel, "act": d.act,
               "task_state": env_state.task_state}
        return Lane(agent=self.agent.init(k_agent),
                    buffer=replay.train_buffer_init(self.train.capacity, self.env.observation_size,
                                                    self.env.action_size),
                    held_out=replay.held_out_init(self.held_out_capacity, row),
                    env=env_state, key=k_train, eval_key=k_eval, episode_return=jnp.zeros(()))

    def lane_keys(self) -> jax.Array:
        return jnp.stack([jnp.stack([lane_key(s, t) for t in self.tasks]) for s in self.spec.seeds])

    def stacked_params(self):
        per_task = jax.tree.map(lambda *x: jnp.stack(x), *self.task_params)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_seeds, *x.shape)), per_task)

    def _init_lanes(self, keys: jax.Array, params) -> DomainState:
        lanes = vmap_leading(self._init_lane, 2, keys, params)
        return DomainState(lanes=lanes, step=jnp.zeros((), jnp.int32))

    def init(self) -> DomainState:
        return self.env.jit(self._init_lanes)(self.lane_keys(), self.stacked_params())

    def abstract_state(self) -> DomainState:
        # Shapes only, traced without `Env.jit`: a domain's compiler options are refused on a jit nested inside
        # another transformation (eval_shape), and tracing needs none. Tracing a reset takes seconds: once.
        if self._abstract_state is None:
            self._abstract_state = jax.eval_shape(self._init_lanes, self.lane_keys(), self.stacked_params())
        return self._abstract_state

    # ----------------------------------------------------------------------------------------- chunk
    def _collect(self, lane: Lane, action: jax.Array, k_hold: jax.Array):
        """One lane's env step and buffer inserts; the episode's return so far, before any episode reset."""
        cfg, env = self.train, self.env
        obs = lane.env.obs
        env_state = env.step(lane.env, action)
        # A NaN from the physics (flagged by the env) or from a diverged policy never enters a buffer.
        ok = ~env_state.nan & jnp.all(jnp.isfinite(action))
        held = jax.random.uniform(k_hold) < cfg.holdout_fraction
        buffer = replay.train_buffer_add(lane.buffer, obs, action, env_state.reward, env_state.obs, env_state.done,
                                         lane.env.step == 0, ~held, ok)
        d = lane.env.data
        # The physics state and the episode's targets let diagnostics restore the simulator to this transition.
        row = {"obs": obs, "action": action, "reward": env_state.reward, "next_obs": env_state.obs,
               "mask": 1.0 - env_state.done.astype(jnp.float32), "qpos": d.qpos, "qvel": d.qvel, "act": d.act,
               "task_state": lane.env.task_state}
        held_out = replay.held_out_add(lane.held_out, row, ok & held)
        episode_return = lane.episode_return + jnp.where(ok, env_state.reward, 0.0)
        nan = lane.env.nan | env_state.nan
        lane = lane.replace(buffer=buffer, held_out=held_out, env=env_state, episode_return=episode_return)
        if self.agent.observe is not None:  # training observations only: held-out ones stay unseen by the agent
            lane = lane.replace(agent=self.agent.observe(lane.agent, obs, ok & ~held))
        return lane, nan

    def _update_lane(self, agent_state, buffer: replay.TrainBuffer, key: jax.Array, t: jax.Array):
        new_state, metrics = self.agent.update(agent_state, functools.partial(replay.train_buffer_sample, buffer),
                                               key, t)
        # The agent dropped every non-finite optimiser step itself (vecrl.agents.base.guarded_step), keeping its
        # last finite parameters; the lane is flagged from its scalar metrics alone, so no select over the agent's
        # state (and the data it may hold) follows the update.
        rejected = (metrics[DROPPED] > 0) | ~_all_finite(metrics)
        return new_state, metrics, rejected

    def _step_lanes(self, lanes: Lane, t: jax.Array):
        """One agent step of every lane ([seed, task] leading axes). Each schedule is a `lax.cond` on the unbatched
        step taken outside the lane vmaps: a real branch, and traced once rather than re-batched per vmap level."""
        cfg, env, agent = self.train, self.env, self.agent
        lanes_map = lambda f, *args: vmap_leading(f, 2, *args)  # noqa: E731  (one vmap over [seed, task])
        keys = lanes_map(lambda k: jax.random.split(k, 5), lanes.key)
        key, k_act, k_hold, k_update, k_reset = (keys[:, :, i] for i in range(5))
        if cfg.reset_every:
            # The reset comes first in step t = k * reset_every, so what ran between chunks at that step (the
            # evaluation, the checkpoint, the training episode that ended there) saw the agent before the reset,
            # and no reset falls after the last step: a run with reset_every == steps ends as one without resets.
            # The fresh agent comes from a key of its own, so resets leave every other random stream unchanged.
            if agent.reset is None:
                fresh = lambda: lanes_map(lambda k: agent.init(jax.random.fold_in(k, 1)), k_update)  # noqa: E731
            else:
                fresh = lambda: lanes_map(lambda a, k: agent.reset(a, jax.random.fold_in(k, 1)),  # noqa: E731
                                          lanes.agent, k_update)
            lanes = lanes.replace(agent=jax.lax.cond((t > 0) & (t % cfg.reset_every == 0), fresh,
                                                     lambda: lanes.agent))
        action = jax.lax.cond(
            t < cfg.warmup_steps,
            lambda: lanes_map(lambda k: jax.random.uniform(k, (env.action_size,), minval=-1.0, maxval=1.0), k_act),
            lambda: lanes_map(lambda a, o, k: agent.act(a, o, k, True), lanes.agent, lanes.env.obs, k_act))
        lanes, env_nan = lanes_map(self._collect, lanes, action, k_hold)

        def no_update(agent_state):
            zeros = jnp.zeros((self.num_seeds, self.num_tasks))
            return agent_state, {k: zeros for k in agent.metric_names}, zeros.astype(bool)

        agent_state, metrics, rejected = jax.lax.cond(
            t + 1 > cfg.warmup_steps,
            lambda a: lanes_map(lambda a, b, k: self._update_lane(a, b, k, t), a, lanes.buffer, k_update),
            no_update, lanes.agent)
        episode_over = (t + 1) % env.episode_length == 0  # every lane's episode ends on the same step
        env_state, next_return = jax.lax.cond(
            episode_over,
            lambda: (lanes_map(env.reset, k_reset, lanes.env.params), jnp.zeros_like(lanes.episode_return)),
            lambda: (lanes.env, lanes.episode_return))
        out = {"return": jnp.where(episode_over, lanes.episode_return, jnp.nan), "env_nan": env_nan,
               "rejected_update": rejected, "metrics": metrics}
        lanes = lanes.replace(agent=agent_state, env=env_state, key=key, episode_return=next_return)
        return lanes, out

    def _chunk(self, state: DomainState):
        chex.assert_shape(state.lanes.episode_return, (self.num_seeds, self.num_tasks))

        def body(carry, _):
            lanes, t = carry
            lanes, out = self._step_lanes(lanes, t)
            return (lanes, t + 1), out

        (lanes, step), outputs = jax.lax.scan(body, (state.lanes, state.step), None, length=self.train.chunk_steps)
        return DomainState(lanes=lanes, step=step), outputs  # outputs: [K, seed, task, ...]

    # -------------------------------------------------------------------------------------- evaluate
    def _eval_episodes(self, lanes: Lane, step: jax.Array) -> dict[str, jax.Array]:
        """Deterministic-policy episodes of every lane, and the critic's value Q(s, pi(s)) at each state they visit.
        The physics runs as one vmap over [seed, task, episode], the policy as one over [seed, task]."""
        env, agent, n = self.eval_env, self.agent, self.train.eval_episodes

        def lane_keys(eval_key):
            k_reset, k_act = jax.random.split(jax.random.fold_in(eval_key, step))
            return jax.random.split(k_reset, n), jax.random.split(k_act, env.episode_length)

        reset_keys, step_keys = vmap_leading(lane_keys, 2, lanes.eval_key)  # [seed, task, n], [seed, task, T]
        states = vmap_leading(env.reset, 3, reset_keys, per_row(lanes.env.params, n))

        def policy(agent_state, obs, k):  # one lane's n episodes
            k_act, k_value = jax.random.split(k)
            actions = jax.vmap(lambda o, kk: agent.act(agent_state, o, kk, False))(obs, jax.random.split(k_act, n))
            values = jax.vmap(lambda o, kk: agent.value(agent_state, o, kk))(obs, jax.random.split(k_value, n))
            return actions, values

        def body(states, k):
            actions, values = vmap_leading(policy, 2, lanes.agent, states.obs, k)
            states = vmap_leading(env.step, 3, states, actions)
            return states, (states.reward, values)

        _, (rewards, values) = jax.lax.scan(body, states, jnp.moveaxis(step_keys, 2, 0))  # [T, seed, task, n]
        q_pred, q_mc = vmap_leading(lambda r, v: overestimation_pair(r, v, agent.gamma), 2,
                                    jnp.moveaxis(rewards, 0, 2), jnp.moveaxis(values, 0, 2))
        return {"eval_return": jnp.sum(rewards, axis=0), "q_pred": q_pred, "q_mc": q_mc}

    def _generalisation(self, lanes: Lane, step: jax.Array) -> dict[str, jax.Array]:
        """The critic's squared TD error on training transitions, on held-out transitions, and on on-policy held-out
        transitions: the simulator restored to each held-out state and stepped with the target policy's action
        (paper Fig. 2 left). NaN for the held-out losses while the held-out buffer is empty. [seed, task] each."""
        env, agent, rows = self.eval_env, self.agent, self.train.diagnostic_rows
        transitions = ("obs", "action", "reward", "next_obs", "mask")

        def draw(lane):
            k_train, k_held, k_target, k_loss = jax.random.split(
                jax.random.fold_in(jax.random.fold_in(lane.eval_key, step), 1), 4)
            train = replay.train_buffer_sample(lane.buffer, k_train, (rows,))
            held = replay.held_out_sample(lane.held_out, k_held, (rows,))
            actions = jax.vmap(agent.target_action, in_axes=(None, 0, 0))(lane.agent, held["obs"],
                                                                          jax.random.split(k_target, rows))
            return train, held, actions, k_loss

        train, held, actions, k_loss = vmap_leading(draw, 2, lanes)
        restored = vmap_leading(env.restore, 3, held["qpos"], held["qvel"], held["act"], held["task_state"],
                                per_row(lanes.env.params, rows))
        stepped = vmap_leading(env.step, 3, restored, actions)

        def losses(lane, train, held, actions, stepped, k_loss):
            on_policy = {"obs": held["obs"], "action": actions, "reward": stepped.reward, "next_obs": stepped.obs,
                         "mask": held["mask"] * (1.0 - stepped.nan.astype(jnp.float32))}
            k1, k2, k3 = jax.random.split(k_loss, 3)
            empty = jnp.where(lane.held_out.size() > 0, 0.0, jnp.nan)
            held_transitions = {k: held[k] for k in transitions}
            out = {"td_error/train": agent.td_error(lane.agent, train, k1),
                   "td_error/held_out": agent.td_error(lane.agent, held_transitions, k2) + empty,
                   "td_error/on_policy": agent.td_error(lane.agent, on_policy, k3) + empty}
            if agent.model_error is not None:
                out["model_error/train"] = agent.model_error(lane.agent, train)
                out["model_error/held_out"] = agent.model_error(lane.agent, held_transitions) + empty
            return out

        return vmap_leading(losses, 2, lanes, train, held, actions, stepped, k_loss)

    def _evaluate(self, state: DomainState) -> dict[str, jax.Array]:
        """Evaluation and diagnostics for every lane: "eval_return" [seed, task, episodes]; the rest [seed, task]."""
        out = self._eval_episodes(state.lanes, state.step)
        if self.train.diagnostic_rows:
            out.update(self._generalisation(state.lanes, state.step))
        return out


def vmap_leading(f, ndim: int, *args):
    """`f` mapped over the first `ndim` axes of every array in `args` as one vmap over their product (lanes
    [seed, task], or lanes and episodes): every batching rule (MJX's while-loops, the agents' scans) then runs once
    rather than once per axis, which divides tracing time by about the number of axes."""
    lead = jax.tree.leaves(args)[0].shape[:ndim]
    size = math.prod(lead)
    flat = jax.tree.map(lambda x: x.reshape((size, *x.shape[ndim:])), args)
    return jax.tree.map(lambda x: x.reshape((*lead, *x.shape[1:])), jax.vmap(f)(*flat))


def per_row(params, rows: int):
    """Each lane's task parameters [seed, task, ...] repeated for `rows` rows: [seed, task, rows, ...]."""
    return jax.tree.map(lambda p: jnp.broadcast_to(p[:, :, None], (*p.shape[:2], rows, *p.shape[2:])), params)


def overestimation_pair(rewards: jax.Array, values: jax.Array, gamma: float) -> tuple[jax.Array, jax.Array]:
    """Mean predicted value and mean discounted Monte-Carlo return over the same states, from [T, episodes]
    rewards (the reward of acting at step t) and values (the critic's Q(s_t, pi(s_t))).

    Episodes end at a time limit that the critic does not see, so the return from a state near the end is cut
    short; only states whose remaining horizon carries all but 1% of the discounted weight are used (at least
    the first state)."""
    chex.assert_equal_shape((rewards, values))
    steps = rewards.shape[0]

    def backward(g, r):
        g = r + gamma * g
        return g, g

    _, returns = jax.lax.scan(backward, jnp.zeros(rewards.shape[1:]), rewards, reverse=True)
    horizon = math.ceil(math.log(0.01) / math.log(gamma)) if gamma > 0 else 1
    used = max(1, steps - horizon)
    return jnp.mean(values[:used]), jnp.mean(returns[:used])
