"""The updates restructured for throughput (stacked twin heads, one encoder pass over obs and next_obs, one target
critic call per use, minibatches encoded once per agent step) equal the straightforward ones within float
tolerance: MAD-TD against its pre-restructuring code (tests/madtd_reference.py), SAC's twin critic against two
separate MLPs run through the same step."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.madtd_reference import make_reference_madtd
from vecrl.agents import sac
from vecrl.agents.base import DROPPED
from vecrl.agents.madtd import MadTDConfig, make_madtd
from vecrl.networks import MLP

OBS, ACT = 7, 3


def unstack_heads(tree, name: str, old_name):
    """A tree with stacked twin heads ({name: {"copies": leaves [2, ...]}}) in the layout of two separate heads
    ({old_name(0): leaves, old_name(1): leaves}): parameters and the optimiser moments that mirror them."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if k == name:
                for i in range(2):
                    out[old_name(i)] = jax.tree.map(lambda x: x[i], v["copies"])
            else:
                out[k] = unstack_heads(v, name, old_name)
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(unstack_heads(v, name, old_name) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(unstack_heads(v, name, old_name) for v in tree)
    if dataclasses.is_dataclass(tree):
        return tree.replace(**{f.name: unstack_heads(getattr(tree, f.name), name, old_name)
                               for f in dataclasses.fields(tree)})
    return tree


def sampler(key, shape):
    """A deterministic stand-in for the replay: the same key gives the same rows to both updates."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    return {"obs": jax.random.normal(k1, (*shape, OBS)), "action": jax.random.uniform(k2, (*shape, ACT), minval=-1),
            "reward": jax.random.uniform(k3, shape), "next_obs": jax.random.normal(k4, (*shape, OBS)),
            "mask": (jax.random.uniform(k5, shape) > 0.1).astype(jnp.float32)}


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def madtd_heads(tree):
    return unstack_heads(tree, "heads", lambda i: f"head_{i}")


@pytest.mark.parametrize("model_actions", ["policy", "random"])
def test_madtd_update_equals_the_reference_update(model_actions):
    cfg = MadTDConfig(hidden=32, model_hidden=24, latent=16, num_bins=21, batch_size=24, utd=3, alpha=0.25,
                      vmax=50.0, model_actions=model_actions)
    agent, reference = make_madtd(cfg, OBS, ACT), make_reference_madtd(cfg, OBS, ACT)
    state = agent.init(jax.random.key(0))
    # Train a few agent steps first, so that the compared step starts away from the initialisation.
    update = jax.jit(lambda s, k: agent.update(s, sampler, k, jnp.int32(0)))
    for i in range(3):
        state, _ = update(state, jax.random.key(10 + i))
    key = jax.random.key(99)
    new, metrics = update(state, key)
    old, old_metrics = jax.jit(lambda s, k: reference.update(s, sampler, k, jnp.int32(0)))(madtd_heads(state), key)
    assert_trees_close(madtd_heads(new), old)
    assert float(metrics.pop(DROPPED)) == 0.0
    assert_trees_close(metrics, old_metrics)
    # The compared step moved every network (a no-op on both sides would pass the comparison above).
    for part in ("encoder", "model", "critic", "critic_target", "actor"):
        moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), getattr(new, part), getattr(state, part))
        assert max(jax.tree.leaves(moved)) > 1e-6, part


def test_madtd_acting_and_diagnostics_equal_the_reference():
    cfg = MadTDConfig(hidden=32, model_hidden=24, latent=16, num_bins=21, batch_size=24, utd=2, vmax=50.0, mpc=True,
                      mpc_samples=16, mpc_elites=4, mpc_iterations=2)
    agent, reference = make_madtd(cfg, OBS, ACT), make_reference_madtd(cfg, OBS, ACT)
    state = agent.init(jax.random.key(1))
    state, _ = jax.jit(lambda s, k: agent.update(s, sampler, k, jnp.int32(0)))(state, jax.random.key(2))
    old = madtd_heads(state)
    batch = sampler(jax.random.key(3), (24,))
    k = jax.random.key(4)
    np.testing.assert_allclose(agent.act(state, batch["obs"][0], k, True), reference.act(old, batch["obs"][0], k, True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(agent.value(state, batch["obs"][0], k), reference.value(old, batch["obs"][0], k),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(agent.td_error(state, batch, k), reference.td_error(old, batch, k), rtol=1e-5)


class SeparateTwinCritic(nn.Module):
    """SAC's twin critic before the heads were stacked: two MLPs, two launches per layer."""

    hidden: int

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], axis=-1)
        return jnp.stack([MLP((self.hidden, self.hidden), 1, layer_norm=False, activation=jax.nn.relu,
                              name=f"q_{i}")(x)[..., 0] for i in range(2)])


def test_sac_gradient_step_with_stacked_heads_equals_separate_heads():
    cfg = sac.SACConfig(hidden=32, batch_size=24, utd=2)
    nets = sac.sac_networks(cfg, ACT)
    separate = dataclasses.replace(nets, critic=SeparateTwinCritic(cfg.hidden))
    state = sac.init_state(nets, OBS, jax.random.key(0))
    step = jax.jit(lambda s, b, k: sac.gradient_step(nets, s, b, k))
    for i in range(3):
        state, _ = step(state, sampler(jax.random.key(10 + i), (24,)), jax.random.key(20 + i))
    batch, key = sampler(jax.random.key(5), (24,)), jax.random.key(6)
    new, metrics = step(state, batch, key)
    old, old_metrics = jax.jit(lambda s, b, k: sac.gradient_step(separate, s, b, k))(
        unstack_heads(state, "heads", lambda i: f"q_{i}"), batch, key)
    assert_trees_close(unstack_heads(new, "heads", lambda i: f"q_{i}"), old)
    assert_trees_close(metrics, old_metrics)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.critic, state.critic)
    assert max(jax.tree.leaves(moved)) > 1e-6
