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
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct

import envs_mjx
from vecrl import replay
from vecrl.agents.base import Agent
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
    """A lane's key depends only on its seed and task, so seed i of a many-seed run replays a 1-seed run."""
    return jax.random.fold_in(jax.random.key(seed), envs_mjx.TASKS.index(task))


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class DomainProgram:
    """The compiled programs of one domain of a spec: init, chunk, evaluate."""

    def __init__(self, spec: RunSpec, tasks: list[str]):
        self.spec, self.tasks = spec, list(tasks)
        self.train = spec.train
        self.env = envs_mjx.make(tasks[0], action_repeat=spec.train.action_repeat)
        self.agent = make_agent(spec, self.env.observation_size, self.env.action_size)
        self.num_seeds, self.num_tasks = len(spec.seeds), len(tasks)
        self.task_params = [self.env.task_params(t.split("-", 1)[1]) for t in tasks]
        self.held_out_capacity = max(1, math.ceil(spec.train.capacity * spec.train.holdout_fraction))
        self.chunk = self.env.jit(self._chunk, donate_argnums=0)
        self.evaluate = self.env.jit(self._evaluate)

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

    def init(self) -> DomainState:
        lanes = self.env.jit(jax.vmap(jax.vmap(self._init_lane)))(self.lane_keys(), self.stacked_params())
        return DomainState(lanes=lanes, step=jnp.zeros((), jnp.int32))

    def abstract_state(self) -> DomainState:
        return jax.eval_shape(self.init)

    # ----------------------------------------------------------------------------------------- chunk
    def _lane_step(self, lane: Lane, t: jax.Array):
        cfg, env, agent = self.train, self.env, self.agent
        key, k_act, k_hold, k_update, k_reset = jax.random.split(lane.key, 5)
        obs = lane.env.obs
        action = jax.lax.cond(
            t < cfg.warmup_steps,
            lambda: jax.random.uniform(k_act, (env.action_size,), minval=-1.0, maxval=1.0),
            lambda: agent.act(lane.agent, obs, k_act, True))
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

        def update(agent_state):
            new_state, metrics = agent.update(agent_state, functools.partial(replay.train_buffer_sample, buffer),
                                              k_update, t)
            # A diverging update is rejected: this lane keeps its last finite agent and is flagged.
            finite = _all_finite(metrics) & _all_finite(new_state)
            new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, agent_state)
            return new_state, metrics, ~finite

        def no_update(agent_state):
            return agent_state, {k: jnp.zeros(()) for k in agent.metric_names}, jnp.asarray(False)

        agent_state, metrics, rejected = jax.lax.cond(t + 1 > cfg.warmup_steps, update, no_update, lane.agent)
        if cfg.reset_every:
            # A fresh agent from a key of its own, so that resets leave every other random stream unchanged.
            k_fresh = jax.random.fold_in(k_update, 1)
            fresh = agent.init if agent.reset is None else functools.partial(agent.reset, agent_state)
            agent_state = jax.lax.cond((t + 1) % cfg.reset_every == 0, lambda: fresh(k_fresh), lambda: agent_state)

        episode_return = lane.episode_return + jnp.where(ok, env_state.reward, 0.0)
        episode_over = (t + 1) % env.episode_length == 0  # every lane's episode ends on the same step
        env_state, next_return = jax.lax.cond(
            episode_over, lambda: (env.reset(k_reset, lane.env.params), jnp.zeros(())),
            lambda: (env_state, episode_return))
        out = {"return": jnp.where(episode_over, episode_return, jnp.nan), "env_nan": lane.env.nan | env_state.nan,
               "rejected_update": rejected, "metrics": metrics}
        lane = lane.replace(agent=agent_state, buffer=buffer, held_out=held_out, env=env_state, key=key,
                            episode_return=next_return)
        return lane, out

    def _chunk(self, state: DomainState):
        chex.assert_shape(state.lanes.episode_return, (self.num_seeds, self.num_tasks))
        step_all = jax.vmap(jax.vmap(self._lane_step, in_axes=(0, None)), in_axes=(0, None))

        def body(carry, _):
            lanes, t = carry
            lanes, out = step_all(lanes, t)
            return (lanes, t + 1), out

        (lanes, step), outputs = jax.lax.scan(body, (state.lanes, state.step), None, length=self.train.chunk_steps)
        return DomainState(lanes=lanes, step=step), outputs  # outputs: [K, seed, task, ...]

    # -------------------------------------------------------------------------------------- evaluate
    def _eval_lane(self, lane: Lane, step: jax.Array) -> dict[str, jax.Array]:
        """Deterministic-policy episodes, and the critic's value Q(s, pi(s)) at each state they visit."""
        env, agent, n = self.env, self.agent, self.train.eval_episodes
        k_reset, k_act = jax.random.split(jax.random.fold_in(lane.eval_key, step))
        states = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, n), lane.env.params)

        def body(states, k):
            k_act, k_value = jax.random.split(k)
            actions = jax.vmap(lambda o, kk: agent.act(lane.agent, o, kk, False))(states.obs, jax.random.split(k_act, n))
            values = jax.vmap(lambda o, kk: agent.value(lane.agent, o, kk))(states.obs, jax.random.split(k_value, n))
            states = jax.vmap(env.step)(states, actions)
            return states, (states.reward, values)

        _, (rewards, values) = jax.lax.scan(body, states, jax.random.split(k_act, env.episode_length))
        q_pred, q_mc = overestimation_pair(rewards, values, agent.gamma)
        return {"eval_return": jnp.sum(rewards, axis=0), "q_pred": q_pred, "q_mc": q_mc}

    def _generalisation_lane(self, lane: Lane, step: jax.Array) -> dict[str, jax.Array]:
        """The critic's squared TD error on training transitions, on held-out transitions, and on on-policy held-out
        transitions: the simulator restored to each held-out state and stepped with the target policy's action
        (paper Fig. 2 left). NaN for the held-out losses while the held-out buffer is empty."""
        env, agent, rows = self.env, self.agent, self.train.diagnostic_rows
        k_train, k_held, k_target, k_loss = jax.random.split(
            jax.random.fold_in(jax.random.fold_in(lane.eval_key, step), 1), 4)
        transitions = ("obs", "action", "reward", "next_obs", "mask")
        train = replay.train_buffer_sample(lane.buffer, k_train, (rows,))
        held = replay.held_out_sample(lane.held_out, k_held, (rows,))
        actions = jax.vmap(agent.target_action, in_axes=(None, 0, 0))(lane.agent, held["obs"],
                                                                      jax.random.split(k_target, rows))
        restored = jax.vmap(env.restore, in_axes=(0, 0, 0, 0, None))(held["qpos"], held["qvel"], held["act"],
                                                                     held["task_state"], lane.env.params)
        stepped = jax.vmap(env.step)(restored, actions)
        on_policy = {"obs": held["obs"], "action": actions, "reward": stepped.reward, "next_obs": stepped.obs,
                     "mask": held["mask"] * (1.0 - stepped.nan.astype(jnp.float32))}
        k1, k2, k3 = jax.random.split(k_loss, 3)
        empty = jnp.where(lane.held_out.size() > 0, 0.0, jnp.nan)
        return {"td_error/train": agent.td_error(lane.agent, train, k1),
                "td_error/held_out": agent.td_error(lane.agent, {k: held[k] for k in transitions}, k2) + empty,
                "td_error/on_policy": agent.td_error(lane.agent, on_policy, k3) + empty}

    def _evaluate(self, state: DomainState) -> dict[str, jax.Array]:
        """Evaluation and diagnostics for every lane: "eval_return" [seed, task, episodes]; the rest [seed, task]."""
        def lane_fn(lane, step):
            out = self._eval_lane(lane, step)
            if self.train.diagnostic_rows:
                out.update(self._generalisation_lane(lane, step))
            return out

        return jax.vmap(jax.vmap(lane_fn, in_axes=(0, None)), in_axes=(0, None))(state.lanes, state.step)


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
