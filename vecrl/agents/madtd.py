"""MAD-TD (Voelcker et al.): TD learning with a small fraction of latent-model data in every critic batch.

Everything here follows ../shared/spec/madtd.md (the reference implementation's behaviour); read top to
bottom: config, networks, init, act (with optional one-step MPC), then the three updates of one agent step.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from vecrl.agents.base import DROPPED, Agent, Batch, Sampler, count, guarded_polyak, guarded_step
from vecrl.distributional import HLGauss
from vecrl.networks import MLP, LatentHead, StackedMLP, simnorm, simnorm_log
from vecrl.validation import (BOOL, NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_CLOSED, UNIT_LEFT_OPEN,
                              UNIT_RIGHT_OPEN, rule)


@dataclasses.dataclass(frozen=True)
class MadTDConfig:
    hidden: int = rule(512, POSITIVE_INT)  # width of encoder, critic and actor MLPs
    model_hidden: int = rule(512, POSITIVE_INT)  # width of latent dynamics and reward MLPs (paper Fig. 9: 64..512)
    latent: int = rule(512, POSITIVE_INT)
    simnorm_group: int = rule(8, POSITIVE_INT)
    num_bins: int = rule(151, POSITIVE_INT)
    vmax: float = rule(300.0, POSITIVE)  # 150 * action_repeat in the paper; the spec sets it from the action repeat
    sigma_ratio: float = rule(0.75, POSITIVE)
    zero_prior_scale: float = rule(17.0, NON_NEGATIVE)
    gamma: float = rule(0.99, UNIT_RIGHT_OPEN)
    tau: float = rule(0.01, UNIT_LEFT_OPEN)
    batch_size: int = rule(512, POSITIVE_INT)
    utd: int = rule(8, POSITIVE_INT)  # critic+actor updates per agent step; the model/encoder update runs once per step
    alpha: float = rule(0.05, UNIT_CLOSED)  # fraction of each critic minibatch replaced by one-step model transitions
    model_actions: Literal["policy", "random"] = "policy"
    lr_encoder: float = rule(1e-4, POSITIVE)
    lr_model: float = rule(3e-4, POSITIVE)
    lr_critic: float = rule(3e-4, POSITIVE)
    lr_actor: float = rule(3e-4, POSITIVE)
    grad_clip: float = rule(10.0, POSITIVE)
    exploration_noise: float = rule(0.1, NON_NEGATIVE)
    noise_clip: float = rule(0.3, NON_NEGATIVE)
    dynamics_target_mix: float = rule(0.9999, UNIT_CLOSED)  # t = mix * z' + (1 - mix) / group
    mpc: bool = rule(False, BOOL)
    # With `mpc`, whether the deterministic evaluation episodes plan too. The paper's curves are training returns
    # (the reference has no evaluation episodes); evaluating with the policy alone bounds their cost, since MPC
    # evaluates (mpc_samples + 1) x mpc_iterations candidates per action and per episode.
    eval_mpc: bool = rule(True, BOOL)
    mpc_iterations: int = rule(6, POSITIVE_INT)
    mpc_samples: int = rule(512, POSITIVE_INT)
    mpc_elites: int = rule(64, POSITIVE_INT)
    mpc_temperature: float = rule(0.5, POSITIVE)
    mpc_std_init: float = rule(0.3, POSITIVE)
    mpc_std_min: float = rule(0.05, POSITIVE)

    def relations(self, section: str):
        if self.latent % self.simnorm_group:
            yield f"{section}.latent ({self.latent}) must be a multiple of simnorm_group ({self.simnorm_group})"
        if self.model_actions not in ("policy", "random"):
            yield f"{section}.model_actions must be 'policy' or 'random', got {self.model_actions!r}"
        if self.mpc_elites > self.mpc_samples + 1:
            yield f"{section}.mpc_elites cannot exceed mpc_samples + 1"

    @property
    def model_rows(self) -> int:
        """Rows of each critic minibatch that come from the model: those left over by the real rows,
        int(batch_size * (1 - alpha)), as the spec and the authors' code count them (26 of 512 at alpha 0.05)."""
        return self.batch_size - int(self.batch_size * (1.0 - self.alpha))


# ------------------------------------------------------------------------------------------------ networks
class Critic(nn.Module):
    """Two HL-Gauss heads on concat(z, a), on stacked weights, with a fixed zero prior added to the logits."""

    hidden: int
    num_bins: int

    @nn.compact
    def __call__(self, z, a, prior):
        x = jnp.concatenate([z, a], axis=-1)
        return StackedMLP(2, (self.hidden, self.hidden), self.num_bins, name="heads")(x) + prior  # [2, ..., bins]


