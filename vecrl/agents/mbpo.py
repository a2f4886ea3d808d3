"""MBPO (Janner et al.), the one-step version of the "Dyna limits" paper, as its code (CLeARoboticsLab/STFL) ran
it (../shared/spec/baselines.md): SAC whose minibatches are 95% transitions imagined by an ensemble of
probabilistic dynamics models. Read top to bottom: config, the ensemble and its losses, the model buffer, state,
then one agent step's update (retrain the ensemble on schedule, branch one-step rollouts into the model buffer,
SAC steps on mixed batches).

The SAC part is vecrl.agents.sac's networks, losses and gradient step, fed other minibatches.

Where the paper's code and its Table 2 differ, the code is followed (it made the figures): 4 hidden layers of 200
(the table: 2), per-layer weight decay, fixed log-variance bounds, 5,000 model steps per retrain, elites ranked on
a held-out 20% of the real data, a synthetic buffer of 1e6, Adam's default epsilon, target entropy -|A|/2. Two
things differ from that code on purpose: each member trains on its own minibatches (the code meant to shuffle per
member but passes every member the same rows), and the held-out split is drawn once per retrain (the code redraws
it for each of 25 blocks of 200 steps and keeps the last block's ranking).
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
from vecrl.agents.sac import SACConfig, SACState
from vecrl.networks import MLP
from vecrl.validation import FINITE, NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_CLOSED, Rule, rule


@dataclasses.dataclass(frozen=True)
class MBPOConfig(SACConfig):
    """SACConfig's fields (the SAC part; `batch_size` counts model and real rows together) and the model's."""

    # -- the ensemble
    ensemble_size: int = rule(7, POSITIVE_INT)
    elites: int = rule(5, POSITIVE_INT)  # members that generate rollouts: the lowest held-out MSE
    model_hidden: int = rule(200, POSITIVE_INT)
    model_layers: int = rule(4, POSITIVE_INT)  # hidden Swish layers (the paper's Table 2 says 2; its code has 4)
    # L2 penalty 0.5 * c * |W|^2 on each layer's kernel, hidden layers first, the output layer last (the code's
    # values for its 4 + 1 layers). As many as model_layers + 1.
    model_weight_decay: tuple[float, ...] = rule((2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4), None)
    # The predicted log-variance is squashed softly into these fixed bounds (not learned, as in the code).
    logvar_max: float = rule(0.5, FINITE)
    logvar_min: float = rule(-10.0, FINITE)
    model_lr: float = rule(3e-4, POSITIVE)
    model_adam_eps: float = rule(1e-8, POSITIVE)
    model_batch_size: int = rule(256, POSITIVE_INT)  # rows per member per model gradient step
    retrain_every: int = rule(250, POSITIVE_INT)  # agent steps; retraining continues from the current weights
    # Model gradient steps per retrain: the code's 25 x 200, i.e. 20 per agent step at retrain_every 250.
    model_train_steps: int = rule(5000, POSITIVE_INT)
    # At each retrain, every `model_holdout_every`-th real transition (from a random offset) is held out of the
    # model's training and ranks the members (the code holds out a random 20%); `model_validation_rows` are drawn
    # from the held-out part to rank them (the code draws 50,000 with replacement), and as many from the rest fit
    # the input normaliser (the code: all of the rest).
    model_holdout_every: int = rule(5, Rule(lambda v: POSITIVE_INT.holds(v) and v >= 2,
                                            ">= 2 (an integer: every n-th real transition is held out)"))
    model_validation_rows: int = rule(50_000, POSITIVE_INT)
    # -- using the model (model horizon 1)
    rollouts: int = rule(400, POSITIVE_INT)  # one-step rollouts branched from real states per agent step
    model_capacity: int = rule(1_000_000, POSITIVE_INT)  # the synthetic buffer, oldest overwritten first
    synthetic_ratio: float = rule(0.95, UNIT_CLOSED)  # fraction of each SAC minibatch drawn from the model buffer

    @property
    def model_rows(self) -> int:
        """Rows of each SAC minibatch that come from the model buffer: int(synthetic_ratio * batch_size), as the
        code counts them (243 of 256)."""
        return int(self.synthetic_ratio * self.batch_size)

    def relations(self, section: str):
        yield from super().relations(section)
        if len(self.model_weight_decay) != self.model_layers + 1 or not all(
                NON_NEGATIVE.holds(c) for c in self.model_weight_decay):
            yield (f"{section}.model_weight_decay must list model_layers + 1 = {self.model_layers + 1} coefficients "
                   f">= 0 (hidden layers, then the output layer), got {list(self.model_weight_decay)}")
        if self.elites > self.ensemble_size:
            yield f"{section}.elites ({self.elites}) cannot exceed {section}.ensemble_size ({self.ensemble_size})"
        if self.model_capacity < self.rollouts:
            yield (f"{section}.model_capacity ({self.model_capacity}) must hold one agent step's {section}.rollouts "
                   f"({self.rollouts})")
        if not self.logvar_min < self.logvar_max:
            yield f"{section}.logvar_min ({self.logvar_min}) must be below {section}.logvar_max ({self.logvar_max})"


# ------------------------------------------------------------------------------------------------ the ensemble
class GaussianDynamics(nn.Module):
    """One member: a diagonal Gaussian over `out` values (next_obs - obs, then reward) from normalised
    concat(obs, action). The log-variance is squashed softly below `logvar_max` and above `logvar_min`, so that it
    neither explodes on unseen inputs nor collapses on seen ones."""

    hidden: int
    layers: int
    out: int
    logvar_max: float
    logvar_min: float

    @nn.compact
    def __call__(self, x):
        h = MLP((self.hidden,) * self.layers, 2 * self.out, layer_norm=False, activation=jax.nn.swish,
                name="mlp")(x)
        mean, raw_logvar = jnp.split(h, 2, axis=-1)
        logvar = self.logvar_max - jax.nn.softplus(self.logvar_max - raw_logvar)
        return mean, self.logvar_min + jax.nn.softplus(logvar - self.logvar_min)


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
    """The code's Gaussian negative log-likelihood of `target` [N, D] under N(mean, exp(logvar)): the mean over
    dimensions of err^2 / var + log var (twice the NLL less its constant), over valid rows."""
    per_row = jnp.mean((target - mean) ** 2 * jnp.exp(-logvar) + logvar, axis=-1)
    return masked_mean(per_row, mask)


def weight_decay(member: dict, coefficients: tuple[float, ...]) -> jax.Array:
    """sum over layers of 0.5 * c * |kernel|^2 (biases are not decayed)."""
    mlp = member["params"]["mlp"]
    return sum(0.5 * c * jnp.sum(mlp[f"Dense_{i}"]["kernel"] ** 2) for i, c in enumerate(coefficients))


def model_target(batch: Batch) -> jax.Array:
    """What the ensemble predicts: [next_obs - obs, reward]."""
    return jnp.concatenate([batch["next_obs"] - batch["obs"], batch["reward"][..., None]], axis=-1)


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """What the ensemble's functions need besides parameters."""

    cfg: MBPOConfig
    net: GaussianDynamics


