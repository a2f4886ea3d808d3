"""MBPO (Janner et al.), the one-step version of the "Dyna limits" paper (its Tables 1 and 2, and
../shared/spec/baselines.md): SAC whose minibatches are 95% transitions imagined by an ensemble of probabilistic
dynamics models. Read top to bottom: config, the ensemble, the model buffer, init, then one agent step's update
(retrain the ensemble on schedule, branch one-step rollouts into the model buffer, SAC steps on mixed batches).

The SAC part is vecrl.agents.sac itself (its networks, losses and gradient step), fed other minibatches.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from vecrl.agents.base import Agent, Batch, Sampler
from vecrl.agents.sac import SACConfig, SACState, make_sac
from vecrl.networks import MLP


@dataclasses.dataclass(frozen=True)
class MBPOConfig:
    # -- the SAC part: the same fields and defaults as SACConfig (the paper's Table 1); see vecrl/agents/sac.py
    hidden: int = SACConfig.hidden
    gamma: float = SACConfig.gamma
    tau: float = SACConfig.tau
    lr: float = SACConfig.lr
    adam_eps: float = SACConfig.adam_eps
    batch_size: int = SACConfig.batch_size  # SAC minibatch rows, model and real together
    utd: int = SACConfig.utd
    init_temperature: float = SACConfig.init_temperature
    target_entropy_scale: float = SACConfig.target_entropy_scale
    log_std_min: float = SACConfig.log_std_min
    log_std_max: float = SACConfig.log_std_max
    # -- the ensemble (Table 2)
    ensemble_size: int = 7
    elites: int = 5  # members that generate rollouts: the best on a validation draw by MSE
    model_hidden: int = 200  # two hidden Swish layers
    model_lr: float = 3e-4
    model_adam_eps: float = 1.5e-4
    model_batch_size: int = 256  # rows per member per model gradient step
    retrain_every: int = 250  # agent steps; retraining continues from the current weights, as MBPO's reference
    # Model gradient steps per retrain. MBPO's reference trains until its held-out loss stops improving (at least
    # five epochs over all data), a data-dependent length a compiled program cannot have. 1,000 steps of 256 rows
    # per member are 25 epochs of the 10,000 warm-up transitions at the first retrain; later retrains continue from
    # the current weights, 4 model steps per agent step overall (2M per 500k-step run), next to SAC's 20.
    model_train_steps: int = 1000
    # Real transitions drawn once per retrain, apart from the training minibatches: their inputs give the
    # normaliser's statistics and their prediction errors rank the members (MBPO's reference holds out
    # min(20%, 5,000) transitions; the agent sees the replay only through uniform draws, see `retrain`).
    model_validation_rows: int = 5000
    # The usual soft bounds of a probabilistic ensemble's log-variance (learned per member and output, initial
    # values of MBPO's reference), and the penalty pulling them together: the reference's 0.01 on a loss without
    # the 1/2 of the Gaussian NLL used here.
    logvar_max_init: float = 0.5
    logvar_min_init: float = -10.0
    logvar_bound_penalty: float = 0.005
    # -- using the model (Table 2; model horizon 1)
    rollouts: int = 400  # one-step rollouts branched from real states per agent step
    # MBPO's reference keeps one epoch (1,000 environment steps) of rollouts: 100,000 per retrain interval of 250
    # steps, so 4 intervals: 400 x 1,000 transitions, the oldest overwritten first.
    model_capacity: int = 400_000
    synthetic_ratio: float = 0.95  # fraction of each SAC minibatch drawn from the model buffer

    def sac_config(self) -> SACConfig:
        return SACConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SACConfig)})

    @property
    def model_rows(self) -> int:
        """Rows of each SAC minibatch that come from the model buffer: int(synthetic_ratio * batch_size)."""
        return int(self.synthetic_ratio * self.batch_size)

    def validate(self) -> None:
        try:
            self.sac_config().validate()
        except ValueError as e:  # SAC's own rules, reported under this section's name
            raise ValueError(str(e).replace("sac.", "mbpo.")) from None
        positive = ("ensemble_size", "elites", "model_hidden", "model_batch_size", "retrain_every",
                    "model_train_steps", "model_validation_rows", "rollouts", "model_capacity")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"mbpo.{name} must be a positive integer, got {value!r}")
        if self.elites > self.ensemble_size:
            raise ValueError(f"mbpo.elites ({self.elites}) cannot exceed mbpo.ensemble_size ({self.ensemble_size})")
        if self.model_capacity < self.rollouts:
            raise ValueError(f"mbpo.model_capacity ({self.model_capacity}) must hold one agent step's "
                             f"mbpo.rollouts ({self.rollouts})")
        if not 0.0 <= self.synthetic_ratio <= 1.0:
            raise ValueError(f"mbpo.synthetic_ratio must be in [0, 1], got {self.synthetic_ratio}")
        for name in ("model_lr", "model_adam_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"mbpo.{name} must be > 0, got {getattr(self, name)}")
        if not self.logvar_bound_penalty >= 0:
            raise ValueError(f"mbpo.logvar_bound_penalty must be >= 0, got {self.logvar_bound_penalty}")
        if not self.logvar_min_init < self.logvar_max_init:
            raise ValueError("mbpo.logvar_min_init must be below mbpo.logvar_max_init")


# ------------------------------------------------------------------------------------------------ the ensemble
class GaussianDynamics(nn.Module):
    """One member: a diagonal Gaussian over `out` values (next_obs - obs, then reward) from normalised
    concat(obs, action). The log-variance is squashed softly below a learned upper and above a learned lower bound,
    so that it neither explodes on unseen inputs nor collapses on seen ones."""

    hidden: int
    out: int
    logvar_max_init: float
    logvar_min_init: float

    @nn.compact
    def __call__(self, x):
        h = MLP((self.hidden, self.hidden), 2 * self.out, layer_norm=False, activation=jax.nn.swish, name="mlp")(x)
        mean, raw_logvar = jnp.split(h, 2, axis=-1)
        max_logvar = self.param("max_logvar", nn.initializers.constant(self.logvar_max_init), (self.out,))
        min_logvar = self.param("min_logvar", nn.initializers.constant(self.logvar_min_init), (self.out,))
        logvar = max_logvar - jax.nn.softplus(max_logvar - raw_logvar)
        logvar = min_logvar + jax.nn.softplus(logvar - min_logvar)
        return mean, logvar


@struct.dataclass
class Normaliser:
    """Per-feature statistics of the model's inputs concat(obs, action), refitted at each retrain."""

    mean: jax.Array
    std: jax.Array

    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        return (jnp.concatenate([obs, action], axis=-1) - self.mean) / self.std


