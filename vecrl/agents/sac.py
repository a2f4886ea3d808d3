"""SAC (Haarnoja et al.), configured as in the "Dyna limits" paper's Table 1 (../shared/spec/baselines.md):
tanh-Gaussian actor, twin MSE critics with Polyak targets, learned temperature. Read top to bottom: config,
networks, init, act, then the three updates of one gradient step.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from vecrl.agents.base import Agent, Batch, Sampler
from vecrl.networks import MLP


@dataclasses.dataclass(frozen=True)
class SACConfig:
    hidden: int = 256  # two hidden ReLU layers in actor and critics
    gamma: float = 0.99
    tau: float = 0.005  # target <- (1 - tau) * target + tau * online after every critic update
    lr: float = 3e-4  # actor, critics and temperature
    adam_eps: float = 1.5e-4
    batch_size: int = 256
    utd: int = 20  # gradient steps per agent step (the paper's "updates per step")
    init_temperature: float = 1.0
    target_entropy_scale: float = 1.0  # target entropy = -scale * action_size
    # Not in the paper's table: the usual bounds of the actor's log standard deviation (squashed into them).
    log_std_min: float = -5.0
    log_std_max: float = 2.0

    def validate(self) -> None:
        for name in ("hidden", "batch_size", "utd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"sac.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.gamma < 1.0 or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"sac.gamma must be in [0, 1) and tau in (0, 1], got {self.gamma}, {self.tau}")
        for name in ("lr", "adam_eps", "init_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sac.{name} must be > 0, got {getattr(self, name)}")
        if not self.log_std_min < self.log_std_max:
            raise ValueError("sac.log_std_min must be below sac.log_std_max")


class TwinCritic(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], axis=-1)
        return jnp.stack([MLP((self.hidden, self.hidden), 1, layer_norm=False, activation=jax.nn.relu,
                              name=f"q_{i}")(x)[..., 0] for i in range(2)])  # [2, ...]


@struct.dataclass
class SACState:
    actor: dict
    critic: dict
    critic_target: dict
    log_temperature: jax.Array
    opt_actor: optax.OptState
    opt_critic: optax.OptState
    opt_temperature: optax.OptState


METRICS = ("loss/critic", "loss/actor", "loss/temperature", "temperature", "entropy", "q_mean")


def tanh_gaussian_log_prob(u: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """log pi(tanh(u)) for u ~ N(mean, exp(log_std)): the Gaussian density and the tanh Jacobian, with
    log(1 - tanh(u)^2) written as 2 (log 2 - u - softplus(-2u)) to stay finite for large |u|."""
    gauss = -0.5 * ((u - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    jacobian = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.sum(gauss - jacobian, axis=-1)


def temperature_loss(log_temperature: jax.Array, logp: jax.Array, mask: jax.Array,
                     target_entropy: jax.Array) -> jax.Array:
    """SAC's temperature objective: its gradient raises the temperature while the policy's entropy (-logp, over
    the rows with mask 1) is below the target, and lowers it while above."""
    entropy_gap = jax.lax.stop_gradient(jnp.sum(mask * (logp + target_entropy)) / jnp.maximum(jnp.sum(mask), 1.0))
    return -log_temperature * entropy_gap


def make_sac(cfg: SACConfig, observation_size: int, action_size: int) -> Agent:
    cfg.validate()
    actor_net = MLP((cfg.hidden, cfg.hidden), 2 * action_size, layer_norm=False, activation=jax.nn.relu)
    critic_net = TwinCritic(cfg.hidden)
    optimizer = optax.adam(cfg.lr, eps=cfg.adam_eps)
    target_entropy = -cfg.target_entropy_scale * action_size

    def actor_dist(params, obs):
        mean, raw = jnp.split(actor_net.apply(params, obs), 2, axis=-1)
        log_std = cfg.log_std_min + 0.5 * (cfg.log_std_max - cfg.log_std_min) * (jnp.tanh(raw) + 1.0)
        return mean, log_std

    def sample(params, obs, key):
        """A reparameterised action and its log-probability."""
        mean, log_std = actor_dist(params, obs)
        u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
        return jnp.tanh(u), tanh_gaussian_log_prob(u, mean, log_std)

    def init(key: jax.Array) -> SACState:
        k_actor, k_critic = jax.random.split(key)
        obs, a = jnp.zeros((observation_size,)), jnp.zeros((action_size,))
        actor, critic = actor_net.init(k_actor, obs), critic_net.init(k_critic, obs, a)
        log_temperature = jnp.log(jnp.asarray(cfg.init_temperature, jnp.float32))
        return SACState(actor=actor, critic=critic, critic_target=critic, log_temperature=log_temperature,
                        opt_actor=optimizer.init(actor), opt_critic=optimizer.init(critic),
                        opt_temperature=optimizer.init(log_temperature))

    def act(state: SACState, obs: jax.Array, key: jax.Array, explore: bool) -> jax.Array:
        if explore:
            return sample(state.actor, obs, key)[0]
        return jnp.tanh(actor_dist(state.actor, obs)[0])

    # -- losses (rows of one minibatch; `mask` weighs out transitions whose next observation is not stored)
    def critic_loss(critic, state: SACState, batch: Batch, key: jax.Array):
        next_action, next_logp = sample(state.actor, batch["next_obs"], key)
        q_next = jnp.min(critic_net.apply(state.critic_target, batch["next_obs"], next_action), axis=0)
        soft_next = q_next - jnp.exp(state.log_temperature) * next_logp
        target = jax.lax.stop_gradient(batch["reward"] + cfg.gamma * soft_next)
        q = critic_net.apply(critic, batch["obs"], batch["action"])  # [2, B]
        return jnp.mean(batch["mask"] * jnp.sum((q - target) ** 2, axis=0)), jnp.mean(q)

    def actor_loss(actor, state: SACState, batch: Batch, key: jax.Array):
        action, logp = sample(actor, batch["obs"], key)
        q = jnp.min(critic_net.apply(state.critic, batch["obs"], action), axis=0)
        return jnp.mean(batch["mask"] * (jnp.exp(state.log_temperature) * logp - q)), logp

    def critic_step(state: SACState, batch: Batch, key: jax.Array):
        """One critic step and the target's Polyak update: (state, (loss, q_mean))."""
        (loss_c, q_mean), g = jax.value_and_grad(critic_loss, has_aux=True)(state.critic, state, batch, key)
        updates, opt_critic = optimizer.update(g, state.opt_critic, state.critic)
        critic = optax.apply_updates(state.critic, updates)
        state = state.replace(critic=critic, opt_critic=opt_critic,
                              critic_target=optax.incremental_update(critic, state.critic_target, cfg.tau))
        return state, (loss_c, q_mean)

    def gradient_step(state: SACState, inputs):
        batch, key = inputs
        k_critic, k_actor = jax.random.split(key)
        state, (loss_c, q_mean) = critic_step(state, batch, k_critic)

        (loss_a, logp), g = jax.value_and_grad(actor_loss, has_aux=True)(state.actor, state, batch, k_actor)
        updates, opt_actor = optimizer.update(g, state.opt_actor, state.actor)
        state = state.replace(actor=optax.apply_updates(state.actor, updates), opt_actor=opt_actor)

        loss_t, g = jax.value_and_grad(temperature_loss)(state.log_temperature, logp, batch["mask"], target_entropy)
        updates, opt_t = optimizer.update(g, state.opt_temperature, state.log_temperature)
        state = state.replace(log_temperature=optax.apply_updates(state.log_temperature, updates), opt_temperature=opt_t)
        return state, {"loss/critic": loss_c, "loss/actor": loss_a, "loss/temperature": loss_t,
                       "temperature": jnp.exp(state.log_temperature), "entropy": -jnp.mean(logp), "q_mean": q_mean}

    def update(state: SACState, sample: Sampler, key: jax.Array, step: jax.Array):
        del step
        k_sample, key = jax.random.split(key)
        batches = sample(k_sample, (cfg.utd, cfg.batch_size))
        state, metrics = jax.lax.scan(gradient_step, state, (batches, jax.random.split(key, cfg.utd)))
        return state, jax.tree.map(jnp.mean, metrics)

    # -- what the trainer's diagnostics read
    def target_action(state: SACState, obs: jax.Array, key: jax.Array) -> jax.Array:
        return sample(state.actor, obs, key)[0]  # the TD target evaluates a sampled action

    def value(state: SACState, obs: jax.Array, key: jax.Array) -> jax.Array:
        """The twin minimum at the action the evaluated (deterministic) policy takes. SAC's Q includes future
        entropy bonuses, which the Monte-Carlo return it is compared with does not."""
        del key
        return jnp.min(critic_net.apply(state.critic, obs, jnp.tanh(actor_dist(state.actor, obs)[0])), axis=0)

    def td_error(state: SACState, batch: Batch, key: jax.Array) -> jax.Array:
        loss, _ = critic_loss(state.critic, state, batch, key)  # masked mean over rows of the sum over two heads
        return loss / 2.0 / jnp.maximum(jnp.mean(batch["mask"]), 1e-6)

    return Agent(name="sac", config=cfg, init=init, act=act, update=update, batch_size=cfg.batch_size,
                 metric_names=METRICS, gamma=cfg.gamma, target_action=target_action,
                 value=value, td_error=td_error,
                 extras={"actor_dist": actor_dist, "sample": sample, "critic_loss": critic_loss,
                         "actor_loss": actor_loss, "critic_net": critic_net, "critic_step": critic_step,
                         # One critic, actor and temperature step on a given minibatch, for agents built on SAC
                         # (MBPO feeds it batches of model and real rows): (state, (batch, key)) -> (state, metrics).
                         "gradient_step": gradient_step})
