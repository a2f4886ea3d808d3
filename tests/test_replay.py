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