def make_ensemble(cfg: MBPOConfig, observation_size: int) -> Ensemble:
    return Ensemble(cfg=cfg, net=GaussianDynamics(cfg.model_hidden, cfg.model_layers, observation_size + 1,
                                                  cfg.logvar_max, cfg.logvar_min))


def predict(ens: Ensemble, member: dict, normaliser: Normaliser, obs: jax.Array, action: jax.Array):
    return ens.net.apply(member, normaliser(obs, action))


def ensemble_predict(ens: Ensemble, models: dict, normaliser: Normaliser, obs: jax.Array, action: jax.Array):
    """Every member on the same rows: mean and log-variance [ensemble_size, ..., obs + 1]."""
    return jax.vmap(predict, in_axes=(None, 0, None, None, None))(ens, models, normaliser, obs, action)


def member_loss(member: dict, ens: Ensemble, normaliser: Normaliser, batch: Batch) -> jax.Array:
    mean, logvar = predict(ens, member, normaliser, batch["obs"], batch["action"])
    return (gaussian_nll(mean, logvar, model_target(batch), batch["mask"])
            + weight_decay(member, ens.cfg.model_weight_decay))


def ensemble_loss(models: dict, ens: Ensemble, normaliser: Normaliser, batches: Batch) -> jax.Array:
    """Members' losses on their own minibatches ([ensemble_size, rows] leading axes), summed: each member's
    gradient is its own loss's."""
    return jnp.sum(jax.vmap(member_loss, in_axes=(0, None, None, 0))(models, ens, normaliser, batches))


