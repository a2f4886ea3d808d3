"""The interface between agents and the trainer.

An agent knows nothing of seeds, chunks, files or the CLI. Inside the trainer it runs under vmap over
[seed, task], so every function here sees unbatched arrays: one observation [obs_size], minibatches of rows
[..., batch_size, ...] drawn from one lane's replay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]  # obs, action, reward, next_obs, mask (1 - episode_end)
# sample(key, shape) -> a Batch of real training transitions with leading axes `shape`, drawn uniformly with
# replacement from the lane's train buffer. sample(key, shape, length=L) draws sequences of L consecutive
# transitions instead (axes [*shape, L]), `mask` 0 from the first step that leaves the episode or the train set on.
# sample(key, shape, split=(offset, every, held)) draws from one part of a split of the train buffer: every
# `every`-th transition from `offset` when `held`, the others when not (see vecrl.replay.train_buffer_sample).
Sampler = Callable[[jax.Array, tuple[int, ...]], Batch]


@dataclasses.dataclass(frozen=True)
class Agent:
    """init(key) -> state; act(state, obs, key, explore) -> action in [-1, 1]; update(state, sample, key, step) ->
    (state, metrics): one agent step's learning. The agent draws what it needs through `sample` (a Sampler), so
    that data used only on some steps is drawn only inside those branches; `step` is the number of agent steps
    done, unbatched (the same for every seed), so schedules inside an agent stay real branches under vmap.
    `batch_size` is the largest number of rows it draws at once, which the replay must hold when updates start.

    The paper's diagnostics see the critic through three more functions (unbatched, like the rest):
    target_action(state, obs, key) -> the action the critic's TD target evaluates at `obs` (the target policy);
    value(state, obs, key) -> the critic's estimate of Q(obs, target_action), the value it bootstraps with;
    td_error(state, batch, key) -> the critic's squared TD error on real transitions `batch` (rows, no leading
        minibatch axis): (value estimate - TD target)^2, averaged over critic heads and over the rows with mask 1.
        In value units whatever the training loss, so that agents can be compared.
    """

    name: str
    config: Any
    init: Callable[[jax.Array], Any]
    act: Callable[[Any, jax.Array, jax.Array, bool], jax.Array]
    update: Callable[[Any, Sampler, jax.Array, jax.Array], tuple[Any, dict[str, jax.Array]]]
    batch_size: int
    metric_names: tuple[str, ...]
    gamma: float  # per agent step
    target_action: Callable[[Any, jax.Array, jax.Array], jax.Array]
    value: Callable[[Any, jax.Array, jax.Array], jax.Array]
    td_error: Callable[[Any, Batch, jax.Array], jax.Array]
    # reset(state, key) -> state: what `train.reset_every` re-initialises; None means the whole state (init).
    reset: Callable[[Any, jax.Array], Any] | None = None
    # observe(state, obs, valid) -> state: sees each observation collected for training (where `valid`), before
    # any update, warm-up included; for agents that keep statistics of their inputs. None: not needed.
    observe: Callable[[Any, jax.Array, jax.Array], Any] | None = None
    # model_error(state, batch) -> the squared error of the agent's one-step model on real transitions `batch`
    # (rows), as the agent measures it (MBPO: its elites' mean prediction of [next_obs - obs, reward]), averaged over
    # the rows with mask 1; the trainer's diagnostics read it on training and on held-out transitions. None: no
    # model, or none whose error is comparable.
    model_error: Callable[[Any, Batch], jax.Array] | None = None
    # Named pure functions of the agent's internals, for diagnostics and tests (e.g. "critic_loss", "q_values").
    extras: Mapping[str, Callable] = dataclasses.field(default_factory=dict)


# The metric every agent's update reports: how many of its optimiser steps were dropped as non-finite (see
# `guarded_step`). The trainer flags a lane whose update dropped a step or returned a non-finite metric.
DROPPED = "updates_dropped"


def guarded_step(optimizer: optax.GradientTransformation, grads, opt_state, params):
    """One optimiser step, dropped (parameters and optimiser state kept as they were) when its gradient is not
    finite: (params, opt_state, dropped). Starting from finite parameters and optimiser state, only a non-finite
    gradient can make a step non-finite, so this keeps an agent finite. The decision is one scalar, the gradient's
    norm, known before the step, so the choice between old and new values happens inside the elementwise pass that
    applies the update: a guarded step reads and writes what an unguarded one does (unlike a select over the
    agent's whole state after its update)."""
    ok = jnp.isfinite(optax.tree.norm(grads))
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: jnp.where(ok, p + u, p), params, updates)
    new_opt_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_opt_state, opt_state)
    return params, new_opt_state, ~ok


def guarded_polyak(online, target, tau: float, dropped: jax.Array):
    """target <- (1 - tau) target + tau online, unless the online network's step was dropped (then the whole step,
    target update included, is undone)."""
    return jax.tree.map(lambda o, t: jnp.where(dropped, t, (1 - tau) * t + tau * o), online, target)


def count(*dropped: jax.Array) -> jax.Array:
    """The number of dropped steps among `dropped` (booleans of any shape), as a float metric."""
    return sum(jnp.sum(d.astype(jnp.float32)) for d in dropped)


def summarise(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-gradient-step metrics [utd] of one agent step: each averaged, except the dropped steps, which add up."""
    return {k: jnp.sum(v) if k == DROPPED else jnp.mean(v) for k, v in metrics.items()}
