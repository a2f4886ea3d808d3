import chex
import jax
import jax.numpy as jnp
import numpy as np

from vecrl import replay


def _fill(buf, steps, episode_length=5, held_every=0, invalid=()):
    """Insert transitions whose observation is the step number, so sampled rows can be checked exactly."""
    add = jax.jit(replay.train_buffer_add)
    for s in range(steps):
        t = s % episode_length
        obs = jnp.full((3,), float(s))
        buf = add(buf, obs, jnp.full((2,), float(s)), jnp.asarray(float(s)), jnp.full((3,), float(s + 1)),
                  jnp.asarray(t == episode_length - 1), jnp.asarray(t == 0),
                  jnp.asarray(not (held_every and s % held_every == 0)), jnp.asarray(s not in invalid))
    return buf


def test_sampling_stays_inside_the_window_after_wrap_around():
    buf = _fill(replay.train_buffer_init(8, 3, 2), 23)
    assert int(buf.inserted) == 23
    batch = replay.train_buffer_sample(buf, jax.random.key(0), (4000,))
    chex.assert_shape(batch["obs"], (4000, 3))
    s = np.asarray(batch["obs"][:, 0])
    # Capacity 8: transitions 16..22 are complete (slot 23 % 8 holds the newest next observation).
    assert s.min() == 16 and s.max() == 22 and len(np.unique(s)) == 7
    np.testing.assert_array_equal(np.asarray(batch["next_obs"][:, 0]), s + 1)
    np.testing.assert_array_equal(np.asarray(batch["action"][:, 0]), s)
    np.testing.assert_array_equal(np.asarray(batch["reward"]), s)


def test_a_split_draws_every_nth_sampleable_transition_or_the_others():
    # 60 transitions into a ring of 32, every 4th routed to the held-out buffer: the sampleable window is 29..59
    # less 32, 36, ..., 56 (24 transitions), counted in the order they were collected.
    buf = _fill(replay.train_buffer_init(32, 3, 2), 60, held_every=4)
    window = [s for s in range(29, 60) if s % 4]
    for offset in range(3):
        def draw(held, key):
            batch = replay.train_buffer_sample(buf, key, (3000,), split=(jnp.int32(offset), 3, held))
            return set(np.asarray(batch["obs"][:, 0]).astype(int).tolist())
        held, rest = draw(True, jax.random.key(offset)), draw(False, jax.random.key(10 + offset))
        # Every third collected transition (by its place among all sampleable ones ever indexed) is held.
        entries = {s: e for e, s in enumerate(t for t in range(60) if t % 4)}
        assert held == {s for s in window if (entries[s] - offset) % 3 == 0}
        assert rest == set(window) - held and len(held) == 8


def test_episode_ends_have_zero_weight_and_held_out_never_sampled():
    buf = _fill(replay.train_buffer_init(64, 3, 2), 40, episode_length=5, held_every=3)
    batch = replay.train_buffer_sample(buf, jax.random.key(1), (5000,))
    s = np.asarray(batch["obs"][:, 0]).astype(int)
    assert not np.any(s % 3 == 0), "held-out transitions must never be sampled"
    np.testing.assert_array_equal(np.asarray(batch["mask"]), (s % 5 != 4).astype(np.float32))
    assert int(buf.size()) == len([i for i in range(40) if i % 3])


def test_invalid_transitions_are_not_written_and_break_the_chain():
    # Transition 7 is invalid (e.g. a NaN); the episode restarts at 10: transition 6's next observation was
    # pre-written, and 9 is the last of its episode anyway.
    buf = _fill(replay.train_buffer_init(64, 3, 2), 12, episode_length=10, invalid=(7,))
    batch = replay.train_buffer_sample(buf, jax.random.key(2), (4000,))
    s = np.asarray(batch["obs"][:, 0]).astype(int)
    assert 7 not in s
    assert int(buf.inserted) == 11


def test_per_lane_sampling_under_vmap():
    bufs = [_fill(replay.train_buffer_init(16, 3, 2), n) for n in (5, 30)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *bufs)
    batch = jax.vmap(replay.train_buffer_sample, in_axes=(0, 0, None))(
        stacked, jax.random.split(jax.random.key(3), 2), (2000,))
    chex.assert_shape(batch["obs"], (2, 2000, 3))
    s0, s1 = np.asarray(batch["obs"][0, :, 0]), np.asarray(batch["obs"][1, :, 0])
    assert s0.min() == 0 and s0.max() == 4
    assert s1.min() == 30 - 15 and s1.max() == 29


def test_held_out_ring():
    row = {"obs": jnp.zeros(2), "r": jnp.zeros(())}
    buf = replay.held_out_init(3, row)
    for i in range(5):
        buf = replay.held_out_add(buf, {"obs": jnp.full(2, i), "r": jnp.asarray(float(i))}, jnp.asarray(i != 2))
    assert int(buf.inserted) == 4 and int(buf.size()) == 3
    sample = replay.held_out_sample(buf, jax.random.key(0), (500,))
    assert set(np.asarray(sample["r"]).astype(int)) == {1, 3, 4}


# ------------------------------------------------------------------------------------------------ sequences
def _sequences(buf, n, length, key=0, shape=None):
    batch = replay.train_buffer_sample(buf, jax.random.key(key), shape or (n,), length=length)
    return {k: np.asarray(v) for k, v in batch.items()}


def _expected_weights(starts, length, valid):
    """1 while every step from the start up to k is a `valid(s)` transition number, 0 from the first that is not."""
    return np.asarray([[float(all(valid(s0 + j) for j in range(k + 1))) for k in range(length)] for s0 in starts])