class Dynamics(nn.Module):
    """Latent dynamics (logits of the next SimNorm latent) and reward, both on concat(z, a)."""

    hidden: int
    latent: int

    @nn.compact
    def __call__(self, z, a):
        x = jnp.concatenate([z, a], axis=-1)
        next_logits = LatentHead((self.hidden, self.hidden), self.latent, name="dynamics")(x)
        reward = MLP((self.hidden, self.hidden), 1, name="reward")(x)[..., 0]
        return next_logits, reward


@struct.dataclass
class MadTDState:
    encoder: dict
    model: dict
    critic: dict
    critic_target: dict
    actor: dict
    opt_encoder: optax.OptState
    opt_model: optax.OptState
    opt_critic: optax.OptState
    opt_actor: optax.OptState


METRICS = ("loss/reward", "loss/dynamics", "loss/vaml", "loss/q_encoder", "loss/critic", "loss/actor", "q_mean",
           DROPPED)


def make_madtd(cfg: MadTDConfig, observation_size: int, action_size: int) -> Agent:
    """MAD-TD for one (observation_size, action_size), as pure functions closed over static config."""
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
        plan = cfg.mpc and (explore or cfg.eval_mpc)
        action = mpc_action(state, z, k_mpc) if plan else policy(state.actor, z)
        if explore and not cfg.mpc:
            noise = jnp.clip(cfg.exploration_noise * jax.random.normal(k_noise, action.shape), -cfg.noise_clip,
                             cfg.noise_clip)
            action = jnp.clip(action + noise, -1.0, 1.0)
        return action

    # -- updates
    # For throughput on an accelerator no network runs twice on the same rows, and rows that need no gradient go
    # through a network together: the twin heads are stacked; the critic/actor steps of one agent step share one
    # encoding of all their minibatches, obs and next_obs in one pass (the encoder only changes in the model step
    # before them); the model loss's target critic at the real next latent also gives its TD target. Where only
    # some rows need a gradient (obs in the model loss, the predicted next latent), they get their own pass: in a
    # shared one the others would be differentiated too (measured: 2% more FLOP per agent step at paper size).
    def encode_pair(encoder, obs, next_obs):
        z = encode(encoder, jnp.concatenate([obs, next_obs], axis=-2))
        return z[..., :obs.shape[-2], :], z[..., obs.shape[-2]:, :]

    def bootstrap(reward, target_logits):
        """r + gamma * min over the target heads, from the target critic's logits at (z', pi(z'))."""
        return jax.lax.stop_gradient(reward + cfg.gamma * jnp.min(hl.value(target_logits), axis=0))

    def td_target(state: MadTDState, reward, next_z):
        return bootstrap(reward, critic_logits(state.critic_target, next_z, policy(state.actor, next_z)))

    def hl_loss(logits, target, weight):
        """HL-Gauss CE (per bin) summed over the heads, weighted mean over the batch."""
        ce = hl.cross_entropy(logits, hl.probs(target))  # [2, B]
        return jnp.mean(weight * jnp.sum(ce, axis=0))

    def model_loss(encoder, model, state: MadTDState, batch: Batch):
        m = batch["mask"]
        z = encode(encoder, batch["obs"])
        z_next = jax.lax.stop_gradient(encode(encoder, batch["next_obs"]))
        next_logits, reward_hat = model_net.apply(model, z, batch["action"])
        logp_next = simnorm_log(next_logits, cfg.simnorm_group)
        a_next = policy(state.actor, z_next)
        loss_reward = jnp.mean(m * (batch["reward"] - reward_hat) ** 2)
        target = cfg.dynamics_target_mix * z_next + (1 - cfg.dynamics_target_mix) / cfg.simnorm_group
        loss_dynamics = -jnp.mean(m[:, None] * target * logp_next)
        # Value-aware term: the frozen target critic's distribution at the predicted next latent should match
        # its distribution at the real next latent.
        logits_real = jax.lax.stop_gradient(critic_logits(state.critic_target, z_next, a_next))
        logq_pred = jax.nn.log_softmax(critic_logits(state.critic_target, jnp.exp(logp_next), a_next), axis=-1)
        loss_vaml = -jnp.mean(m[None, :, None] * jax.nn.softmax(logits_real, axis=-1) * logq_pred)
        # The online critic's TD loss, with its gradient reaching the encoder only.
        y = bootstrap(batch["reward"], logits_real)
        loss_q_encoder = hl_loss(critic_logits(jax.lax.stop_gradient(state.critic), z, batch["action"]), y, m)
        total = loss_reward + loss_dynamics + loss_vaml + loss_q_encoder
        return total, {"loss/reward": loss_reward, "loss/dynamics": loss_dynamics, "loss/vaml": loss_vaml,
                       "loss/q_encoder": loss_q_encoder}

    def model_update(state: MadTDState, batch: Batch):
        (_, metrics), (g_enc, g_model) = jax.value_and_grad(model_loss, argnums=(0, 1), has_aux=True)(
            state.encoder, state.model, state, batch)
        encoder, opt_enc, dropped_enc = guarded_step(opt_encoder, g_enc, state.opt_encoder, state.encoder)
        model, opt_mod, dropped_model = guarded_step(opt_model, g_model, state.opt_model, state.model)
        return state.replace(encoder=encoder, model=model, opt_encoder=opt_enc, opt_model=opt_mod), metrics, \
            count(dropped_enc, dropped_model)

    def critic_batch(state: MadTDState, batch: Batch, key: jax.Array, encoded=None):
        """The model-augmented critic batch: the rows after the first int(B * (1 - alpha)) become one-step model
        transitions. `encoded`: the batch's (z, z') under the current encoder, where already computed."""
        n_real = cfg.batch_size - cfg.model_rows
        z, z_next_real = encode_pair(state.encoder, batch["obs"], batch["next_obs"]) if encoded is None else encoded
        z, z_next_real = jax.lax.stop_gradient(z), jax.lax.stop_gradient(z_next_real[:n_real])
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

    def critic_loss(state: MadTDState, batch: Batch, key: jax.Array, encoded=None):
        """HL-Gauss TD loss on the model-augmented batch; only `state.critic` can receive a gradient."""
        z, actions, rewards, z_next, weights = critic_batch(state, batch, key, encoded)
        logits = critic_logits(state.critic, z, actions)
        return hl_loss(logits, td_target(state, rewards, z_next), weights), jnp.mean(hl.value(logits))

    def critic_update(state: MadTDState, batch: Batch, key: jax.Array, encoded=None):
        (loss, q_mean), grads = jax.value_and_grad(
            lambda critic: critic_loss(state.replace(critic=critic), batch, key, encoded), has_aux=True)(state.critic)
        critic, opt, dropped = guarded_step(opt_critic, grads, state.opt_critic, state.critic)
        target = guarded_polyak(critic, state.critic_target, cfg.tau, dropped)
        return state.replace(critic=critic, critic_target=target, opt_critic=opt), loss, q_mean, dropped

    def actor_update(state: MadTDState, batch: Batch, z=None):
        """`z`: the batch's observations under the current encoder, where already computed."""
        z = jax.lax.stop_gradient(encode(state.encoder, batch["obs"]) if z is None else z)

        def loss_fn(actor):
            q = q_values(state.critic_target, z, policy(actor, z))
            return -jnp.mean(batch["mask"] * jnp.min(q, axis=0))

        loss, grads = jax.value_and_grad(loss_fn)(state.actor)
        actor, opt, dropped = guarded_step(opt_actor, grads, state.opt_actor, state.actor)
        return state.replace(actor=actor, opt_actor=opt), loss, dropped

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
        z, z_next = encode_pair(state.encoder, batch["obs"], batch["next_obs"])
        y = td_target(state, batch["reward"], z_next)
        squared = jnp.mean((q_values(state.critic, z, batch["action"]) - y) ** 2, axis=0)
        return jnp.sum(batch["mask"] * squared) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)

    def update(state: MadTDState, sample: Sampler, key: jax.Array, step: jax.Array):
        """One agent step: UTD minibatches; model/encoder update on minibatch 0, then critic and actor on each."""
        del step  # MAD-TD has no schedule of its own
        k_sample, key = jax.random.split(key)
        batches = sample(k_sample, (cfg.utd, cfg.batch_size))
        state, metrics, dropped = model_update(state, jax.tree.map(lambda x: x[0], batches))
        # The encoder is fixed from here to the next agent step: every minibatch is encoded once, in one pass.
        encoded = encode_pair(state.encoder, batches["obs"], batches["next_obs"])

        def critic_actor(state, inputs):
            batch, (z, z_next), k = inputs
            state, critic_loss, q_mean, dropped_critic = critic_update(state, batch, k, (z, z_next))
            state, actor_loss, dropped_actor = actor_update(state, batch, z)
            return state, (critic_loss, actor_loss, q_mean, dropped_critic, dropped_actor)

        state, (critic_loss, actor_loss, q_mean, dropped_critic, dropped_actor) = jax.lax.scan(
            critic_actor, state, (batches, encoded, jax.random.split(key, cfg.utd)))
        metrics.update({"loss/critic": jnp.mean(critic_loss), "loss/actor": jnp.mean(actor_loss),
                        "q_mean": jnp.mean(q_mean), DROPPED: dropped + count(dropped_critic, dropped_actor)})
        return state, metrics

    return Agent(name="madtd", config=cfg, init=init, act=act, update=update, batch_size=cfg.batch_size,
                 metric_names=METRICS, gamma=cfg.gamma, target_action=target_action,
                 value=value, td_error=td_error,
                 extras={"encode": encode, "policy": policy, "q_values": q_values, "critic_loss": critic_loss,
                         "critic_batch": critic_batch, "model_loss": model_loss})

