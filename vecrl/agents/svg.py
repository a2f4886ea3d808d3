"""SAC-SVG(H) (Amos et al., "On the model-based stochastic value gradient for continuous reinforcement learning";
../shared/spec/baselines.md): SAC whose actor ascends an H-step value expansion through a learned deterministic
dynamics model and reward net, ending in SAC's critic, while the critic and the temperature learn as SAC's on
real transitions. Read top to bottom: config, the model, init, the losses, then one agent step's update.

The SAC part is vecrl.agents.sac's module functions (networks, action sampling, critic step, temperature step);
this module adds the model, the value-expansion actor loss, the target-entropy schedule, the temperature's own
learning rate (the paper's Table 3 gives it 5e-4, its actor and critic 1e-4), and three things of the paper's
released code: observations standardised by running statistics for every network, the dynamics model's gradient
norm clipped at 1, and its multi-step loss not differentiated through its own predicted states (detach_xt).

H counts model steps, as in the paper's value expansion (its eqs. 3 and 9) and its "SAC is SVG(0)":

    V = sum_{t<H} gamma^t r(x_t, u_t) + gamma^H min_i Q_i(x_H, u_H) - alpha sum_{t<=H} gamma^t log pi(u_t | x_t),

with x_0 a replay state, u_t ~ pi(x_t) reparameterised and x_{t+1} the model's prediction. Written with H' = H + 1
states per rollout (as the authors' code's `horizon` counts), this is the sum over t < H' - 1 ending in
Q(x_{H'-1}, u_{H'-1}). With H = 0 it is SAC's actor objective.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from vecrl.agents import sac
from vecrl.agents.base import DROPPED, Agent, Batch, Sampler, count, guarded_step, summarise
from vecrl.agents.mbpo import masked_mean
from vecrl.agents.sac import SACConfig, SACState
from vecrl.networks import MLP
from vecrl.running_stats import RunningStats, running_stats_add, running_stats_init, standardise
from vecrl.validation import (BOOL, FINITE, FINITE_OR_UNSET, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE,
                              POSITIVE_INT, rule)


@dataclasses.dataclass(frozen=True)
class SVGConfig(SACConfig):
    """SACConfig's fields with the paper's values (its Table 3), and the model's. Where the released code's
    train.yaml differs from Table 3 (actor and critics 4 x 512, a linear decoder, temperature lr 1e-4, single-step
    batch 1,024 and sequence batch 512), Table 3 is followed and the spec files say so."""

    hidden: int = rule(512, POSITIVE_INT)  # two hidden ReLU layers in actor and critics
    lr: float = rule(1e-4, POSITIVE)  # actor and critics
    adam_eps: float = rule(1e-8, POSITIVE)  # PyTorch's Adam default, as the paper's code
    batch_size: int = rule(512, POSITIVE_INT)  # rows of each single-step minibatch: critic, actor, temperature, reward
    utd: int = rule(1, POSITIVE_INT)  # single-step gradient steps per agent step (the table's N_step)
    init_temperature: float = rule(0.1, POSITIVE)
    log_std_min: float = rule(-5.0, FINITE)
    temperature_lr: float = rule(5e-4, POSITIVE)
    # -- the target entropy, decayed as the paper's eq. 14 (its App. A.1) over agent steps t:
    # (init - final) * (1 - min(t, T) / T) ** decay + final. The paper tunes the three per task (its Table 4);
    # unset, init is -target_entropy_scale * action_size (SAC's usual -|A|) and final equals init (a fixed target).
    target_entropy_scale: float = rule(1.0, FINITE)
    target_entropy_init: float | None = rule(None, FINITE_OR_UNSET)
    target_entropy_final: float | None = rule(None, FINITE_OR_UNSET)
    target_entropy_decay: float = rule(0.0, NON_NEGATIVE)  # beta; 0 keeps the target at init
    target_entropy_steps: int = rule(1_000_000, POSITIVE_INT)  # T: set it to the run's train.steps
    # -- observation normalisation, as the paper's code: every network (actor, critics, reward net, model) sees
    # observations standardised by a running mean and standard deviation (Welford's) of every observation the
    # agent collected for training, the standard deviation clamped into [obs_std_min, obs_std_max]; the model
    # predicts in those units. Off, every network sees raw observations.
    obs_norm: bool = rule(True, BOOL)
    obs_std_min: float = rule(0.1, POSITIVE)
    obs_std_max: float = rule(10.0, POSITIVE)
    # -- the model (the paper's Sec. 4.2 and Table 3)
    horizon: int = rule(2, NON_NEGATIVE_INT)  # H model steps in the actor's value expansion; 0 is SAC
    model_hidden: int = rule(512, POSITIVE_INT)  # encoder, decoder and reward MLPs (two hidden layers each), GRUs
    gru_layers: int = rule(2, POSITIVE_INT)
    model_lr: float = rule(1e-3, POSITIVE)  # dynamics and reward net
    model_grad_clip: float = rule(1.0, POSITIVE)  # the dynamics model's gradient norm, clipped as in the code
    # As the code: the dynamics loss does not differentiate through the model's own predicted states, only through
    # its GRU states (each step still takes the previous prediction as input). The actor's expansion does.
    detach_xt: bool = rule(True, BOOL)
    model_batch_size: int = rule(1024, POSITIVE_INT)  # sequences of `horizon` transitions per dynamics step
    model_updates: int = rule(4, POSITIVE_INT)  # dynamics steps per agent step (the table's N_seq)
    # Not in the paper: the agent step from which the actor's objective goes through the model; before it, the
    # actor takes SAC's steps while the model trains (the authors' code's `warmup_steps`, 10,000 in some of its
    # task configs). 0 uses the model from the first update, as the paper's Algorithm 1.
    model_actor_start: int = rule(0, NON_NEGATIVE_INT)

    def relations(self, section: str):
        yield from super().relations(section)
        if not self.obs_std_min <= self.obs_std_max:
            yield (f"{section}.obs_std_min ({self.obs_std_min}) must not exceed {section}.obs_std_max "
                   f"({self.obs_std_max})")


def target_entropy_schedule(step: jax.Array, init: float, final: float, decay: float, steps: int) -> jax.Array:
    """The paper's eq. 14 at agent step `step`, held at `final` after `steps` steps."""
    remaining = 1.0 - jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
    return (init - final) * remaining ** decay + final


