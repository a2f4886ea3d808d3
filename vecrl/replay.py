"""On-device replay for one (seed, task) lane; the trainer vmaps it. All functions are pure.

`TrainBuffer` stores each step's observation once: transition s lives in slot s % capacity and its next
observation is the next slot's observation (written together with the transition, so the newest transition is
complete). That halves the observation memory of a paper-size run. Which transitions may be sampled is kept in a
ring of transition numbers (`index`), so the 5% routed to the held-out buffer, and anything rejected, are never
sampled, while their observations still serve as their predecessors' next observations. Sequences of
consecutive transitions (for multi-step model losses) are drawn from the same index: see `train_buffer_sample`.

`HeldOutBuffer` is a plain ring of complete transitions (with whatever extra per-row data the trainer adds,
e.g. the physics state), small because it receives only the held-out fraction.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainBuffer:
    obs: jax.Array  # [C, obs]
    action: jax.Array  # [C, act]
    reward: jax.Array  # [C]
    mask: jax.Array  # [C] 1 - episode_end: the last transition of an episode has weight 0 in every loss
    index: jax.Array  # [C] int32 ring of transition numbers that may be sampled
    inserted: jax.Array  # int32: transitions written so far
    indexed: jax.Array  # int32: entries appended to `index` so far
    oldest: jax.Array  # int32: first entry of `index` whose transition is still complete in the ring

    @property
    def capacity(self) -> int:
        return self.obs.shape[0]

    def size(self) -> jax.Array:
        """Number of transitions that can be sampled."""
        return self.indexed - self.oldest


def train_buffer_init(capacity: int, obs_size: int, action_size: int) -> TrainBuffer:
    if capacity < 2:
        raise ValueError(f"replay capacity must be at least 2, got {capacity}")
    zero = jnp.zeros((), jnp.int32)
    return TrainBuffer(obs=jnp.zeros((capacity, obs_size)), action=jnp.zeros((capacity, action_size)),
                       reward=jnp.zeros((capacity,)), mask=jnp.zeros((capacity,)),
                       index=jnp.zeros((capacity,), jnp.int32), inserted=zero, indexed=zero, oldest=zero)


def train_buffer_add(buf: TrainBuffer, obs, action, reward, next_obs, episode_end, new_episode, sampleable,
                     valid) -> TrainBuffer:
    """Write one transition if `valid`; make it sampleable if `sampleable`.

    `new_episode` says `obs` starts an episode: then the previous transition's next observation (pre-written
    in this slot) is about to be replaced, so that transition gets weight 0; it was an episode end already
    unless its episode stopped early (a contained NaN).
    """
    c = buf.capacity
    s = buf.inserted
    slot, next_slot, prev_slot = s % c, (s + 1) % c, (s - 1) % c
    valid = jnp.asarray(valid)
    sampleable = valid & sampleable

    # Only the touched rows are selected on `valid`: a whole-buffer select would cost O(capacity) per step.
    def put(array, i, row):
        return array.at[i].set(jnp.where(valid, row, array[i]))

    mask = put(buf.mask, prev_slot, jnp.where(new_episode, 0.0, buf.mask[prev_slot]))
    mask = put(mask, slot, 1.0 - episode_end.astype(jnp.float32))
    obs_ = put(put(buf.obs, slot, obs), next_slot, next_obs)
    index = buf.index.at[buf.indexed % c].set(jnp.where(sampleable, s, buf.index[buf.indexed % c]))
    indexed = buf.indexed + sampleable.astype(jnp.int32)
    inserted = s + valid.astype(jnp.int32)
    # Writing next_slot destroyed transition s + 1 - c (its observation) and, earlier, all before it: at most one
    # index entry (they are increasing) falls out of the window per write.
    stale = (buf.oldest < indexed) & (index[buf.oldest % c] < inserted + 1 - c)
    return buf.replace(obs=obs_, action=put(buf.action, slot, action), reward=put(buf.reward, slot, reward),
                       mask=mask, index=index, inserted=inserted, indexed=indexed,
                       oldest=buf.oldest + stale.astype(jnp.int32))


def train_buffer_sample(buf: TrainBuffer, key: jax.Array, shape: tuple[int, ...],
                        length: int | None = None, split: Split | None = None) -> dict[str, jax.Array]:
    """Uniform with replacement over sampleable transitions. The buffer must not be empty.

    With `split` = (offset, every, held), single transitions are drawn from one part of a split of the sampleable
    transitions: every `every`-th one (in the order they were collected, from `offset`) when `held`, else all the
    others. A model can then be fitted on one part and judged on the other, as MBPO ranks its ensemble.

    With `length` = L, each draw is a sequence: the L transitions that follow one another from a sampleable start,
    every array with an extra axis L after `shape` (obs [*shape, L, obs], mask [*shape, L], ...). Sequences are
    not resampled where they run out: `mask` weighs step k with 1 only while steps 0..k all bootstrap (none is an
    episode's last) and are all sampleable, and with 0 from the first step that breaks that onward. The rows of
    zero-weight steps hold whatever the slots hold (stale but finite).

    Held-out transitions are excluded from sequences too, not only as starts: they are written to this buffer
    (their observations are their predecessors' next observations) but a model trained on sequences through them
    would learn their actions and rewards, which the held-out diagnostics assume no part of the agent has seen.
    Excluding them costs no memory: the index is strictly increasing, so transitions s0..s0 + k are all
    sampleable exactly when the index entry k places after s0's holds s0 + k. The same test keeps sequences
    inside the written window, since indexed transitions newer than a complete start are complete.
    """
    c = buf.capacity
    if split is not None:
        if length is not None:
            raise ValueError("a split draws single transitions, not sequences")
        u = _split_entries(buf, key, shape, *split)
    else:
        u = jax.random.randint(key, shape, buf.oldest, jnp.maximum(buf.indexed, buf.oldest + 1))
    if length is None:
        s = buf.index[u % c]
        return _transitions(buf, s, buf.mask[s % c])
    if length < 1:
        raise ValueError(f"sequence length must be at least 1, got {length}")
    steps = jnp.arange(length, dtype=jnp.int32)
    entry = u[..., None] + steps  # [*shape, L] positions in the index
    s = buf.index[u % c][..., None] + steps  # [*shape, L] transition numbers
    sampleable_run = (entry < buf.indexed) & (buf.index[entry % c] == s)
    weight = jnp.cumprod(jnp.where(sampleable_run, buf.mask[s % c], 0.0), axis=-1)
    return _transitions(buf, s, weight)


Split = tuple[jax.Array, int, bool]  # (offset, every, held): see train_buffer_sample


def _split_entries(buf: TrainBuffer, key: jax.Array, shape: tuple[int, ...], offset: jax.Array, every: int,
                   held: bool) -> jax.Array:
    """Entries of the index ring, uniform over one part of the split: those e with (e - offset) % every == 0 when
    `held`, else the others. Counted with y = e + every - offset (never negative), the held entries are the
    multiples of `every`; the others are ranked by k = y - ceil(y / every), which inverts in closed form, so each
    part is drawn directly rather than by rejection."""
    if every < 2:
        raise ValueError(f"a split needs every >= 2 (one part held), got {every}")
    y_lo, y_hi = buf.oldest + every - offset, buf.indexed + every - offset
    if held:
        lo, hi = -(-y_lo // every), -(-y_hi // every)
        y = every * jax.random.randint(key, shape, lo, jnp.maximum(hi, lo + 1))
    else:
        rank = lambda y: y - (-(-y // every))  # noqa: E731  (others below y)
        lo, hi = rank(y_lo), rank(y_hi)
        k = jax.random.randint(key, shape, lo, jnp.maximum(hi, lo + 1))
        y = (k // (every - 1)) * every + k % (every - 1) + 1
    return y - every + offset


def _transitions(buf: TrainBuffer, s: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """The rows of transition numbers `s` (any shape), weighted by `mask`."""
    c = buf.capacity
    slot, next_slot = s % c, (s + 1) % c
    return {"obs": buf.obs[slot], "action": buf.action[slot], "reward": buf.reward[slot],
            "next_obs": buf.obs[next_slot], "mask": mask}


@struct.dataclass
class HeldOutBuffer:
    data: Any  # pytree of [H, ...] rows
    inserted: jax.Array  # int32

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]

    def size(self) -> jax.Array:
        return jnp.minimum(self.inserted, self.capacity)


def held_out_init(capacity: int, example_row: Any) -> HeldOutBuffer:
    if capacity < 1:
        raise ValueError(f"held-out capacity must be at least 1, got {capacity}")
    data = jax.tree.map(lambda x: jnp.zeros((capacity, *jnp.shape(x)), jnp.asarray(x).dtype), example_row)
    return HeldOutBuffer(data=data, inserted=jnp.zeros((), jnp.int32))


def held_out_add(buf: HeldOutBuffer, row: Any, valid) -> HeldOutBuffer:
    slot = buf.inserted % buf.capacity
    data = jax.tree.map(lambda d, x: d.at[slot].set(jnp.where(valid, x, d[slot])), buf.data, row)
    return HeldOutBuffer(data=data, inserted=buf.inserted + jnp.asarray(valid, jnp.int32))


def held_out_sample(buf: HeldOutBuffer, key: jax.Array, shape: tuple[int, ...]) -> Any:
    i = jax.random.randint(key, shape, 0, jnp.maximum(buf.size(), 1))
    return jax.tree.map(lambda d: d[i], buf.data)
