import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vecrl import validation
from vecrl.agents.madtd import MadTDConfig, make_madtd

OBS, ACT = 6, 2
CFG = MadTDConfig(hidden=32, model_hidden=32, latent=16, batch_size=40, utd=2, vmax=100.0, mpc_samples=16,
                  mpc_elites=4, mpc_iterations=2)


def _batch(key, n, utd=None):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    lead = (n,) if utd is None else (utd, n)
    return {"obs": jax.random.normal(k1, (*lead, OBS)), "action": jax.random.uniform(k2, (*lead, ACT), minval=-1),
            "reward": jax.random.uniform(k3, lead), "next_obs": jax.random.normal(k4, (*lead, OBS)),
            "mask": jnp.ones(lead).at[..., 0].set(0.0)}


@pytest.fixture(scope="module")
def agent_and_state():
    agent = make_madtd(CFG, OBS, ACT)
    return agent, agent.init(jax.random.key(0))


def test_zero_prior_gives_q_near_zero_at_init(agent_and_state):
    agent, state = agent_and_state
    batch = _batch(jax.random.key(1), 64)
    z = agent.extras["encode"](state.encoder, batch["obs"])
    q = agent.extras["q_values"](state.critic, z, batch["action"])
    chex.assert_shape(q, (2, 64))
    # Bin width 100/75 = 1.33: the prior concentrates the initial value within a fraction of a bin of 0.
    assert float(jnp.max(jnp.abs(q))) < 0.5


def test_model_rows_are_what_the_real_rows_leave():
    # Real rows int(B * (1 - alpha)) as in the spec, the rest from the model: 486 + 26 at the paper's 512 and 0.05
    # (int(alpha * B) would give 25), and 230 + 26 at 256 and 0.1.
    for alpha, batch, rows in [(0.05, 512, 26), (0.1, 256, 26), (0.1, 512, 52), (0.05, 40, 2), (0.0, 40, 0),
                               (0.25, 40, 10), (1.0, 40, 40)]:
        assert MadTDConfig(alpha=alpha, batch_size=batch).model_rows == rows, (alpha, batch)
    agent = make_madtd(CFG, OBS, ACT)
    state = agent.init(jax.random.key(0))
    batch = _batch(jax.random.key(2), CFG.batch_size)
    z, actions, rewards, z_next, weights = agent.extras["critic_batch"](state, batch, jax.random.key(3))
    n_model = CFG.model_rows
    assert n_model == 2
    # Model rows use the policy's action and a model reward (not the stored ones) and full weight.
    real = CFG.batch_size - n_model
    np.testing.assert_array_equal(np.asarray(actions[:real]), np.asarray(batch["action"][:real]))
    assert not np.allclose(np.asarray(actions[real:]), np.asarray(batch["action"][real:]))
    np.testing.assert_array_equal(np.asarray(weights[real:]), 1.0)
    np.testing.assert_array_equal(np.asarray(rewards[:real]), np.asarray(batch["reward"][:real]))
    np.testing.assert_allclose(np.asarray(z_next[real:]).reshape(n_model, -1, 8).sum(-1), 1.0, rtol=1e-5)


def test_critic_loss_sends_no_gradient_to_encoder_or_model(agent_and_state):
    agent, state = agent_and_state
    batch = _batch(jax.random.key(4), CFG.batch_size)
    names = ("encoder", "model", "actor", "critic", "critic_target")
    params = {n: getattr(state, n) for n in names}
    grads = jax.grad(lambda p: agent.extras["critic_loss"](state.replace(**p), batch, jax.random.key(5))[0])(params)
    for name in ("encoder", "model", "actor", "critic_target"):
        leaves = jax.tree.leaves(grads[name])
        assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in leaves), f"critic loss reached {name}"
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads["critic"]))


def test_q_encoder_loss_reaches_encoder_not_critic(agent_and_state):
    agent, state = agent_and_state
    batch = _batch(jax.random.key(6), CFG.batch_size)
    model_loss = agent.extras["model_loss"]
    g_critic = jax.grad(lambda c: model_loss(state.encoder, state.model, state.replace(critic=c), batch)[0])(state.critic)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_critic))


def test_update_changes_all_trained_parts_and_polyak_target(agent_and_state):
    agent, state = agent_and_state
    batches = _batch(jax.random.key(7), CFG.batch_size, utd=CFG.utd)
    update = jax.jit(lambda s, k: agent.update(s, lambda key, shape: batches, k, jnp.int32(0)))
    new, metrics = update(state, jax.random.key(8))
    assert set(metrics) == set(agent.metric_names)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    for name in ("encoder", "model", "critic", "actor", "critic_target"):
        before, after = jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(new, name))
        assert any(not np.allclose(a, b) for a, b in zip(before, after)), f"{name} did not change"
    # After UTD Polyak steps the target moved towards, but not onto, the online critic.
    t, c = jax.tree.leaves(new.critic_target)[0], jax.tree.leaves(new.critic)[0]
    assert not np.allclose(t, c)


@pytest.mark.parametrize("mpc", [False, True])
def test_act_shapes_bounds_and_exploration(mpc):
    agent = make_madtd(CFG.__class__(**{**CFG.__dict__, "mpc": mpc}), OBS, ACT)
    state = agent.init(jax.random.key(0))
    obs = jax.random.normal(jax.random.key(1), (OBS,))
    act = jax.jit(agent.act, static_argnums=3)
    a = act(state, obs, jax.random.key(2), True)
    chex.assert_shape(a, (ACT,))
    assert float(jnp.max(jnp.abs(a))) <= 1.0
    if not mpc:
        greedy = act(state, obs, jax.random.key(2), False)
        np.testing.assert_array_equal(greedy, act(state, obs, jax.random.key(9), False))
        assert 0 < float(jnp.max(jnp.abs(a - greedy))) <= CFG.noise_clip + 1e-6


def test_config_rejects_impossible_values():
    validation.validate(MadTDConfig(), "madtd")
    for bad, message in [(dict(alpha=1.5), r"madtd.alpha must be in \[0, 1\], got 1.5"), (dict(alpha=-0.1), "alpha"),
                         (dict(utd=0), "madtd.utd must be a positive integer"), (dict(utd=2.0), "madtd.utd"),
                         (dict(latent=20), "multiple of simnorm_group"), (dict(model_actions="uniform"), "policy"),
                         (dict(gamma=1.0), r"madtd.gamma must be in \[0, 1\)"), (dict(vmax=0.0), "madtd.vmax")]:
        with pytest.raises(ValueError, match=message):
            validation.validate(MadTDConfig(**bad), "madtd")


def test_td_error_is_the_squared_error_of_the_expected_values(agent_and_state):
    agent, state = agent_and_state
    batch = _batch(jax.random.key(9), 16)
    x = agent.extras
    z, z_next = x["encode"](state.encoder, batch["obs"]), x["encode"](state.encoder, batch["next_obs"])
    q = np.asarray(x["q_values"](state.critic, z, batch["action"]))  # [2, 16]
    q_next = np.asarray(x["q_values"](state.critic_target, z_next, x["policy"](state.actor, z_next))).min(0)
    y = np.asarray(batch["reward"]) + CFG.gamma * q_next
    mask = np.asarray(batch["mask"])
    expected = np.sum(mask * ((q - y) ** 2).mean(0)) / mask.sum()  # row 0 has mask 0 and is left out
    assert float(agent.td_error(state, batch, jax.random.key(0))) == pytest.approx(expected, rel=1e-5)