# ------------------------------------------------------------------------------------------------ the model
class RecurrentDynamics(nn.Module):
    """One step of x_{t+1} = x_t + Dec(GRU(Enc([x_t, u_t]), h_t)): MLP encoder, a stack of GRU cells whose states
    carry over the rollout (each cell's output is the next one's input), MLP decoder of the top cell's output."""

    hidden: int
    gru_layers: int
    observation_size: int

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, ...], obs: jax.Array, action: jax.Array):
        z = MLP((self.hidden, self.hidden), self.hidden, layer_norm=False, activation=jax.nn.relu, name="encoder")(
            jnp.concatenate([obs, action], axis=-1))
        new_carry = []
        for i in range(self.gru_layers):
            h, z = nn.GRUCell(self.hidden, name=f"gru_{i}")(carry[i], z)
            new_carry.append(h)
        delta = MLP((self.hidden, self.hidden), self.observation_size, layer_norm=False, activation=jax.nn.relu,
                    name="decoder")(z)
        return tuple(new_carry), obs + delta


@struct.dataclass
class SVGState:
    sac: SACState  # its opt_temperature is the state of this agent's own temperature optimiser
    dynamics: dict
    reward: dict
    opt_dynamics: optax.OptState
    opt_reward: optax.OptState
    obs_stats: RunningStats  # of every training observation collected; kept through resets


MODEL_METRICS = ("target_entropy", "model/obs_mse", "model/reward_mse")


