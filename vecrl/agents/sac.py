"""SAC (Haarnoja et al.), configured as the "Dyna limits" paper's code (CLeARoboticsLab/STFL) ran it
(../shared/spec/baselines.md): tanh-Gaussian actor, twin MSE critics with Polyak targets, learned temperature.

The losses and the steps are module-level pure functions of (networks, state, batch, key), which MBPO and SAC-SVG
import and tests call directly; `make_sac` only closes them over one configuration. Read top to bottom: config,
networks, state, the policy, the three losses, the steps of one gradient step, then the agent.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from vecrl.agents.base import DROPPED, Agent, Batch, Sampler, count, guarded_polyak, guarded_step, summarise
from vecrl.networks import MLP, StackedMLP
from vecrl.validation import FINITE, POSITIVE, POSITIVE_INT, UNIT_LEFT_OPEN, UNIT_RIGHT_OPEN, rule


@dataclasses.dataclass(frozen=True)
class SACConfig:
    hidden: int = rule(256, POSITIVE_INT)  # two hidden ReLU layers in actor and critics
    gamma: float = rule(0.99, UNIT_RIGHT_OPEN)
    tau: float = rule(0.005, UNIT_LEFT_OPEN)  # target <- (1 - tau) target + tau online after every critic step
    lr: float = rule(3e-4, POSITIVE)  # actor, critics and temperature
    # optax's default, which the paper's code uses (its Table 1 gives 1.5e-4).
    adam_eps: float = rule(1e-8, POSITIVE)
    batch_size: int = rule(256, POSITIVE_INT)
    utd: int = rule(20, POSITIVE_INT)  # gradient steps per agent step (the paper's "updates per step")
    init_temperature: float = rule(1.0, POSITIVE)
    # Target entropy = -scale * action_size: the paper's code uses -|A| / 2, for SAC and MBPO alike.
    target_entropy_scale: float = rule(0.5, FINITE)
    # The bounds the actor's log standard deviation is squashed into, as in the paper's code.
    log_std_min: float = rule(-10.0, FINITE)
    log_std_max: float = rule(2.0, FINITE)

    def relations(self, section: str):
        if not self.log_std_min < self.log_std_max:
            yield f"{section}.log_std_min ({self.log_std_min}) must be below {section}.log_std_max ({self.log_std_max})"


# ------------------------------------------------------------------------------------------------ networks
class TwinCritic(nn.Module):
    """Two Q heads on stacked weights: each layer of both heads is one batched matmul."""

    hidden: int

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], axis=-1)
        return StackedMLP(2, (self.hidden, self.hidden), 1, layer_norm=False, activation=jax.nn.relu,
                          name="heads")(x)[..., 0]  # [2, ...]


@dataclasses.dataclass(frozen=True)
class SACNetworks:
    """What SAC's functions need besides parameters: the modules and the configuration."""

    cfg: SACConfig
    actor: nn.Module  # obs -> [mean, unsquashed log std]
    critic: TwinCritic
    action_size: int


def sac_networks(cfg: SACConfig, action_size: int) -> SACNetworks:
    actor = MLP((cfg.hidden, cfg.hidden), 2 * action_size, layer_norm=False, activation=jax.nn.relu)
    return SACNetworks(cfg=cfg, actor=actor, critic=TwinCritic(cfg.hidden), action_size=action_size)


def adam(cfg: SACConfig, lr: float | None = None) -> optax.GradientTransformation:
    return optax.adam(cfg.lr if lr is None else lr, eps=cfg.adam_eps)


@struct.dataclass
class SACState:
    actor: dict
    critic: dict
    critic_target: dict
    log_temperature: jax.Array
    opt_actor: optax.OptState
    opt_critic: optax.OptState
    opt_temperature: optax.OptState


def init_state(nets: SACNetworks, observation_size: int, key: jax.Array) -> SACState:
    k_actor, k_critic = jax.random.split(key)
    obs, a = jnp.zeros((observation_size,)), jnp.zeros((nets.action_size,))
    actor, critic = nets.actor.init(k_actor, obs), nets.critic.init(k_critic, obs, a)
    log_temperature = jnp.log(jnp.asarray(nets.cfg.init_temperature, jnp.float32))
    optimizer = adam(nets.cfg)
    return SACState(actor=actor, critic=critic, critic_target=critic, log_temperature=log_temperature,
                    opt_actor=optimizer.init(actor), opt_critic=optimizer.init(critic),
                    opt_temperature=optimizer.init(log_temperature))


