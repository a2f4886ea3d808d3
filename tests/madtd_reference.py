"""The MAD-TD agent as it was before it was restructured for throughput (commit afd93fe, the audited version):
the reference its restructured update must equal within float tolerance (tests/test_madtd_restructured.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vecrl.agents.base import Agent, Batch, Sampler
from vecrl.agents.madtd import METRICS, Dynamics, MadTDConfig, MadTDState
from vecrl.distributional import HLGauss
from vecrl.networks import MLP, LatentHead, simnorm, simnorm_log


# ------------------------------------------------------------------------------------------------ networks
class Critic(nn.Module):
    """Two HL-Gauss heads on concat(z, a), with a fixed zero prior added to the logits."""

    hidden: int
    num_bins: int

    @nn.compact
    def __call__(self, z, a, prior):
        x = jnp.concatenate([z, a], axis=-1)
        return jnp.stack([MLP((self.hidden, self.hidden), self.num_bins, name=f"head_{i}")(x) + prior
                          for i in range(2)])  # [2, ..., bins]


def make_reference_madtd(cfg: MadTDConfig, observation_size: int, action_size: int) -> Agent:
    """The MAD-TD update as written before its restructuring (commit afd93fe): twin heads as two MLPs, each network
    called once per use. Everything else as vecrl.agents.madtd."""
    hl = HLGauss(cfg.vmax, cfg.num_bins, cfg.sigma_ratio)
    prior = cfg.zero_prior_scale * hl.probs(jnp.zeros(()))
    encoder_net = LatentHead((cfg.hidden,), cfg.latent)
    model_net = Dynamics(cfg.model_hidden, cfg.latent)
    critic_net = Critic(cfg.hidden, cfg.num_bins)
    actor_net = MLP((cfg.hidden, cfg.hidden), action_size)

    def optimizer(lr):
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(lr))

    opt_encoder, opt_model = optimizer(cfg.lr_encoder), optimizer(cfg.lr_model)
    opt_critic, opt_actor = optimizer(cfg.lr_critic), optimizer(cfg.lr_actor)

    # -- pure network applications
    def encode(params, obs):
        return simnorm(encoder_net.apply(params, obs), cfg.simnorm_group)

    def policy(params, z):
        return jnp.tanh(actor_net.apply(params, z))

    def critic_logits(params, z, a):
        return critic_net.apply(params, z, a, prior)

    def q_values(params, z, a):
        return hl.value(critic_logits(params, z, a))  # [2, ...]

    def init(key: jax.Array) -> MadTDState:
        k_enc, k_model, k_critic, k_actor = jax.random.split(key, 4)
        obs = jnp.zeros((observation_size,))
        z, a = jnp.zeros((cfg.latent,)), jnp.zeros((action_size,))
        encoder = encoder_net.init(k_enc, obs)
        model = model_net.init(k_model, z, a)
        critic = critic_net.init(k_critic, z, a, prior)
        actor = actor_net.init(k_actor, z)
        return MadTDState(encoder=encoder, model=model, critic=critic, critic_target=critic, actor=actor,
                          opt_encoder=opt_encoder.init(encoder), opt_model=opt_model.init(model),
                          opt_critic=opt_critic.init(critic), opt_actor=opt_actor.init(actor))

    # -- acting
    def mpc_action(state: MadTDState, z: jax.Array, key: jax.Array) -> jax.Array:
        """One-step MPPI-style planning: value = r_hat + gamma * mean_j Q_j(z', pi(z')) with the online critic."""
        a_pi = policy(state.actor, z)

        def evaluate(actions):
            zs = jnp.broadcast_to(z, (actions.shape[0], cfg.latent))
            next_logits, reward = model_net.apply(state.model, zs, actions)
            next_z = simnorm(next_logits, cfg.simnorm_group)
            q = q_values(state.critic, next_z, policy(state.actor, next_z))
            return reward + cfg.gamma * jnp.mean(q, axis=0)

        def iteration(carry, k):
            mean, std, _, _ = carry
            noise = jax.random.normal(k, (cfg.mpc_samples, action_size))
            candidates = jnp.concatenate([a_pi[None], jnp.clip(mean + std * noise, -1, 1)])
            values, top = jax.lax.top_k(evaluate(candidates), cfg.mpc_elites)
            elites = candidates[top]
            w = jax.nn.softmax(values / cfg.mpc_temperature)
            mean = jnp.sum(w[:, None] * elites, axis=0)
            std = jnp.clip(jnp.sqrt(jnp.sum(w[:, None] * (elites - mean) ** 2, axis=0)), cfg.mpc_std_min,
                           cfg.mpc_std_init)
            return (mean, std, elites, w), None

        k_iter, k_pick = jax.random.split(key)
        init_carry = (a_pi, jnp.full((action_size,), cfg.mpc_std_init), jnp.zeros((cfg.mpc_elites, action_size)),
                      jnp.zeros((cfg.mpc_elites,)))
        (_, _, elites, w), _ = jax.lax.scan(iteration, init_carry, jax.random.split(k_iter, cfg.mpc_iterations))
        return elites[jax.random.choice(k_pick, cfg.mpc_elites, p=w)]

    def act(state: MadTDState, obs: jax.Array, key: jax.Array, explore: bool) -> jax.Array:
        z = encode(state.encoder, obs)
        k_mpc, k_noise = jax.random.split(key)
        action = mpc_action(state, z, k_mpc) if cfg.mpc else policy(state.actor, z)
        if explore and not cfg.mpc:
            noise = jnp.clip(cfg.exploration_noise * jax.random.normal(k_noise, action.shape), -cfg.noise_clip,
                             cfg.noise_clip)
            action = jnp.clip(action + noise, -1.0, 1.0)
        return action

    # -- updates
    def td_target(state: MadTDState, reward, next_z):
        q_next = q_values(state.critic_target, next_z, policy(state.actor, next_z))
        return jax.lax.stop_gradient(reward + cfg.gamma * jnp.min(q_next, axis=0))

    def hl_loss(logits, target, weight):
        """HL-Gauss CE (per bin) summed over the heads, weighted mean over the batch."""
        ce = hl.cross_entropy(logits, hl.probs(target))  # [2, B]
        return jnp.mean(weight * jnp.sum(ce, axis=0))

    def model_loss(encoder, model, state: MadTDState, batch: Batch):
        m = batch["mask"]
        z = encode(encoder, batch["obs"])
        next_logits, reward_hat = model_net.apply(model, z, batch["action"])
        logp_next = simnorm_log(next_logits, cfg.simnorm_group)
        z_next = jax.lax.stop_gradient(encode(encoder, batch["next_obs"]))
        a_next = policy(state.actor, z_next)
        loss_reward = jnp.mean(m * (batch["reward"] - reward_hat) ** 2)
        target = cfg.dynamics_target_mix * z_next + (1 - cfg.dynamics_target_mix) / cfg.simnorm_group
        loss_dynamics = -jnp.mean(m[:, None] * target * logp_next)
        # Value-aware term: the frozen target critic's distribution at the predicted next latent should match
        # its distribution at the real next latent.
        p_real = jax.nn.softmax(critic_logits(state.critic_target, z_next, a_next), axis=-1)
        logq_pred = jax.nn.log_softmax(critic_logits(state.critic_target, jnp.exp(logp_next), a_next), axis=-1)
        loss_vaml = -jnp.mean(m[None, :, None] * jax.lax.stop_gradient(p_real) * logq_pred)
        # The online critic's TD loss, with its gradient reaching the encoder only.
        y = td_target(state, batch["reward"], z_next)
        loss_q_encoder = hl_loss(critic_logits(jax.lax.stop_gradient(state.critic), z, batch["action"]), y, m)
        total = loss_reward + loss_dynamics + loss_vaml + loss_q_encoder
        return total, {"loss/reward": loss_reward, "loss/dynamics": loss_dynamics, "loss/vaml": loss_vaml,
                       "loss/q_encoder": loss_q_encoder}

    def model_update(state: MadTDState, batch: Batch):
        (_, metrics), (g_enc, g_model) = jax.value_and_grad(model_loss, argnums=(0, 1), has_aux=True)(
            state.encoder, state.model, state, batch)
        up_enc, opt_enc = opt_encoder.update(g_enc, state.opt_encoder, state.encoder)
        up_model, opt_mod = opt_model.update(g_model, state.opt_model, state.model)
        return state.replace(encoder=optax.apply_updates(state.encoder, up_enc),
                             model=optax.apply_updates(state.model, up_model),
                             opt_encoder=opt_enc, opt_model=opt_mod), metrics

    def critic_batch(state: MadTDState, batch: Batch, key: jax.Array):
        """The model-augmented critic batch: the rows after the first
        int(B * (1 - alpha)) become one-step model transitions."""
        n_real = cfg.batch_size - cfg.model_rows
        z = jax.lax.stop_gradient(encode(state.encoder, batch["obs"]))
        z_next_real = jax.lax.stop_gradient(encode(state.encoder, batch["next_obs"][:n_real]))
        z_model = z[n_real:]
        if cfg.model_actions == "policy":
            a_model = policy(state.actor, z_model)
        else:
            a_model = jax.random.uniform(key, (cfg.model_rows, action_size), minval=-1.0, maxval=1.0)
        next_logits, r_model = model_net.apply(state.model, z_model, a_model)
        z_next = jnp.concatenate([z_next_real, simnorm(next_logits, cfg.simnorm_group)])
        actions = jnp.concatenate([batch["action"][:n_real], a_model])
        rewards = jnp.concatenate([batch["reward"][:n_real], r_model])
        weights = jnp.concatenate([batch["mask"][:n_real], jnp.ones((cfg.model_rows,))])
        return jax.lax.stop_gradient((z, actions, rewards, z_next, weights))

    def critic_loss(state: MadTDState, batch: Batch, key: jax.Array):
        """HL-Gauss TD loss on the model-augmented batch; only `state.critic` can receive a gradient."""
        z, actions, rewards, z_next, weights = critic_batch(state, batch, key)
        logits = critic_logits(state.critic, z, actions)
        return hl_loss(logits, td_target(state, rewards, z_next), weights), jnp.mean(hl.value(logits))

    def critic_update(state: MadTDState, batch: Batch, key: jax.Array):
        (loss, q_mean), grads = jax.value_and_grad(
            lambda critic: critic_loss(state.replace(critic=critic), batch, key), has_aux=True)(state.critic)
        updates, opt = opt_critic.update(grads, state.opt_critic, state.critic)
        critic = optax.apply_updates(state.critic, updates)
        target = optax.incremental_update(critic, state.critic_target, cfg.tau)
        return state.replace(critic=critic, critic_target=target, opt_critic=opt), loss, q_mean

    def actor_update(state: MadTDState, batch: Batch):
        z = jax.lax.stop_gradient(encode(state.encoder, batch["obs"]))

        def loss_fn(actor):
            q = q_values(state.critic_target, z, policy(actor, z))
            return -jnp.mean(batch["mask"] * jnp.min(q, axis=0))

        loss, grads = jax.value_and_grad(loss_fn)(state.actor)
        updates, opt = opt_actor.update(grads, state.opt_actor, state.actor)
        return state.replace(actor=optax.apply_updates(state.actor, updates), opt_actor=opt), loss

    # -- what the trainer's diagnostics read: the actor is the target policy, the twin minimum its value
    def target_action(state: MadTDState, obs: jax.Array, key: jax.Array) -> jax.Array:
        del key  # deterministic
        return policy(state.actor, encode(state.encoder, obs))

    def value(state: MadTDState, obs: jax.Array, key: jax.Array) -> jax.Array:
        del key
        z = encode(state.encoder, obs)
        return jnp.min(q_values(state.critic, z, policy(state.actor, z)), axis=0)

    def td_error(state: MadTDState, batch: Batch, key: jax.Array) -> jax.Array:
        """Squared error of the heads' expected values against the TD target, on real transitions only."""
        del key
        z, z_next = encode(state.encoder, batch["obs"]), encode(state.encoder, batch["next_obs"])
        y = td_target(state, batch["reward"], z_next)
        squared = jnp.mean((q_values(state.critic, z, batch["action"]) - y) ** 2, axis=0)
        return jnp.sum(batch["mask"] * squared) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)

    def update(state: MadTDState, sample: Sampler, key: jax.Array, step: jax.Array):
        """One agent step: UTD minibatches; model/encoder update on minibatch 0, then critic and actor on each."""
        del step  # MAD-TD has no schedule of its own
        k_sample, key = jax.random.split(key)
        batches = sample(k_sample, (cfg.utd, cfg.batch_size))
        state, metrics = model_update(state, jax.tree.map(lambda x: x[0], batches))

        def critic_actor(state, inputs):
            batch, k = inputs
            state, critic_loss, q_mean = critic_update(state, batch, k)
            state, actor_loss = actor_update(state, batch)
            return state, (critic_loss, actor_loss, q_mean)

        state, (critic_loss, actor_loss, q_mean) = jax.lax.scan(
            critic_actor, state, (batches, jax.random.split(key, cfg.utd)))
        metrics.update({"loss/critic": jnp.mean(critic_loss), "loss/actor": jnp.mean(actor_loss),
                        "q_mean": jnp.mean(q_mean)})
        return state, metrics

    return Agent(name="madtd", config=cfg, init=init, act=act, update=update, batch_size=cfg.batch_size,
                 metric_names=METRICS, gamma=cfg.gamma, target_action=target_action,
                 value=value, td_error=td_error,
                 extras={"encode": encode, "policy": policy, "q_values": q_values, "critic_loss": critic_loss,
                         "critic_batch": critic_batch, "model_loss": model_loss})