def make_svg(cfg: SVGConfig, observation_size: int, action_size: int) -> Agent:
    """SAC-SVG(H) for one (observation_size, action_size), as pure functions closed over static config."""
    nets = sac.sac_networks(cfg, action_size)
    dynamics_net = RecurrentDynamics(cfg.model_hidden, cfg.gru_layers, observation_size)
    reward_net = MLP((cfg.model_hidden, cfg.model_hidden), 1, layer_norm=False, activation=jax.nn.relu)
    temperature_optimizer = sac.adam(cfg, cfg.temperature_lr)
    dynamics_optimizer = optax.chain(optax.clip_by_global_norm(cfg.model_grad_clip), sac.adam(cfg, cfg.model_lr))
    reward_optimizer = sac.adam(cfg, cfg.model_lr)
    entropy_init = (-cfg.target_entropy_scale * action_size if cfg.target_entropy_init is None
                    else cfg.target_entropy_init)
    entropy_final = entropy_init if cfg.target_entropy_final is None else cfg.target_entropy_final

    def target_entropy(step: jax.Array) -> jax.Array:
        return target_entropy_schedule(step, entropy_init, entropy_final, cfg.target_entropy_decay,
                                       cfg.target_entropy_steps)

    # -- what every network sees: observations in the running statistics' units (or raw, without obs_norm)
    def normalise(state: SVGState, obs: jax.Array) -> jax.Array:
        return standardise(state.obs_stats, obs, cfg.obs_std_min, cfg.obs_std_max) if cfg.obs_norm else obs

    def normalised(state: SVGState, batch: Batch) -> Batch:
        return {**batch, "obs": normalise(state, batch["obs"]), "next_obs": normalise(state, batch["next_obs"])}

    def observe(state: SVGState, obs: jax.Array, valid: jax.Array) -> SVGState:
        return state.replace(obs_stats=running_stats_add(state.obs_stats, obs, valid))  # exposed only with obs_norm

    def zero_hidden(batch_shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
        """The GRU states a rollout starts from: zero, as in the paper, so that any replay state can start one."""
        return tuple(jnp.zeros((*batch_shape, cfg.model_hidden)) for _ in range(cfg.gru_layers))

    def predict_reward(params: dict, obs: jax.Array, action: jax.Array) -> jax.Array:
        return reward_net.apply(params, jnp.concatenate([obs, action], axis=-1))[..., 0]

    def unroll(dynamics: dict, obs: jax.Array, actions: jax.Array) -> jax.Array:
        """The model's predicted observations x_1..x_L [..., L, obs] from x_0 = obs [..., obs] under the given
        actions [..., L, act], each step fed the previous prediction (held constant for the gradient with
        detach_xt)."""
        def step(carry, action):
            hidden, x = carry
            x = jax.lax.stop_gradient(x) if cfg.detach_xt else x
            hidden, x = dynamics_net.apply(dynamics, hidden, x, action)
            return (hidden, x), x

        _, predicted = jax.lax.scan(step, (zero_hidden(obs.shape[:-1]), obs), jnp.moveaxis(actions, -2, 0))
        return jnp.moveaxis(predicted, 0, -2)

    def init_sac(key: jax.Array) -> SACState:
        state = sac.init_state(nets, observation_size, key)
        return state.replace(opt_temperature=temperature_optimizer.init(state.log_temperature))

    def init(key: jax.Array) -> SVGState:
        k_sac, k_dynamics, k_reward = jax.random.split(key, 3)
        obs, action = jnp.zeros((observation_size,)), jnp.zeros((action_size,))
        dynamics = dynamics_net.init(k_dynamics, zero_hidden(()), obs, action)
        reward = reward_net.init(k_reward, jnp.concatenate([obs, action]))
        return SVGState(sac=init_sac(k_sac), dynamics=dynamics, reward=reward,
                        opt_dynamics=dynamics_optimizer.init(dynamics), opt_reward=reward_optimizer.init(reward),
                        obs_stats=running_stats_init(observation_size))

    # -- losses, on normalised observations
    def dynamics_loss(dynamics: dict, sequences: Batch) -> jax.Array:
        """The paper's multi-step loss (its eq. 10): the model rolled from each sequence's first observation under
        its stored actions, every prediction's squared error (averaged over features) weighted by the step's mask,
        so steps past an episode's end or past a held-out transition count for nothing."""
        predicted = unroll(dynamics, sequences["obs"][..., 0, :], sequences["action"])
        return masked_mean(jnp.mean((predicted - sequences["next_obs"]) ** 2, axis=-1), sequences["mask"])

    def reward_loss(reward: dict, batch: Batch) -> jax.Array:
        return masked_mean((predict_reward(reward, batch["obs"], batch["action"]) - batch["reward"]) ** 2,
                           batch["mask"])

    def actor_loss(actor: dict, state: SVGState, batch: Batch, key: jax.Array):
        """-V (the module docstring's value expansion) from each row's observation, weighted by its mask and
        averaged as SAC's actor loss; and the first action's log-probability. Action t uses fold_in(key, t), so
        the first action is the one SAC's loss draws with fold_in(key, 0) whatever the horizon. Only `actor` is
        differentiated: the gradient flows through the model, the reward net and the critic without moving them."""
        alpha = jnp.exp(state.sac.log_temperature)
        x, hidden = batch["obs"], zero_hidden(batch["obs"].shape[:-1])
        value, first_logp = 0.0, None
        for t in range(cfg.horizon):
            u, logp = sac.sample_action(nets, actor, x, jax.random.fold_in(key, t))
            first_logp = logp if first_logp is None else first_logp
            value = value + cfg.gamma ** t * (predict_reward(state.reward, x, u) - alpha * logp)
            hidden, x = dynamics_net.apply(state.dynamics, hidden, x, u)
        u, logp = sac.sample_action(nets, actor, x, jax.random.fold_in(key, cfg.horizon))
        q = jnp.min(nets.critic.apply(state.sac.critic, x, u), axis=0)
        value = value + cfg.gamma ** cfg.horizon * (q - alpha * logp)
        first_logp = logp if first_logp is None else first_logp
        return jnp.mean(batch["mask"] * -value), first_logp

    def actor_gradient(state: SVGState, batch: Batch, key: jax.Array, use_model: jax.Array):
        """((loss, first log-prob), gradient) of the value expansion, or of SAC's actor loss while `use_model` is
        false. `use_model` comes from the unbatched step, so under the trainer's vmap this stays a branch and the
        model rollout runs only once it is used."""
        def expansion():
            return jax.value_and_grad(actor_loss, has_aux=True)(state.sac.actor, state, batch, key)

        def model_free():
            return jax.value_and_grad(sac.actor_loss, has_aux=True)(state.sac.actor, nets, state.sac, batch,
                                                                    jax.random.fold_in(key, 0))

        if cfg.horizon == 0 or cfg.model_actor_start == 0:  # the two coincide, or the model is always used
            return expansion()
        return jax.lax.cond(use_model, expansion, model_free)

    # -- one agent step's learning
    def gradient_step(state: SVGState, batch: Batch, key: jax.Array, entropy_target: jax.Array,
                      use_model: jax.Array):
        """One single-step update (the paper's Algorithm 1) on one minibatch of real transitions, observations
        normalised: SAC's critic step, the actor's step, the temperature's step toward the scheduled target, and
        the reward net's step."""
        k_critic, k_actor = jax.random.split(key)
        sac_state, (loss_c, q_mean, dropped_c) = sac.critic_step(nets, state.sac, batch, k_critic)
        state = state.replace(sac=sac_state)
        (loss_a, logp), g = actor_gradient(state, batch, k_actor, use_model)
        sac_state, dropped_a = sac.apply_actor_gradient(nets, sac_state, g)
        sac_state, loss_t, dropped_t = sac.temperature_step(sac_state, logp, batch["mask"], entropy_target,
                                                            temperature_optimizer)
        state = state.replace(sac=sac_state)
        if cfg.horizon > 0:  # SAC (H = 0) never uses the reward net
            loss_r, g = jax.value_and_grad(reward_loss)(state.reward, batch)
            reward, opt_reward, dropped_r = guarded_step(reward_optimizer, g, state.opt_reward, state.reward)
            state = state.replace(reward=reward, opt_reward=opt_reward)
        else:
            loss_r, dropped_r = jnp.zeros(()), jnp.asarray(False)
        return state, {"loss/critic": loss_c, "loss/actor": loss_a, "loss/temperature": loss_t,
                       "temperature": jnp.exp(sac_state.log_temperature), "entropy": -jnp.mean(logp),
                       "q_mean": q_mean, "model/reward_mse": loss_r,
                       DROPPED: count(dropped_c, dropped_a, dropped_t, dropped_r)}

    def dynamics_step(state: SVGState, sequences: Batch):
        loss, g = jax.value_and_grad(dynamics_loss)(state.dynamics, sequences)
        dynamics, opt_dynamics, dropped = guarded_step(dynamics_optimizer, g, state.opt_dynamics, state.dynamics)
        return state.replace(dynamics=dynamics, opt_dynamics=opt_dynamics), (loss, dropped)

    def update(state: SVGState, sample: Sampler, key: jax.Array, step: jax.Array):
        """`utd` single-step updates, then `model_updates` dynamics steps on sequences (the paper's Algorithm 1),
        every draw normalised with the statistics as they stand."""
        k_batch, k_steps, k_sequences = jax.random.split(key, 3)
        entropy_target = target_entropy(step)
        use_model = step >= cfg.model_actor_start
        batches = normalised(state, sample(k_batch, (cfg.utd, cfg.batch_size)))
        state, metrics = jax.lax.scan(lambda s, x: gradient_step(s, *x, entropy_target, use_model), state,
                                      (batches, jax.random.split(k_steps, cfg.utd)))
        metrics = summarise(metrics)
        if cfg.horizon > 0:
            sequences = normalised(state, sample(k_sequences, (cfg.model_updates, cfg.model_batch_size),
                                                 length=cfg.horizon))
            state, (obs_mse, dropped) = jax.lax.scan(dynamics_step, state, sequences)
            metrics["model/obs_mse"] = jnp.mean(obs_mse)
            metrics[DROPPED] = metrics[DROPPED] + count(dropped)
        else:
            metrics["model/obs_mse"] = jnp.zeros(())
        metrics["target_entropy"] = entropy_target
        return state, metrics

    def reset(state: SVGState, key: jax.Array) -> SVGState:
        """As MBPO's: actor, critics, target critics and temperature start afresh; the model, the reward net and
        the observation statistics are kept."""
        return state.replace(sac=init_sac(key))

    # The trainer's diagnostics read SAC's critic, on real transitions in the networks' units.
    rows_drawn = max(cfg.batch_size, cfg.model_batch_size) if cfg.horizon else cfg.batch_size
    return Agent(name="svg", config=cfg, init=init,
                 act=lambda state, obs, key, explore: sac.act(nets, state.sac.actor, normalise(state, obs), key,
                                                              explore),
                 update=update, batch_size=rows_drawn, metric_names=sac.METRICS + MODEL_METRICS, gamma=cfg.gamma,
                 target_action=lambda state, obs, key: sac.sample_action(nets, state.sac.actor,
                                                                         normalise(state, obs), key)[0],
                 value=lambda state, obs, key: sac.value(nets, state.sac, normalise(state, obs)),
                 td_error=lambda state, batch, key: sac.td_error(nets, state.sac, normalised(state, batch), key),
                 reset=reset, observe=observe if cfg.obs_norm else None,
                 extras={"dynamics_net": dynamics_net, "reward_net": reward_net, "predict_reward": predict_reward,
                         "zero_hidden": zero_hidden, "unroll": unroll, "dynamics_loss": dynamics_loss,
                         "reward_loss": reward_loss, "actor_loss": actor_loss, "target_entropy": target_entropy,
                         "gradient_step": gradient_step, "dynamics_step": dynamics_step, "nets": nets,
                         "normalise": normalise})