def fit_normaliser(obs: jax.Array, action: jax.Array) -> Normaliser:
    x = jnp.concatenate([obs, action], axis=-1)
    std = jnp.std(x, axis=0)
    # A feature that does not vary (e.g. a constant observation) is only centred, not blown up.
    return Normaliser(mean=jnp.mean(x, axis=0), std=jnp.where(std < 1e-6, 1.0, std))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `x` over the rows with mask 1 (an episode's last row has no stored next observation)."""
    return jnp.sum(mask * x) / jnp.maximum(jnp.sum(mask), 1.0)


def gaussian_nll(mean: jax.Array, logvar: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Negative log-likelihood of `target` [N, D] under N(mean, exp(logvar)), per dimension, over valid rows."""
    per_row = 0.5 * jnp.mean((target - mean) ** 2 * jnp.exp(-logvar) + logvar + jnp.log(2 * jnp.pi), axis=-1)
    return masked_mean(per_row, mask)


def model_target(batch: Batch) -> jax.Array:
    """What the ensemble predicts: [next_obs - obs, reward]."""
    return jnp.concatenate([batch["next_obs"] - batch["obs"], batch["reward"][..., None]], axis=-1)


# ------------------------------------------------------------------------------------------------ model buffer
@struct.dataclass
class ModelBuffer:
    """A ring of imagined transitions. Slots fill from 0 and the ring wraps only once full, so the filled slots
    are always [0, size)."""

    obs: jax.Array  # [C, obs]
    action: jax.Array  # [C, act]
    reward: jax.Array  # [C]
    next_obs: jax.Array  # [C, obs]
    next_slot: jax.Array  # int32: where the next row goes
    size: jax.Array  # int32: rows filled, at most C

    @property
    def capacity(self) -> int:
        return self.obs.shape[0]


def model_buffer_init(capacity: int, observation_size: int, action_size: int) -> ModelBuffer:
    zero = jnp.zeros((), jnp.int32)
    return ModelBuffer(obs=jnp.zeros((capacity, observation_size)), action=jnp.zeros((capacity, action_size)),
                       reward=jnp.zeros((capacity,)), next_obs=jnp.zeros((capacity, observation_size)),
                       next_slot=zero, size=zero)


def model_buffer_add(buf: ModelBuffer, rows: Batch) -> ModelBuffer:
    """Write `rows` (obs, action, reward, next_obs with a leading axis n <= capacity) after the newest rows,
    overwriting the oldest once full."""
    n, c = rows["reward"].shape[0], buf.capacity
    slots = (buf.next_slot + jnp.arange(n)) % c
    return buf.replace(obs=buf.obs.at[slots].set(rows["obs"]), action=buf.action.at[slots].set(rows["action"]),
                       reward=buf.reward.at[slots].set(rows["reward"]),
                       next_obs=buf.next_obs.at[slots].set(rows["next_obs"]),
                       next_slot=(buf.next_slot + n) % c, size=jnp.minimum(buf.size + n, c))


def model_buffer_sample(buf: ModelBuffer, key: jax.Array, shape: tuple[int, ...]) -> Batch:
    """Uniform with replacement over the filled rows. DMC tasks never terminate, so every imagined transition
    bootstraps (mask 1)."""
    i = jax.random.randint(key, shape, 0, jnp.maximum(buf.size, 1))
    return {"obs": buf.obs[i], "action": buf.action[i], "reward": buf.reward[i], "next_obs": buf.next_obs[i],
            "mask": jnp.ones(shape)}


# ------------------------------------------------------------------------------------------------ state
@struct.dataclass
class MBPOState:
    sac: SACState
    model: dict  # the ensemble's parameters, stacked on a leading [ensemble_size] axis
    opt_model: optax.OptState
    normaliser: Normaliser
    elites: jax.Array  # int32 [elites]: members that generate rollouts
    model_buffer: ModelBuffer
    # The last retrain's validation NLL and MSE, averaged over its elites: reported on every agent step.
    model_nll: jax.Array
    model_mse_elites: jax.Array


MODEL_METRICS = ("model/nll", "model/mse_elites", "model/buffer_size")


def make_mbpo(cfg: MBPOConfig, observation_size: int, action_size: int) -> Agent:
    """MBPO for one (observation_size, action_size), as pure functions closed over static config."""
    cfg.validate()
    sac = make_sac(cfg.sac_config(), observation_size, action_size)
    sac_sample, sac_gradient_step = sac.extras["sample"], sac.extras["gradient_step"]
    model_net = GaussianDynamics(cfg.model_hidden, observation_size + 1, cfg.logvar_max_init, cfg.logvar_min_init)
    model_optimizer = optax.adam(cfg.model_lr, eps=cfg.model_adam_eps)
    real_rows = cfg.batch_size - cfg.model_rows

    # -- the ensemble: one member's functions, vmapped over the stacked parameters
    def predict(member: dict, normaliser: Normaliser, obs: jax.Array, action: jax.Array):
        return model_net.apply(member, normaliser(obs, action))

    def ensemble_predict(models: dict, normaliser: Normaliser, obs: jax.Array, action: jax.Array):
        """Every member on the same rows: mean and log-variance [ensemble_size, ..., obs + 1]."""
        return jax.vmap(predict, in_axes=(0, None, None, None))(models, normaliser, obs, action)

    def member_loss(member: dict, normaliser: Normaliser, batch: Batch) -> jax.Array:
        mean, logvar = predict(member, normaliser, batch["obs"], batch["action"])
        bounds = member["params"]["max_logvar"].sum() - member["params"]["min_logvar"].sum()
        return gaussian_nll(mean, logvar, model_target(batch), batch["mask"]) + cfg.logvar_bound_penalty * bounds

    def ensemble_loss(models: dict, normaliser: Normaliser, batches: Batch) -> jax.Array:
        """Members' losses on their own minibatches ([ensemble_size, rows] leading axes), summed: each member's
        gradient is its own loss's."""
        return jnp.sum(jax.vmap(member_loss, in_axes=(0, None, 0))(models, normaliser, batches))

    def member_errors(models: dict, normaliser: Normaliser, batch: Batch):
        """Each member's MSE of its mean, and its NLL, on the same rows: two [ensemble_size] arrays."""
        mean, logvar = ensemble_predict(models, normaliser, batch["obs"], batch["action"])
        target, mask = model_target(batch), batch["mask"]
        mse = jax.vmap(lambda m: masked_mean(jnp.mean((target - m) ** 2, axis=-1), mask))(mean)
        nll = jax.vmap(lambda m, lv: gaussian_nll(m, lv, target, mask))(mean, logvar)
        return mse, nll

    def select_elites(mse: jax.Array) -> jax.Array:
        """Indices of the `elites` members with the lowest error, best first."""
        return jax.lax.top_k(-mse, cfg.elites)[1]

    def init(key: jax.Array) -> MBPOState:
        k_sac, k_model = jax.random.split(key)
        x = jnp.zeros((observation_size + action_size,))
        models = jax.vmap(model_net.init, in_axes=(0, None))(jax.random.split(k_model, cfg.ensemble_size), x)
        return MBPOState(sac=sac.init(k_sac), model=models, opt_model=model_optimizer.init(models),
                         normaliser=Normaliser(mean=jnp.zeros_like(x), std=jnp.ones_like(x)),
                         elites=jnp.arange(cfg.elites, dtype=jnp.int32),
                         model_buffer=model_buffer_init(cfg.model_capacity, observation_size, action_size),
                         model_nll=jnp.zeros(()), model_mse_elites=jnp.zeros(()))

    def act(state: MBPOState, obs: jax.Array, key: jax.Array, explore: bool) -> jax.Array:
        return sac.act(state.sac, obs, key, explore)

    # -- one agent step's learning
    def retrain(state: MBPOState, sample: Sampler, key: jax.Array) -> MBPOState:
        """Refit the normaliser, train every member for `model_train_steps` steps on minibatches of its own, then
        rank the members on the validation draw. That draw comes from the same replay as the training rows (the
        agent has no held-out split of its own), so the ranking measures fit more than generalisation; with
        independent minibatches each member still sees a different sample of it."""
        k_validation, k_train = jax.random.split(key)
        validation = sample(k_validation, (cfg.model_validation_rows,))
        normaliser = fit_normaliser(validation["obs"], validation["action"])

        def train_step(carry, k):
            models, opt_state = carry
            batches = sample(k, (cfg.ensemble_size, cfg.model_batch_size))
            grads = jax.grad(ensemble_loss)(models, normaliser, batches)
            updates, opt_state = model_optimizer.update(grads, opt_state, models)
            return (optax.apply_updates(models, updates), opt_state), None

        (models, opt_model), _ = jax.lax.scan(train_step, (state.model, state.opt_model),
                                              jax.random.split(k_train, cfg.model_train_steps))
        mse, nll = member_errors(models, normaliser, validation)
        elites = select_elites(mse)
        return state.replace(model=models, opt_model=opt_model, normaliser=normaliser, elites=elites,
                             model_nll=jnp.mean(nll[elites]), model_mse_elites=jnp.mean(mse[elites]))

    def branch_rollouts(state: MBPOState, sample: Sampler, key: jax.Array) -> Batch:
        """`rollouts` one-step rollouts from real replay states: the current policy's sampled action, then a
        sample from the Gaussian of an elite drawn per rollout."""
        k_start, k_action, k_member, k_noise = jax.random.split(key, 4)
        obs = sample(k_start, (cfg.rollouts,))["obs"]
        action, _ = sac_sample(state.sac.actor, obs, k_action)
        mean, logvar = ensemble_predict(state.model, state.normaliser, obs, action)  # [ensemble, rollouts, obs + 1]
        member = state.elites[jax.random.randint(k_member, (cfg.rollouts,), 0, cfg.elites)]
        rows = jnp.arange(cfg.rollouts)
        mean, logvar = mean[member, rows], logvar[member, rows]
        out = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_noise, mean.shape)
        return {"obs": obs, "action": action, "reward": out[:, -1], "next_obs": obs + out[:, :-1]}

    def mixed_batches(state: MBPOState, sample: Sampler, key: jax.Array) -> Batch:
        """`utd` SAC minibatches [utd, batch_size]: model_rows imagined rows first, then real ones."""
        k_model, k_real = jax.random.split(key)
        imagined = model_buffer_sample(state.model_buffer, k_model, (cfg.utd, cfg.model_rows))
        real = sample(k_real, (cfg.utd, real_rows))
        return {k: jnp.concatenate([imagined[k], real[k]], axis=1) for k in imagined}

    def update(state: MBPOState, sample: Sampler, key: jax.Array, step: jax.Array):
        k_retrain, k_rollout, k_batch, k_sac = jax.random.split(key, 4)
        # `step` is the same for every seed, so this stays a real branch under the trainer's vmap: the model
        # trains only on retrain steps. The trainer's first update is at step train.warmup_steps, a multiple of
        # retrain_every (checked by the spec), so rollouts never come from an untrained ensemble.
        state = jax.lax.cond(step % cfg.retrain_every == 0, lambda s: retrain(s, sample, k_retrain), lambda s: s,
                             state)
        state = state.replace(model_buffer=model_buffer_add(state.model_buffer,
                                                            branch_rollouts(state, sample, k_rollout)))
        batches = mixed_batches(state, sample, k_batch)
        sac_state, metrics = jax.lax.scan(sac_gradient_step, state.sac, (batches, jax.random.split(k_sac, cfg.utd)))
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics.update({"model/nll": state.model_nll, "model/mse_elites": state.model_mse_elites,
                        "model/buffer_size": state.model_buffer.size.astype(jnp.float32)})
        return state.replace(sac=sac_state), metrics

    # -- what the trainer's diagnostics read: SAC's critic, on real transitions
    def target_action(state: MBPOState, obs: jax.Array, key: jax.Array) -> jax.Array:
        return sac.target_action(state.sac, obs, key)

    def value(state: MBPOState, obs: jax.Array, key: jax.Array) -> jax.Array:
        return sac.value(state.sac, obs, key)

    def td_error(state: MBPOState, batch: Batch, key: jax.Array) -> jax.Array:
        return sac.td_error(state.sac, batch, key)

    def reset(state: MBPOState, key: jax.Array) -> MBPOState:
        """The "Dyna limits" paper's resets (its Section 5): actor, critics, target critics and temperature start
        afresh; the ensemble, its normaliser and the model buffer are kept."""
        return state.replace(sac=sac.init(key))

    return Agent(name="mbpo", config=cfg, init=init, act=act, update=update, batch_size=cfg.batch_size,
                 metric_names=sac.metric_names + MODEL_METRICS, gamma=cfg.gamma, target_action=target_action,
                 value=value, td_error=td_error, reset=reset,
                 extras={"model_net": model_net, "predict": predict, "ensemble_predict": ensemble_predict,
                         "member_loss": member_loss, "member_errors": member_errors, "select_elites": select_elites,
                         "retrain": retrain, "branch_rollouts": branch_rollouts, "mixed_batches": mixed_batches})
