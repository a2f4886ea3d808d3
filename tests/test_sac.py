"""SAC: its losses against hand-computed values on a tiny batch, and its place behind the trainer's interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vecrl.agents import sac as sac_fns
from vecrl.agents.sac import SACConfig, make_sac, tanh_gaussian_log_prob

OBS, ACT, B = 3, 2, 4


def zero_params(tree):
    return jax.tree.map(jnp.zeros_like, tree)


CFG = SACConfig(hidden=8, batch_size=B, utd=2)
NETS = sac_fns.sac_networks(CFG, ACT)
LOG_STD_OF_A_ZERO_ACTOR = -4.0  # raw output 0 lands midway in [-10, 2]


@pytest.fixture(scope="module")
def sac():
    return make_sac(CFG, OBS, ACT)


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
    """All-zero networks: Q = 0 everywhere and the actor is N(0, exp(-4)) squashed (log std midway in [-10, 2])."""
    state = sac.init(jax.random.key(0))
    state = state.replace(actor=zero_params(state.actor), critic=zero_params(state.critic),
                          critic_target=zero_params(state.critic_target), log_temperature=jnp.log(0.5))
    b, key = batch(), jax.random.key(7)
    loss, q_mean = sac_fns.critic_loss(state.critic, NETS, state, b, key)
    s = LOG_STD_OF_A_ZERO_ACTOR
    u = np.exp(s) * np.asarray(jax.random.normal(key, (B, ACT)))
    logp = (-0.5 * (u / np.exp(s)) ** 2 - s - 0.5 * np.log(2 * np.pi) - np.log(1 - np.tanh(u) ** 2)).sum(-1)
    target = np.asarray(b["reward"]) + 0.99 * (0.0 - 0.5 * logp)
    expected = np.mean(np.asarray(b["mask"]) * 2 * target ** 2)  # both heads predict 0
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(q_mean) == 0.0
    # The diagnostic td_error is the same squared error averaged over the heads and the rows with mask 1.
    assert float(sac.td_error(state, b, key)) == pytest.approx(expected / 2 / 0.75, rel=1e-4)


def test_actor_loss_by_hand_with_zero_critic(sac):
    state = sac.init(jax.random.key(1))
    state = state.replace(actor=zero_params(state.actor), critic=zero_params(state.critic),
                          log_temperature=jnp.log(0.2))
    b, key = batch(), jax.random.key(3)
    loss, logp = sac_fns.actor_loss(state.actor, NETS, state, b, key)
    s = LOG_STD_OF_A_ZERO_ACTOR
    u = np.exp(s) * np.asarray(jax.random.normal(key, (B, ACT)))
    expected_logp = (-0.5 * (u / np.exp(s)) ** 2 - s - 0.5 * np.log(2 * np.pi) - np.log(1 - np.tanh(u) ** 2)).sum(-1)
    np.testing.assert_allclose(logp, expected_logp, rtol=1e-4)
    assert float(loss) == pytest.approx(float(np.mean(np.asarray(b["mask"]) * 0.2 * expected_logp)), rel=1e-4)


def test_temperature_loss_by_hand():
    # alpha (entropy - target) with the entropy over the rows with mask 1: 0.5 * ((1.5 + 0.5) / 2 - (-1)) = 1.0;
    # its gradient in log alpha is the same alpha-scaled gap.
    logp, mask = jnp.asarray([-1.5, -0.5, 7.0]), jnp.asarray([1.0, 1.0, 0.0])
    loss, grad = jax.value_and_grad(sac_fns.temperature_loss)(jnp.log(0.5), logp, mask, jnp.float32(-1.0))
    assert float(loss) == pytest.approx(1.0, rel=1e-6) and float(grad) == pytest.approx(1.0, rel=1e-6)


def test_target_entropy_is_minus_half_the_action_size():
    assert sac_fns.target_entropy(sac_fns.sac_networks(SACConfig(), 6)) == -3.0


def _actor_with_log_std(actor, raw):
    """The actor (zero weights) with its log-std outputs' bias set to `raw`: log std = -10 + 6 (tanh(raw) + 1)."""
    out = actor["params"]["Dense_2"]
    return {"params": {**actor["params"], "Dense_2": {**out, "bias": out["bias"].at[ACT:].set(raw)}}}


def test_temperature_moves_toward_the_target_entropy(sac):
    state = sac.init(jax.random.key(2))
    b = batch()
    # Target -|A| / 2 = -1. Log std 0: tanh(N(0, 1)) has an entropy of about 0.55 per dimension, above the target,
    # so the temperature must fall; log std at its minimum -10 (tanh(-50) = -1) puts it far below, so it must rise.
    zero = state.replace(actor=zero_params(state.actor))
    wide = zero.replace(actor=_actor_with_log_std(zero.actor, float(np.arctanh(2 / 3))))
    new, metrics = sac.update(wide, two_batches(b), jax.random.key(0), jnp.int32(0))
    assert float(new.log_temperature) < float(wide.log_temperature)
    narrow = zero.replace(actor=_actor_with_log_std(zero.actor, -50.0))
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
    assert float(jnp.std(samples)) > 0.005  # a fresh actor's std is about exp(-4)