# ------------------------------------------------------------------------------------------------ the policy
def tanh_gaussian_log_prob(u: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """log pi(tanh(u)) for u ~ N(mean, exp(log_std)): the Gaussian density and the tanh Jacobian, with
    log(1 - tanh(u)^2) written as 2 (log 2 - u - softplus(-2u)) to stay finite for large |u|."""
    gauss = -0.5 * ((u - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    jacobian = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.sum(gauss - jacobian, axis=-1)


def policy(nets: SACNetworks, actor: dict, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Gaussian before the tanh: mean and log std, the latter squashed into [log_std_min, log_std_max]."""
    cfg = nets.cfg
    mean, raw = jnp.split(nets.actor.apply(actor, obs), 2, axis=-1)
    log_std = cfg.log_std_min + 0.5 * (cfg.log_std_max - cfg.log_std_min) * (jnp.tanh(raw) + 1.0)
    return mean, log_std


def sample_action(nets: SACNetworks, actor: dict, obs: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A reparameterised action and its log-probability."""
    mean, log_std = policy(nets, actor, obs)
    u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    return jnp.tanh(u), tanh_gaussian_log_prob(u, mean, log_std)


def mean_action(nets: SACNetworks, actor: dict, obs: jax.Array) -> jax.Array:
    """The evaluated (deterministic) policy: tanh of the Gaussian's mean."""
    return jnp.tanh(policy(nets, actor, obs)[0])


def act(nets: SACNetworks, actor: dict, obs: jax.Array, key: jax.Array, explore: bool) -> jax.Array:
    """The Agent interface's act: a sampled action while exploring, else the mean action."""
    return sample_action(nets, actor, obs, key)[0] if explore else mean_action(nets, actor, obs)


# ------------------------------------------------------------------------------------------------ losses
# Rows of one minibatch; `mask` weighs out transitions whose next observation is not stored.
def critic_loss(critic: dict, nets: SACNetworks, state: SACState, batch: Batch, key: jax.Array):
    """Both heads' squared error to the soft TD target of the target critics' minimum: (loss, mean Q)."""
    next_action, next_logp = sample_action(nets, state.actor, batch["next_obs"], key)
    q_next = jnp.min(nets.critic.apply(state.critic_target, batch["next_obs"], next_action), axis=0)
    soft_next = q_next - jnp.exp(state.log_temperature) * next_logp
    target = jax.lax.stop_gradient(batch["reward"] + nets.cfg.gamma * soft_next)
    q = nets.critic.apply(critic, batch["obs"], batch["action"])  # [2, B]
    return jnp.mean(batch["mask"] * jnp.sum((q - target) ** 2, axis=0)), jnp.mean(q)


def actor_loss(actor: dict, nets: SACNetworks, state: SACState, batch: Batch, key: jax.Array):
    """alpha log pi(a|s) - min Q(s, a) for a reparameterised a: (loss, log-probabilities)."""
    action, logp = sample_action(nets, actor, batch["obs"], key)
    q = jnp.min(nets.critic.apply(state.critic, batch["obs"], action), axis=0)
    return jnp.mean(batch["mask"] * (jnp.exp(state.log_temperature) * logp - q)), logp


def temperature_loss(log_temperature: jax.Array, logp: jax.Array, mask: jax.Array,
                     target_entropy: jax.Array) -> jax.Array:
    """alpha (entropy - target), the entropy (-logp over the rows with mask 1) held fixed: its gradient raises the
    temperature while the policy's entropy is below the target and lowers it while above, in steps scaled by alpha
    as in both reference codes (STFL's and SAC-SVG's)."""
    entropy = -jnp.sum(mask * logp) / jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.exp(log_temperature) * jax.lax.stop_gradient(entropy - target_entropy)


# ------------------------------------------------------------------------------------------------ steps
# Each optimiser step is guarded (vecrl.agents.base.guarded_step): a non-finite one is dropped, and reported.
def critic_step(nets: SACNetworks, state: SACState, batch: Batch, key: jax.Array):
    """One critic step and the target's Polyak update (neither, if the step is dropped):
    (state, (loss, mean Q, dropped))."""
    (loss, q_mean), g = jax.value_and_grad(critic_loss, has_aux=True)(state.critic, nets, state, batch, key)
    critic, opt_critic, dropped = guarded_step(adam(nets.cfg), g, state.opt_critic, state.critic)
    target = guarded_polyak(critic, state.critic_target, nets.cfg.tau, dropped)
    return state.replace(critic=critic, opt_critic=opt_critic, critic_target=target), (loss, q_mean, dropped)


def apply_actor_gradient(nets: SACNetworks, state: SACState, grads: dict) -> tuple[SACState, jax.Array]:
    actor, opt_actor, dropped = guarded_step(adam(nets.cfg), grads, state.opt_actor, state.actor)
    return state.replace(actor=actor, opt_actor=opt_actor), dropped


def temperature_step(state: SACState, logp: jax.Array, mask: jax.Array, target_entropy: jax.Array,
                     optimizer: optax.GradientTransformation):
    """One temperature step toward `target_entropy` given the actor step's log-probabilities:
    (state, loss, dropped)."""
    loss, g = jax.value_and_grad(temperature_loss)(state.log_temperature, logp, mask, target_entropy)
    log_temperature, opt_t, dropped = guarded_step(optimizer, g, state.opt_temperature, state.log_temperature)
    return state.replace(log_temperature=log_temperature, opt_temperature=opt_t), loss, dropped


def target_entropy(nets: SACNetworks) -> float:
    return -nets.cfg.target_entropy_scale * nets.action_size


def gradient_step(nets: SACNetworks, state: SACState, batch: Batch, key: jax.Array):
    """SAC's critic, actor and temperature steps on one minibatch: (state, metrics)."""
    k_critic, k_actor = jax.random.split(key)
    state, (loss_c, q_mean, dropped_c) = critic_step(nets, state, batch, k_critic)
    (loss_a, logp), g = jax.value_and_grad(actor_loss, has_aux=True)(state.actor, nets, state, batch, k_actor)
    state, dropped_a = apply_actor_gradient(nets, state, g)
    state, loss_t, dropped_t = temperature_step(state, logp, batch["mask"], target_entropy(nets), adam(nets.cfg))
    return state, {"loss/critic": loss_c, "loss/actor": loss_a, "loss/temperature": loss_t,
                   "temperature": jnp.exp(state.log_temperature), "entropy": -jnp.mean(logp), "q_mean": q_mean,
                   DROPPED: count(dropped_c, dropped_a, dropped_t)}


METRICS = ("loss/critic", "loss/actor", "loss/temperature", "temperature", "entropy", "q_mean", DROPPED)


# ------------------------------------------------------------------------------------------------ diagnostics
def value(nets: SACNetworks, state: SACState, obs: jax.Array) -> jax.Array:
    """The twin minimum at the action the evaluated (deterministic) policy takes. SAC's Q includes future entropy
    bonuses, which the Monte-Carlo return it is compared with does not."""
    return jnp.min(nets.critic.apply(state.critic, obs, mean_action(nets, state.actor, obs)), axis=0)


def td_error(nets: SACNetworks, state: SACState, batch: Batch, key: jax.Array) -> jax.Array:
    """The critic loss's squared error per head, averaged over the rows with mask 1."""
    loss, _ = critic_loss(state.critic, nets, state, batch, key)  # masked mean over rows of the sum over two heads
    return loss / 2.0 / jnp.maximum(jnp.mean(batch["mask"]), 1e-6)


# ------------------------------------------------------------------------------------------------ the agent
def make_sac(cfg: SACConfig, observation_size: int, action_size: int) -> Agent:
    nets = sac_networks(cfg, action_size)

    def update(state: SACState, sample: Sampler, key: jax.Array, step: jax.Array):
        del step
        k_sample, key = jax.random.split(key)
        batches = sample(k_sample, (cfg.utd, cfg.batch_size))
        state, metrics = jax.lax.scan(lambda s, x: gradient_step(nets, s, *x), state,
                                      (batches, jax.random.split(key, cfg.utd)))
        return state, summarise(metrics)

    return Agent(name="sac", config=cfg, init=lambda key: init_state(nets, observation_size, key),
                 act=lambda state, obs, key, explore: act(nets, state.actor, obs, key, explore),
                 update=update, batch_size=cfg.batch_size, metric_names=METRICS, gamma=cfg.gamma,
                 # the TD target evaluates a sampled action
                 target_action=lambda state, obs, key: sample_action(nets, state.actor, obs, key)[0],
                 value=lambda state, obs, key: value(nets, state, obs),
                 td_error=lambda state, batch, key: td_error(nets, state, batch, key))
