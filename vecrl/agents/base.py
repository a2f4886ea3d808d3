"""The interface between agents and the trainer.

An agent knows nothing of seeds, chunks, files or the CLI. Inside the trainer it runs under vmap over
[seed, task], so every function here sees unbatched arrays: one observation [obs_size], one minibatch
[batches_per_step, batch_size, ...].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

Batch = dict[str, jax.Array]  # obs, action, reward, next_obs, mask (1 - episode_end)


@dataclasses.dataclass(frozen=True)
class Agent:
    """init(key) -> state; act(state, obs, key, explore) -> action in [-1, 1]; update(state, batches, key) ->
    (state, metrics). `batches` has a leading axis of `batches_per_step` minibatches of `batch_size` rows each,
    sampled by the trainer for one agent step."""

    name: str
    config: Any
    init: Callable[[jax.Array], Any]
    act: Callable[[Any, jax.Array, jax.Array, bool], jax.Array]
    update: Callable[[Any, Batch, jax.Array], tuple[Any, dict[str, jax.Array]]]
    batch_size: int
    batches_per_step: int
    metric_names: tuple[str, ...]
    # Named pure functions of the agent's internals, for diagnostics and tests (e.g. "critic_loss", "q_values").
    extras: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
