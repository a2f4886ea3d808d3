"""SAC: its losses against hand-computed values on a tiny batch, and its place behind the trainer's interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vecrl.agents.sac import SACConfig, make_sac, tanh_gaussian_log_prob

OBS, ACT, B = 3, 2, 4


def zero_params(tree):
    return jax.tree.map(jnp.zeros_like, tree)


@pytest.fixture(scope="module")
def sac():
    return make_sac(SACConfig(hidden=8, batch_size=B, utd=2), OBS, ACT)


def batch(rng=np.random.default_rng(0)):
    return {"obs": jnp.asarray(rng.normal(size=(B, OBS)), jnp.float32),
            "action": jnp.asarray(rng.uniform(-1, 1, size=(B, ACT)), jnp.float32),
            "reward": jnp.asarray([1.0, 0.5, 0.0, 2.0]), "next_obs": jnp.asarray(rng.normal(size=(B, OBS)), jnp.float32),
            "mask": jnp.asarray([1.0, 1.0, 0.0, 1.0])}


def two_batches(b):
    """A sampler that always returns `b` twice (the fixture's UTD is 2)."""
    return lambda key, shape: jax.tree.map(lambda x: jnp.stack([x, x]), b)


def test_tanh_gaussian_log_prob_is_the_change_of_variables():
    u = jnp.asarray([[0.3, -1.2], [2.5, 0.0]])
    mean, log_std = jnp.asarray([0.1, -0.4]), jnp.asarray([-0.5, 0.2])
    std = np.exp(np.asarray(log_std))
    gauss = -0.5 * ((np.asarray(u) - np.asarray(mean)) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    expected = (gauss - np.log(1 - np.tanh(np.asarray(u)) ** 2)).sum(-1)
    np.testing.assert_allclose(tanh_gaussian_log_prob(u, mean, log_std), expected, rtol=1e-5)
    assert np.isfinite(float(tanh_gaussian_log_prob(jnp.asarray([40.0]), jnp.zeros(1), jnp.zeros(1))))


def test_critic_loss_by_hand_with_zero_networks(sac):
    """All-zero networks: Q = 0 everywhere and the actor is N(0, exp(-1.5)) squashed (log std midway in [-5, 2])."""
    state = sac.init(jax.random.key(0))
    state = state.replace(actor=zero_params(state.actor), critic=zero_params(state.critic),
                          critic_target=zero_params(state.critic_target), log_temperature=jnp.log(0.5))
    b, key = batch(), jax.random.key(7)
    loss, q_mean = sac.extras["critic_loss"](state.critic, state, b, key)
    u = np.exp(-1.5) * np.asarray(jax.random.normal(key, (B, ACT)))
    logp = (-0.5 * (u / np.exp(-1.5)) ** 2 + 1.5 - 0.5 * np.log(2 * np.pi) - np.log(1 - np.tanh(u) ** 2)).sum(-1)
    target = np.asarray(b["reward"]) + 0.99 * (0.0 - 0.5 * logp)
    expected = np.mean(np.asarray(b["mask"]) * 2 * target ** 2)  # both heads predict 0
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(q_mean) == 0.0
    # The diagnostic td_error is the same squared error averaged over the heads and the rows with mask 1.
    assert float(sac.td_error(state, b, key)) == pytest.approx(expected / 2 / 0.75, rel=1e-4)


def test_actor_loss_by_hand_with_zero_critic(sac):
    state = sac.init(jax.random.key(1))
    state = state.replace(critic=zero_params(state.critic), log_temperature=jnp.log(0.2))
    b, key = batch(), jax.random.key(3)
    loss, logp = sac.extras["actor_loss"](state.actor, state, b, key)
    _, logp_direct = sac.extras["sample"](state.actor, b["obs"], key)
    np.testing.assert_allclose(logp, logp_direct)
    assert float(loss) == pytest.approx(float(np.mean(np.asarray(b["mask"]) * 0.2 * np.asarray(logp))), rel=1e-5)


def test_temperature_moves_toward_the_target_entropy(sac):
    state = sac.init(jax.random.key(2))
    b = batch()
    # Zero actor: log std -1.5 per dimension gives an entropy far above the target -|A| = -2, so the temperature
    # must fall; a very narrow actor (log std at its minimum) must raise it.
    wide = state.replace(actor=zero_params(state.actor))
    new, metrics = sac.update(wide, two_batches(b), jax.random.key(0), jnp.int32(0))
    assert float(new.log_temperature) < float(wide.log_temperature)
    narrow_actor = jax.tree.map(lambda x: x, wide.actor)
    out_bias = narrow_actor["params"]["Dense_2"]["bias"]
    narrow_actor["params"]["Dense_2"]["bias"] = out_bias.at[ACT:].set(-50.0)  # tanh(-50) = -1: log std = -5
    narrow = wide.replace(actor=narrow_actor)
    new, _ = sac.update(narrow, two_batches(b), jax.random.key(0), jnp.int32(0))
    assert float(new.log_temperature) > float(narrow.log_temperature)
    assert set(metrics) == set(sac.metric_names)


def test_act_is_bounded_and_deterministic_without_exploration(sac):
    state = sac.init(jax.random.key(4))
    obs = jnp.ones((OBS,))
    a1, a2 = sac.act(state, obs, jax.random.key(0), False), sac.act(state, obs, jax.random.key(1), False)
    np.testing.assert_array_equal(a1, a2)
    samples = jax.vmap(lambda k: sac.act(state, obs, k, True))(jax.random.split(jax.random.key(0), 64))
    assert samples.shape == (64, ACT) and np.all(np.abs(np.asarray(samples)) <= 1.0)
    assert float(jnp.std(samples)) > 0.05