def test_sequences_are_consecutive_transitions_of_the_window():
    buf = _fill(replay.train_buffer_init(64, 3, 2), 40, episode_length=1000)
    batch = _sequences(buf, 3000, 4)
    assert batch["obs"].shape == (3000, 4, 3) and batch["next_obs"].shape == (3000, 4, 3)
    assert batch["action"].shape == (3000, 4, 2) and batch["reward"].shape == (3000, 4)
    assert batch["mask"].shape == (3000, 4)
    starts = batch["obs"][:, 0, 0].astype(int)
    assert starts.min() == 0 and starts.max() == 39
    weight = batch["mask"]
    # Transitions 0..39 are written: a sequence from 38 has steps 38, 39, then leaves the window.
    np.testing.assert_array_equal(weight, _expected_weights(starts, 4, lambda s: s <= 39))
    s = starts[:, None] + np.arange(4)
    on = weight == 1.0
    np.testing.assert_array_equal(batch["obs"][..., 0][on], s[on])
    np.testing.assert_array_equal(batch["next_obs"][..., 0][on], s[on] + 1)
    np.testing.assert_array_equal(batch["action"][..., 1][on], s[on])
    np.testing.assert_array_equal(batch["reward"][on], s[on])
    # Single transitions are drawn as before: the same start rows as a length-1 sequence, without the extra axis.
    single = replay.train_buffer_sample(buf, jax.random.key(0), (3000,))
    np.testing.assert_array_equal(np.asarray(single["obs"]), batch["obs"][:, 0])
    np.testing.assert_array_equal(np.asarray(single["mask"]), batch["mask"][:, 0])


def test_sequence_weights_stop_at_the_episode_end():
    buf = _fill(replay.train_buffer_init(64, 3, 2), 40, episode_length=5)
    batch = _sequences(buf, 3000, 3, key=1)
    starts = batch["obs"][:, 0, 0].astype(int)
    # Transition 5i + 4 ends its episode (no stored next observation): it and every later step weigh 0.
    expected = _expected_weights(starts, 3, lambda s: s % 5 != 4)
    np.testing.assert_array_equal(batch["mask"], expected)
    assert expected[:, 0].min() == 0.0 and expected[:, 2].max() == 1.0  # both cases were drawn
    on = batch["mask"] == 1.0
    np.testing.assert_array_equal(batch["obs"][..., 0][on], (starts[:, None] + np.arange(3))[on])


def test_sequences_never_pass_through_held_out_transitions():
    buf = _fill(replay.train_buffer_init(64, 3, 2), 40, episode_length=1000, held_every=3)
    batch = _sequences(buf, 3000, 3, key=2)
    starts = batch["obs"][:, 0, 0].astype(int)
    assert not np.any(starts % 3 == 0)
    # Transitions 3i were held out: written (they are their predecessors' next observations) but not trained on.
    np.testing.assert_array_equal(batch["mask"], _expected_weights(starts, 3, lambda s: s % 3 != 0 and s <= 39))
    np.testing.assert_array_equal(batch["next_obs"][:, 0, 0], starts + 1)


def test_sequences_wrap_around_the_ring():
    buf = _fill(replay.train_buffer_init(8, 3, 2), 23, episode_length=1000)
    batch = _sequences(buf, 2000, 4, key=3)
    starts = batch["obs"][:, 0, 0].astype(int)
    # Capacity 8: transitions 16..22 are complete; a sequence from 21 uses slots 5 and 6, then leaves the window
    # (slot 7 holds transition 23's observation, whose transition is not written).
    assert starts.min() == 16 and starts.max() == 22
    np.testing.assert_array_equal(batch["mask"], _expected_weights(starts, 4, lambda s: s <= 22))
    s = starts[:, None] + np.arange(4)
    on = batch["mask"] == 1.0
    np.testing.assert_array_equal(batch["obs"][..., 0][on], s[on])
    np.testing.assert_array_equal(batch["next_obs"][..., 0][on], s[on] + 1)


def test_sequences_after_wrap_around_with_held_out_transitions():
    # Capacity 8 and held-out transitions: the index's oldest entries fall out as the ring wraps, and sequences
    # still begin at complete, sampleable transitions and run only through sampleable ones.
    buf = _fill(replay.train_buffer_init(8, 3, 2), 30, episode_length=1000, held_every=4)
    batch = _sequences(buf, 2000, 3, key=4)
    starts = batch["obs"][:, 0, 0].astype(int)
    assert set(starts) == {s for s in range(23, 30) if s % 4}
    np.testing.assert_array_equal(batch["mask"], _expected_weights(starts, 3, lambda s: s % 4 != 0 and s <= 29))


def test_sequences_with_several_leading_axes_and_under_vmap():
    bufs = [_fill(replay.train_buffer_init(16, 3, 2), n, episode_length=1000) for n in (5, 30)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *bufs)
    batch = jax.vmap(lambda b, k: replay.train_buffer_sample(b, k, (4, 50), length=2))(
        stacked, jax.random.split(jax.random.key(5), 2))
    chex.assert_shape(batch["obs"], (2, 4, 50, 2, 3))
    chex.assert_shape(batch["mask"], (2, 4, 50, 2))
    obs, mask = np.asarray(batch["obs"][..., 0]), np.asarray(batch["mask"])
    for lane, last in ((0, 4), (1, 29)):
        np.testing.assert_array_equal(mask[lane][..., 1], (obs[lane][..., 0] + 1 <= last).astype(np.float32))
        assert obs[lane][..., 0].max() == last
