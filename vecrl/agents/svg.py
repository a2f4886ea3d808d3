"""SAC-SVG(H) (Amos et al., "On the model-based stochastic value gradient for continuous reinforcement learning";
../shared/spec/baselines.md): SAC whose actor ascends an H-step value expansion through a learned deterministic
dynamics model and reward net, ending in SAC's critic, while the critic and the temperature learn as SAC's on
real transitions. Read top to bottom: config, the model, init, the losses, then one agent step's update.

The SAC part is vecrl.agents.sac itself (its networks, action sampling, critic step and losses, temperature loss);
this module adds the model, the value-expansion actor loss, the target-entropy schedule, and the temperature's
own learning rate (the paper's Table 3 gives it 5e-4, its actor and critic 1e-4).

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

from vecrl.agents.base import Agent, Batch, Sampler
from vecrl.agents.mbpo import masked_mean
from vecrl.agents.sac import SACConfig, SACState, make_sac, temperature_loss
from vecrl.networks import MLP


@dataclasses.dataclass(frozen=True)
class SVGConfig:
    # -- the SAC part: SACConfig's fields (see vecrl/agents/sac.py) with the paper's values (its Table 3)
    hidden: int = 512  # two hidden ReLU layers in actor and critics
    gamma: float = 0.99
    tau: float = 0.005  # target <- (1 - tau) * target + tau * online after every critic update
    lr: float = 1e-4  # actor and critics
    # The paper's optimisers are PyTorch's Adam with its defaults (its table gives no epsilon).
    adam_eps: float = 1e-8
    batch_size: int = 512  # rows of each single-step minibatch: critic, actor, temperature and reward net
    utd: int = 1  # single-step gradient steps per agent step (the table's N_step)
    init_temperature: float = 0.1
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    temperature_lr: float = 5e-4
    # -- the target entropy, decayed as the paper's eq. 14 (its App. A.1) over agent steps t:
    # (init - final) * (1 - min(t, T) / T) ** decay + final. The paper tunes the three per task (its Table 4);
    # unset, init is SAC's usual -action_size and final equals init (a fixed target).
    target_entropy_init: float | None = None
    target_entropy_final: float | None = None
    target_entropy_decay: float = 0.0  # beta; 0 keeps the target at init
    target_entropy_steps: int = 1_000_000  # T: set it to the run's train.steps
    # -- the model (the paper's Sec. 4.2 and Table 3)
    horizon: int = 2  # H model steps in the actor's value expansion (the paper fixes 2 on its MBPO tasks); 0 is SAC
    model_hidden: int = 512  # encoder, decoder and reward MLPs (two hidden layers each) and each GRU layer
    gru_layers: int = 2
    model_lr: float = 1e-3  # dynamics and reward net
    model_batch_size: int = 1024  # sequences of `horizon` transitions per dynamics step
    model_updates: int = 4  # dynamics steps per agent step (the table's N_seq)
    # Not in the paper: the agent step from which the actor's objective goes through the model; before it, the
    # actor takes SAC's steps while the model trains (the authors' code's `warmup_steps`, 10,000 in some of its
    # task configs). 0 uses the model from the first update, as the paper's Algorithm 1.
    model_actor_start: int = 0

    def sac_config(self) -> SACConfig:
        """The SAC part; its own temperature settings (one learning rate for all, a fixed target) go unused."""
        shared = ("hidden", "gamma", "tau", "lr", "adam_eps", "batch_size", "utd", "init_temperature",
                  "log_std_min", "log_std_max")
        return SACConfig(**{name: getattr(self, name) for name in shared})

    def validate(self) -> None:
        try:
            self.sac_config().validate()
        except ValueError as e:  # SAC's own rules, reported under this section's name
            raise ValueError(str(e).replace("sac.", "svg.")) from None
        for name in ("model_hidden", "gru_layers", "model_batch_size", "model_updates", "target_entropy_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"svg.{name} must be a positive integer, got {value!r}")
        for name in ("horizon", "model_actor_start"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"svg.{name} must be a non-negative integer, got {value!r}")
        for name in ("temperature_lr", "model_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"svg.{name} must be > 0, got {getattr(self, name)}")
        if not self.target_entropy_decay >= 0:
            raise ValueError(f"svg.target_entropy_decay (beta) must be >= 0, got {self.target_entropy_decay}: a "
                             "negative power of (1 - t/T) grows without bound as t reaches T")
        for name in ("target_entropy_init", "target_entropy_final"):
            value = getattr(self, name)
            if value is not None and not abs(value) < float("inf"):
                raise ValueError(f"svg.{name} must be a finite number or unset, got {value}")


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


MODEL_METRICS = ("target_entropy", "model/obs_mse", "model/reward_mse")


def make_svg(cfg: SVGConfig, observation_size: int, action_size: int) -> Agent:
    """SAC-SVG(H) for one (observation_size, action_size), as pure functions closed over static config."""
    cfg.validate()
    sac = make_sac(cfg.sac_config(), observation_size, action_size)
    sac_sample, sac_critic_step = sac.extras["sample"], sac.extras["critic_step"]
    sac_actor_loss, critic_net = sac.extras["actor_loss"], sac.extras["critic_net"]
    dynamics_net = RecurrentDynamics(cfg.model_hidden, cfg.gru_layers, observation_size)
    reward_net = MLP((cfg.model_hidden, cfg.model_hidden), 1, layer_norm=False, activation=jax.nn.relu)
    actor_optimizer = optax.adam(cfg.lr, eps=cfg.adam_eps)  # SAC's actor and critic optimiser, the same settings
    temperature_optimizer = optax.adam(cfg.temperature_lr, eps=cfg.adam_eps)
    model_optimizer = optax.adam(cfg.model_lr, eps=cfg.adam_eps)
    entropy_init = -float(action_size) if cfg.target_entropy_init is None else cfg.target_entropy_init
    entropy_final = entropy_init if cfg.target_entropy_final is None else cfg.target_entropy_final

    def target_entropy(step: jax.Array) -> jax.Array:
        return target_entropy_schedule(step, entropy_init, entropy_final, cfg.target_entropy_decay,
                                       cfg.target_entropy_steps)

    def zero_hidden(batch_shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
        """The GRU states a rollout starts from: zero, as in the paper, so that any replay state can start one."""
        return tuple(jnp.zeros((*batch_shape, cfg.model_hidden)) for _ in range(cfg.gru_layers))

    def predict_reward(params: dict, obs: jax.Array, action: jax.Array) -> jax.Array:
        return reward_net.apply(params, jnp.concatenate([obs, action], axis=-1))[..., 0]

    def unroll(dynamics: dict, obs: jax.Array, actions: jax.Array) -> jax.Array:
        """The model's predicted observations x_1..x_L [..., L, obs] from x_0 = obs [..., obs] under the given
        actions [..., L, act], each step fed the previous prediction."""
        def step(carry, action):
            hidden, x = carry
            hidden, x = dynamics_net.apply(dynamics, hidden, x, action)
            return (hidden, x), x

        _, predicted = jax.lax.scan(step, (zero_hidden(obs.shape[:-1]), obs), jnp.moveaxis(actions, -2, 0))
        return jnp.moveaxis(predicted, 0, -2)

    def init_sac(key: jax.Array) -> SACState:
        state = sac.init(key)
        return state.replace(opt_temperature=temperature_optimizer.init(state.log_temperature))

    def init(key: jax.Array) -> SVGState:
        k_sac, k_dynamics, k_reward = jax.random.split(key, 3)
        obs, action = jnp.zeros((observation_size,)), jnp.zeros((action_size,))
        dynamics = dynamics_net.init(k_dynamics, zero_hidden(()), obs, action)
        reward = reward_net.init(k_reward, jnp.concatenate([obs, action]))
        return SVGState(sac=init_sac(k_sac), dynamics=dynamics, reward=reward,
                        opt_dynamics=model_optimizer.init(dynamics), opt_reward=model_optimizer.init(reward))

    def act(state: SVGState, obs: jax.Array, key: jax.Array, explore: bool) -> jax.Array:
        return sac.act(state.sac, obs, key, explore)

    # -- losses
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
            u, logp = sac_sample(actor, x, jax.random.fold_in(key, t))
            first_logp = logp if first_logp is None else first_logp
            value = value + cfg.gamma ** t * (predict_reward(state.reward, x, u) - alpha * logp)
            hidden, x = dynamics_net.apply(state.dynamics, hidden, x, u)
        u, logp = sac_sample(actor, x, jax.random.fold_in(key, cfg.horizon))
        q = jnp.min(critic_net.apply(state.sac.critic, x, u), axis=0)
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
            return jax.value_and_grad(sac_actor_loss, has_aux=True)(state.sac.actor, state.sac, batch,
                                                                    jax.random.fold_in(key, 0))

        if cfg.horizon == 0 or cfg.model_actor_start == 0:  # the two coincide, or the model is always used
            return expansion()
        return jax.lax.cond(use_model, expansion, model_free)

    # -- one agent step's learning
    def gradient_step(state: SVGState, batch: Batch, key: jax.Array, entropy_target: jax.Array,
                      use_model: jax.Array):
        """One single-step update (the paper's Algorithm 1): SAC's critic step, the actor's step, the temperature's
        step toward the scheduled target, and the reward net's step, all on one minibatch of real transitions."""
        k_critic, k_actor = jax.random.split(key)
        sac_state, (loss_c, q_mean) = sac_critic_step(state.sac, batch, k_critic)
        state = state.replace(sac=sac_state)

        (loss_a, logp), g = actor_gradient(state, batch, k_actor, use_model)
        updates, opt_actor = actor_optimizer.update(g, sac_state.opt_actor, sac_state.actor)
        sac_state = sac_state.replace(actor=optax.apply_updates(sac_state.actor, updates), opt_actor=opt_actor)

        loss_t, g = jax.value_and_grad(temperature_loss)(sac_state.log_temperature, logp, batch["mask"],
                                                         entropy_target)
        updates, opt_t = temperature_optimizer.update(g, sac_state.opt_temperature, sac_state.log_temperature)
        sac_state = sac_state.replace(log_temperature=optax.apply_updates(sac_state.log_temperature, updates),
                                      opt_temperature=opt_t)
        state = state.replace(sac=sac_state)

        if cfg.horizon > 0:  # SAC (H = 0) never uses the reward net
            loss_r, g = jax.value_and_grad(reward_loss)(state.reward, batch)
            updates, opt_reward = model_optimizer.update(g, state.opt_reward, state.reward)
            state = state.replace(reward=optax.apply_updates(state.reward, updates), opt_reward=opt_reward)
        else:
            loss_r = jnp.zeros(())
        return state, {"loss/critic": loss_c, "loss/actor": loss_a, "loss/temperature": loss_t,
                       "temperature": jnp.exp(sac_state.log_temperature), "entropy": -jnp.mean(logp),
                       "q_mean": q_mean, "model/reward_mse": loss_r}

    def dynamics_step(state: SVGState, sequences: Batch):
        loss, g = jax.value_and_grad(dynamics_loss)(state.dynamics, sequences)
        updates, opt_dynamics = model_optimizer.update(g, state.opt_dynamics, state.dynamics)
        return state.replace(dynamics=optax.apply_updates(state.dynamics, updates), opt_dynamics=opt_dynamics), loss

    def update(state: SVGState, sample: Sampler, key: jax.Array, step: jax.Array):
        """`utd` single-step updates, then `model_updates` dynamics steps on sequences (the paper's Algorithm 1)."""
        k_batch, k_steps, k_sequences = jax.random.split(key, 3)
        entropy_target = target_entropy(step)
        use_model = step >= cfg.model_actor_start
        batches = sample(k_batch, (cfg.utd, cfg.batch_size))
        state, metrics = jax.lax.scan(lambda s, x: gradient_step(s, *x, entropy_target, use_model), state,
                                      (batches, jax.random.split(k_steps, cfg.utd)))
        metrics = jax.tree.map(jnp.mean, metrics)
        if cfg.horizon > 0:
            sequences = sample(k_sequences, (cfg.model_updates, cfg.model_batch_size), length=cfg.horizon)
            state, obs_mse = jax.lax.scan(dynamics_step, state, sequences)
            metrics["model/obs_mse"] = jnp.mean(obs_mse)
        else:
            metrics["model/obs_mse"] = jnp.zeros(())
        metrics["target_entropy"] = entropy_target
        return state, metrics

    # -- what the trainer's diagnostics read: SAC's critic, on real transitions
    def target_action(state: SVGState, obs: jax.Array, key: jax.Array) -> jax.Array:
        return sac.target_action(state.sac, obs, key)

    def value(state: SVGState, obs: jax.Array, key: jax.Array) -> jax.Array:
        return sac.value(state.sac, obs, key)

    def td_error(state: SVGState, batch: Batch, key: jax.Array) -> jax.Array:
        return sac.td_error(state.sac, batch, key)

    def reset(state: SVGState, key: jax.Array) -> SVGState:
        """As MBPO's: actor, critics, target critics and temperature start afresh; the model and reward net are
        kept."""
        return state.replace(sac=init_sac(key))

    rows_drawn = max(cfg.batch_size, cfg.model_batch_size) if cfg.horizon else cfg.batch_size
    return Agent(name="svg", config=cfg, init=init, act=act, update=update, batch_size=rows_drawn,
                 metric_names=sac.metric_names + MODEL_METRICS, gamma=cfg.gamma, target_action=target_action,
                 value=value, td_error=td_error, reset=reset,
                 extras={"dynamics_net": dynamics_net, "reward_net": reward_net, "predict_reward": predict_reward,
                         "zero_hidden": zero_hidden, "unroll": unroll, "dynamics_loss": dynamics_loss,
                         "reward_loss": reward_loss, "actor_loss": actor_loss, "target_entropy": target_entropy,
                         "gradient_step": gradient_step, "dynamics_step": dynamics_step, "sac": sac})