def member_errors(ens: Ensemble, models: dict, normaliser: Normaliser, batch: Batch):
    """Each member's MSE of its mean (over all predicted values), and its NLL, on the same rows: two
    [ensemble_size] arrays."""
    mean, logvar = ensemble_predict(ens, models, normaliser, batch["obs"], batch["action"])
    target, mask = model_target(batch), batch["mask"]
    mse = jax.vmap(lambda m: masked_mean(jnp.mean((target - m) ** 2, axis=-1), mask))(mean)
    nll = jax.vmap(lambda m, lv: gaussian_nll(m, lv, target, mask))(mean, logvar)
    return mse, nll


def select_elites(mse: jax.Array, elites: int) -> jax.Array:
    """Indices of the `elites` members with the lowest error, best first."""
    return jax.lax.top_k(-mse, elites)[1]


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
    # The last retrain's held-out NLL and MSE, averaged over its elites: reported on every agent step.
    model_nll: jax.Array
    model_mse_elites: jax.Array


MODEL_METRICS = ("model/nll", "model/mse_elites", "model/buffer_size")


def make_mbpo(cfg: MBPOConfig, observation_size: int, action_size: int) -> Agent:
    """MBPO for one (observation_size, action_size), as pure functions closed over static config."""
    nets = sac.sac_networks(cfg, action_size)
    ens = make_ensemble(cfg, observation_size)
    model_optimizer = optax.adam(cfg.model_lr, eps=cfg.model_adam_eps)
    real_rows = cfg.batch_size - cfg.model_rows

    def init(key: jax.Array) -> MBPOState:
        k_sac, k_model = jax.random.split(key)
        x = jnp.zeros((observation_size + action_size,))
        models = jax.vmap(ens.net.init, in_axes=(0, None))(jax.random.split(k_model, cfg.ensemble_size), x)
        return MBPOState(sac=sac.init_state(nets, observation_size, k_sac), model=models,
                         opt_model=model_optimizer.init(models),
                         normaliser=Normaliser(mean=jnp.zeros_like(x), std=jnp.ones_like(x)),
                         elites=jnp.arange(cfg.elites, dtype=jnp.int32),
                         model_buffer=model_buffer_init(cfg.model_capacity, observation_size, action_size),
                         model_nll=jnp.zeros(()), model_mse_elites=jnp.zeros(()))

    # -- one agent step's learning
    def retrain(state: MBPOState, sample: Sampler, key: jax.Array) -> MBPOState:
        """Hold out every model_holdout_every-th real transition from a random offset; refit the normaliser on the
        rest and train every member on it for `model_train_steps` steps, on minibatches of its own; then rank the
        members by their MSE on the held-out part."""
        k_offset, k_validation, k_fit, k_train = jax.random.split(key, 4)
        offset = jax.random.randint(k_offset, (), 0, cfg.model_holdout_every)

        def train_rows(k, shape):
            return sample(k, shape, split=(offset, cfg.model_holdout_every, False))

        validation = sample(k_validation, (cfg.model_validation_rows,), split=(offset, cfg.model_holdout_every, True))
        fit = train_rows(k_fit, (cfg.model_validation_rows,))
        normaliser = fit_normaliser(fit["obs"], fit["action"])

        def train_step(carry, k):
            models, opt_state = carry
            grads = jax.grad(ensemble_loss)(models, ens, normaliser,
                                            train_rows(k, (cfg.ensemble_size, cfg.model_batch_size)))
            models, opt_state, dropped = guarded_step(model_optimizer, grads, opt_state, models)
            return (models, opt_state), dropped

        (models, opt_model), dropped = jax.lax.scan(train_step, (state.model, state.opt_model),
                                                    jax.random.split(k_train, cfg.model_train_steps))
        mse, nll = member_errors(ens, models, normaliser, validation)
        elites = select_elites(mse, cfg.elites)
        return state.replace(model=models, opt_model=opt_model, normaliser=normaliser, elites=elites,
                             model_nll=jnp.mean(nll[elites]), model_mse_elites=jnp.mean(mse[elites])), count(dropped)

    def branch_rollouts(state: MBPOState, sample: Sampler, key: jax.Array) -> Batch:
        """`rollouts` one-step rollouts from real replay states: the current policy's sampled action, then a
        sample from the Gaussian of an elite drawn per rollout."""
        k_start, k_action, k_member, k_noise = jax.random.split(key, 4)
        obs = sample(k_start, (cfg.rollouts,))["obs"]
        action, _ = sac.sample_action(nets, state.sac.actor, obs, k_action)
        mean, logvar = ensemble_predict(ens, state.model, state.normaliser, obs, action)  # [ensemble, rollouts, D]
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
        # The model buffer stays out of the branch, which then carries only what a retrain changes.
        fitted, dropped_model = jax.lax.cond(
            step % cfg.retrain_every == 0, lambda s: retrain(s, sample, k_retrain), lambda s: (s, jnp.zeros(())),
            state.replace(model_buffer=None))
        state = fitted.replace(model_buffer=model_buffer_add(state.model_buffer,
                                                             branch_rollouts(fitted, sample, k_rollout)))
        batches = mixed_batches(state, sample, k_batch)
        sac_state, metrics = jax.lax.scan(lambda s, x: sac.gradient_step(nets, s, *x), state.sac,
                                          (batches, jax.random.split(k_sac, cfg.utd)))
        metrics = summarise(metrics)
        metrics[DROPPED] = metrics[DROPPED] + dropped_model
        metrics.update({"model/nll": state.model_nll, "model/mse_elites": state.model_mse_elites,
                        "model/buffer_size": state.model_buffer.size.astype(jnp.float32)})
        return state.replace(sac=sac_state), metrics

    def reset(state: MBPOState, key: jax.Array) -> MBPOState:
        """The "Dyna limits" paper's resets (its Section 5): actor, critics, target critics and temperature start
        afresh; the ensemble, its normaliser and the model buffer are kept."""
        return state.replace(sac=sac.init_state(nets, observation_size, key))

    def model_error(state: MBPOState, batch: Batch) -> jax.Array:
        mse, _ = member_errors(ens, state.model, state.normaliser, batch)
        return jnp.mean(mse[state.elites])

    # The trainer's diagnostics read SAC's critic, on real transitions.
    return Agent(name="mbpo", config=cfg, init=init,
                 act=lambda state, obs, key, explore: sac.act(nets, state.sac.actor, obs, key, explore),
                 update=update, batch_size=cfg.batch_size, metric_names=sac.METRICS + MODEL_METRICS, gamma=cfg.gamma,
                 target_action=lambda state, obs, key: sac.sample_action(nets, state.sac.actor, obs, key)[0],
                 value=lambda state, obs, key: sac.value(nets, state.sac, obs),
                 td_error=lambda state, batch, key: sac.td_error(nets, state.sac, batch, key), reset=reset,
                 model_error=model_error, extras={"retrain": retrain, "branch_rollouts": branch_rollouts,
                         "mixed_batches": mixed_batches})
