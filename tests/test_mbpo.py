"""MBPO: the ensemble's loss by hand, elite selection, rollouts into the model buffer, the mixed SAC minibatch,
the retrain schedule, and one jitted update under vmap, all on a tiny agent and synthetic transitions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vecrl import config, validation
from vecrl.agents import AGENTS
from vecrl.agents.mbpo import (MBPOConfig, ensemble_predict, gaussian_nll, make_ensemble, make_mbpo, member_errors,
                               member_loss, model_buffer_add, model_target, select_elites, weight_decay)

OBS, ACT, ROWS = 3, 2, 32
D = OBS + 1  # the ensemble predicts [next_obs - obs, reward]
CFG = MBPOConfig(hidden=8, batch_size=20, utd=2, ensemble_size=7, elites=5, model_hidden=8, model_layers=2,
                 model_weight_decay=(1e-4, 2e-4, 3e-4), model_lr=1e-2, model_batch_size=8, retrain_every=5,
                 model_train_steps=50, model_validation_rows=16, rollouts=8, model_capacity=20)
ENS = make_ensemble(CFG, OBS)


def transitions(seed=0, rows=ROWS):
    """Synthetic real transitions: next_obs - obs and reward are simple functions of obs and action; one row
    ends an episode (mask 0)."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(rows, OBS))
    action = rng.uniform(-1, 1, size=(rows, ACT))
    weights = rng.normal(size=(ACT, OBS))
    mask = np.ones(rows)
    mask[5] = 0.0
    data = {"obs": obs, "action": action, "reward": action.sum(-1) + 0.5 * obs[:, 0],
            "next_obs": obs + 0.3 * action @ weights + 0.1, "mask": mask}
    return {k: jnp.asarray(v, jnp.float32) for k, v in data.items()}


def sampler(data):
    """A fake `sample(key, shape, split=None)`: uniform with replacement over `data`'s rows, as the replay draws;
    with split (offset, every, held), over the rows i with (i - offset) % every == 0 (held) or the others."""
    n = data["reward"].shape[0]

    def sample(key, shape, split=None):
        if split is None:
            i = jax.random.randint(key, shape, 0, n)
        else:
            offset, every, held = split
            part = ((jnp.arange(n) - offset) % every == 0) == held
            i = jax.random.choice(key, n, shape, p=part / jnp.sum(part))
        return jax.tree.map(lambda x: x[i], data)
    return sample


def held_rows(key, rows=ROWS):
    """Which rows a retrain with `key` holds out: its offset is drawn from the first of four keys."""
    offset = int(jax.random.randint(jax.random.split(key, 4)[0], (), 0, CFG.model_holdout_every))
    return (np.arange(rows) - offset) % CFG.model_holdout_every == 0


@pytest.fixture(scope="module")
def mbpo():
    return make_mbpo(CFG, OBS, ACT)


@pytest.fixture(scope="module")
def update(mbpo):
    """The agent's update, jitted once, on a lane of real transitions `data` (the replay's stand-in)."""
    return jax.jit(lambda state, data, key, step: mbpo.update(state, sampler(data), key, step))


def jitted_retrain(agent):
    return jax.jit(lambda state, data, key: agent.extras["retrain"](state, sampler(data), key)[0])


def with_member_means(models, means, raw_logvar=-50.0):
    """Members whose networks ignore their input: member i predicts mean means[i] on every output, and a raw
    log-variance `raw_logvar` before the soft bounds (the bounds themselves are kept)."""
    mlp = jax.tree.map(jnp.zeros_like, models["params"]["mlp"])
    bias = jnp.concatenate([jnp.broadcast_to(jnp.asarray(means, jnp.float32)[:, None], (len(means), D)),
                            jnp.full((len(means), D), raw_logvar)], axis=1)
    mlp = {**mlp, "Dense_2": {**mlp["Dense_2"], "bias": bias}}  # the output layer of model_layers = 2
    return {**models, "params": {**models["params"], "mlp": mlp}}


def member(models, i):
    return jax.tree.map(lambda x: x[i], models)


def softplus(x):
    return np.logaddexp(0.0, x)


# ------------------------------------------------------------------------------------------------ the ensemble
def test_gaussian_nll_by_hand():
    # The code's loss: mean over dimensions of err^2 / var + log var. Row 1: N(0, 1) at 1 -> 1; row 2: N(1, 4) at 3
    # -> 4 / 4 + log 4.
    mean, logvar = jnp.asarray([[0.0], [1.0]]), jnp.asarray([[0.0], [np.log(4.0)]])
    target = jnp.asarray([[1.0], [3.0]])
    expected = 0.5 * (1.0 + 1.0 + np.log(4.0))
    assert float(gaussian_nll(mean, logvar, target, jnp.asarray([1.0, 1.0]))) == pytest.approx(expected, rel=1e-6)
    # A row with mask 0 (no stored next observation) is left out of the mean.
    assert float(gaussian_nll(mean, logvar, target, jnp.asarray([1.0, 0.0]))) == pytest.approx(1.0, rel=1e-6)


def test_weight_decay_by_hand(mbpo):
    member_0 = member(mbpo.init(jax.random.key(0)).model, 0)
    mlp = member_0["params"]["mlp"]
    expected = sum(0.5 * c * np.sum(np.asarray(mlp[f"Dense_{i}"]["kernel"]) ** 2)
                   for i, c in enumerate(CFG.model_weight_decay))
    assert expected > 0 and float(weight_decay(member_0, CFG.model_weight_decay)) == pytest.approx(expected, rel=1e-5)


def test_member_loss_by_hand_with_a_zero_network(mbpo):
    """A zero network predicts mean 0 and raw log-variance 0, squashed into the fixed bounds (0.5 and -10); its
    kernels are zero, so the weight decay adds nothing."""
    state = mbpo.init(jax.random.key(0))
    models = with_member_means(state.model, np.zeros(CFG.ensemble_size), raw_logvar=0.0)
    data = transitions()
    upper = 0.5 - softplus(0.5 - 0.0)
    logvar = -10.0 + softplus(upper + 10.0)
    target = np.concatenate([np.asarray(data["next_obs"] - data["obs"]), np.asarray(data["reward"])[:, None]], 1)
    per_row = np.mean(target ** 2 * np.exp(-logvar) + logvar, axis=1)
    mask = np.asarray(data["mask"])
    nll = np.sum(mask * per_row) / mask.sum()
    assert float(member_loss(member(models, 0), ENS, state.normaliser, data)) == pytest.approx(nll, rel=1e-5)
    _, nlls = member_errors(ENS, models, state.normaliser, data)
    np.testing.assert_allclose(nlls, np.full(CFG.ensemble_size, nll), rtol=1e-5)
    np.testing.assert_allclose(model_target(data), target, rtol=1e-6)


def test_log_variance_stays_within_its_soft_bounds(mbpo):
    state = mbpo.init(jax.random.key(0))
    x = transitions()
    for raw, inside in ((1e3, lambda lv: lv <= 0.5 + 1e-3), (-1e3, lambda lv: lv >= -10.0 - 1e-3)):
        models = with_member_means(state.model, np.zeros(CFG.ensemble_size), raw_logvar=raw)
        _, logvar = ensemble_predict(ENS, models, state.normaliser, x["obs"], x["action"])
        assert logvar.shape == (CFG.ensemble_size, ROWS, D) and np.all(inside(np.asarray(logvar)))


def test_retrain_lowers_the_ensembles_error(mbpo):
    state = mbpo.init(jax.random.key(1))
    data, key = transitions(), jax.random.key(2)
    trained = jitted_retrain(mbpo)(state, data, key)
    before, _ = member_errors(ENS, state.model, trained.normaliser, data)
    after, _ = member_errors(ENS, trained.model, trained.normaliser, data)
    assert np.all(np.asarray(after) < 0.5 * np.asarray(before))
    # The normaliser was refitted on a draw of the rows not held out (the retrain's third key's).
    _, _, k_fit, _ = jax.random.split(key, 4)
    offset = int(jax.random.randint(jax.random.split(key, 4)[0], (), 0, CFG.model_holdout_every))
    fit = sampler(data)(k_fit, (CFG.model_validation_rows,), split=(offset, CFG.model_holdout_every, False))
    assert not np.any(np.isin(np.asarray(fit["reward"]), np.asarray(data["reward"])[held_rows(key)]))
    inputs = np.concatenate([np.asarray(fit["obs"]), np.asarray(fit["action"])], axis=1)
    np.testing.assert_allclose(trained.normaliser.mean, inputs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trained.normaliser.std, inputs.std(0), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ elites
MEANS = np.asarray([3.0, 0.1, 2.0, 0.5, 0.0, 4.0, 1.0])  # member i predicts MEANS[i] for every output
BEST_FIVE = [4, 1, 3, 6, 2]  # by |mean|: 0, 0.1, 0.5, 1, 2


def still_transitions(rows=ROWS):
    """Transitions with nothing to predict (next_obs = obs, reward 0): member i's MSE is MEANS[i] ** 2."""
    data = transitions(rows=rows)
    return {**data, "next_obs": data["obs"], "reward": jnp.zeros(rows)}


def test_elites_are_the_members_with_the_lowest_validation_error(mbpo):
    state = mbpo.init(jax.random.key(0))
    models = with_member_means(state.model, MEANS)
    mse, _ = member_errors(ENS, models, state.normaliser, still_transitions())
    np.testing.assert_allclose(mse, MEANS ** 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(select_elites(mse, CFG.elites), BEST_FIVE)


def test_model_error_is_the_elites_mean_squared_error(mbpo):
    state = mbpo.init(jax.random.key(0))
    state = state.replace(model=with_member_means(state.model, MEANS), elites=jnp.asarray([1, 3, 6, 6, 6]))
    expected = np.mean(MEANS[[1, 3, 6, 6, 6]] ** 2)  # still transitions: member i is off by MEANS[i] everywhere
    assert float(mbpo.model_error(state, still_transitions())) == pytest.approx(expected, rel=1e-4)


def test_retrain_keeps_the_best_members_as_elites():
    """With a vanishing learning rate the retrain leaves the members as they are, so it must pick the five with the
    lowest known errors on its held-out rows, and report their mean error."""
    agent = make_mbpo(dataclasses.replace(CFG, model_lr=1e-12), OBS, ACT)
    state = agent.init(jax.random.key(0))
    state = state.replace(model=with_member_means(state.model, MEANS), elites=jnp.asarray([0, 2, 5, 6, 3]))
    out = jitted_retrain(agent)(state, still_transitions(), jax.random.key(1))
    np.testing.assert_array_equal(out.elites, BEST_FIVE)
    assert float(out.model_mse_elites) == pytest.approx(np.mean(MEANS[BEST_FIVE] ** 2), rel=1e-4)


def test_elites_are_ranked_on_the_held_out_rows_only():
    """Rows the retrain holds out change by 2.2 in every predicted value, the others not at all: ranked on the
    held-out rows, the members closest to 2.2 win (on all rows, or on the training rows, those closest to 0 would)."""
    agent = make_mbpo(dataclasses.replace(CFG, model_lr=1e-12), OBS, ACT)
    state = agent.init(jax.random.key(0))
    state = state.replace(model=with_member_means(state.model, MEANS))
    key = jax.random.key(1)
    held = held_rows(key)
    data = still_transitions()
    change = jnp.asarray(np.where(held, 2.2, 0.0), jnp.float32)
    data = {**data, "next_obs": data["obs"] + change[:, None], "reward": change,
            "mask": jnp.ones(ROWS)}  # every row valid, so the held-out MSE is exactly (mean - 2.2)^2
    out = jitted_retrain(agent)(state, data, key)
    np.testing.assert_array_equal(out.elites, [2, 0, 6, 3, 5])  # |MEANS - 2.2|: 0.2, 0.8, 1.2, 1.7, 1.8
    assert float(out.model_mse_elites) == pytest.approx(np.mean((MEANS[[2, 0, 6, 3, 5]] - 2.2) ** 2), rel=1e-4)


# ------------------------------------------------------------------------------------------------ rollouts
def test_rollouts_come_from_real_states_through_elites(mbpo):
    state = mbpo.init(jax.random.key(3))
    # Elites 1 and 3 predict 0.1 and 0.5 with a tiny variance (log-variance at its lower bound, -10).
    state = state.replace(model=with_member_means(state.model, MEANS), elites=jnp.asarray([1, 3, 1, 3, 1]))
    data = transitions()
    rows = mbpo.extras["branch_rollouts"](state, sampler(data), jax.random.key(4))
    assert rows["obs"].shape == (8, OBS) and rows["action"].shape == (8, ACT)
    assert rows["reward"].shape == (8,) and rows["next_obs"].shape == (8, OBS)
    real_obs = np.asarray(data["obs"])
    assert all(np.any(np.all(np.isclose(o, real_obs), axis=1)) for o in np.asarray(rows["obs"]))
    assert np.all(np.abs(np.asarray(rows["action"])) <= 1.0)
    out = np.concatenate([np.asarray(rows["next_obs"] - rows["obs"]), np.asarray(rows["reward"])[:, None]], axis=1)
    # Every rollout used one elite for all its outputs: 0.1 or 0.5, never a non-elite's 0, 1, 2, 3 or 4.
    chosen = np.where(np.abs(out[:, :1] - 0.1) < 0.05, 0.1, 0.5)
    np.testing.assert_allclose(out, np.broadcast_to(chosen, out.shape), atol=0.05)


def test_model_buffer_ring_wraps_around():
    buf = make_mbpo(CFG, OBS, ACT).init(jax.random.key(0)).model_buffer
    assert buf.obs.shape == (20, OBS) and buf.action.shape == (20, ACT) and buf.reward.shape == (20,)
    for first in (0, 8, 16):  # three batches of 8 rows, numbered by their reward, into 20 slots
        n = jnp.arange(first, first + 8, dtype=jnp.float32)
        buf = model_buffer_add(buf, {"obs": jnp.broadcast_to(n[:, None], (8, OBS)), "action": jnp.zeros((8, ACT)),
                                     "reward": n, "next_obs": jnp.broadcast_to(n[:, None] + 1, (8, OBS))})
    assert int(buf.size) == 20 and int(buf.next_slot) == 4
    expected = np.concatenate([np.arange(20, 24), np.arange(4, 20)])  # rows 20..23 replaced the oldest, 0..3
    np.testing.assert_array_equal(buf.reward, expected)
    np.testing.assert_array_equal(buf.obs[:, 0], expected)
    np.testing.assert_array_equal(buf.next_obs[:, 0], expected + 1)


def test_each_update_writes_its_rollouts_into_the_model_buffer(mbpo, update):
    state = mbpo.init(jax.random.key(5))
    sizes = []
    for step in (5, 6, 7):
        state, metrics = update(state, transitions(), jax.random.key(step), jnp.int32(step))
        sizes.append((int(state.model_buffer.size), int(state.model_buffer.next_slot),
                      float(metrics["model/buffer_size"])))
    assert sizes == [(8, 8, 8.0), (16, 16, 16.0), (20, 4, 20.0)]


# ------------------------------------------------------------------------------------------------ SAC batches
def test_sac_minibatch_has_int_0_95_batch_model_rows(mbpo):
    assert CFG.model_rows == 19 and MBPOConfig().model_rows == int(0.95 * 256) == 243
    state = mbpo.init(jax.random.key(0))
    imagined = {"obs": jnp.ones((20, OBS)), "action": jnp.zeros((20, ACT)), "reward": jnp.full((20,), 7.0),
                "next_obs": jnp.ones((20, OBS))}
    state = state.replace(model_buffer=model_buffer_add(state.model_buffer, imagined))
    real = {**transitions(), "reward": jnp.full((ROWS,), -1.0)}
    batches = mbpo.extras["mixed_batches"](state, sampler(real), jax.random.key(1))
    assert batches["obs"].shape == (CFG.utd, 20, OBS) and batches["mask"].shape == (CFG.utd, 20)
    reward = np.asarray(batches["reward"])
    assert np.all((reward == 7.0).sum(axis=1) == 19) and np.all((reward == -1.0).sum(axis=1) == 1)
    assert np.all(np.asarray(batches["mask"])[reward == 7.0] == 1.0)  # imagined rows always bootstrap


# ------------------------------------------------------------------------------------------------ schedule
def test_retrain_runs_only_when_step_is_a_multiple_of_retrain_every(mbpo, update):
    state = mbpo.init(jax.random.key(6))
    data = transitions()

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    off, metrics = update(state, data, jax.random.key(0), jnp.int32(3))
    assert same(off.model, state.model) and same(off.opt_model, state.opt_model)
    assert same(off.normaliser, state.normaliser) and same(off.elites, state.elites)
    assert float(metrics["model/nll"]) == 0.0  # no retrain yet: the initial value is reported
    assert not same(off.sac.critic, state.sac.critic)  # SAC learns on every step
    for step in (0, 5, 10):
        on, metrics = update(state, data, jax.random.key(0), jnp.int32(step))
        assert not same(on.model, state.model) and not same(on.normaliser, state.normaliser)
        assert float(metrics["model/nll"]) != 0.0 and float(metrics["model/mse_elites"]) > 0.0
    # A later off-schedule step keeps the retrained model and keeps reporting its errors.
    later, metrics = update(on, data, jax.random.key(1), jnp.int32(11))
    assert same(later.model, on.model) and float(metrics["model/nll"]) == float(on.model_nll)


def test_jitted_update_under_vmap_over_two_lanes(mbpo):
    lanes = jax.tree.map(lambda a, b: jnp.stack([a, b]), transitions(0), transitions(1))
    states = jax.vmap(mbpo.init)(jax.random.split(jax.random.key(7), 2))

    def lane_update(state, data, key, step):
        return mbpo.update(state, sampler(data), key, step)

    batched = jax.vmap(lane_update, in_axes=(0, 0, 0, None))
    # The retrain schedule reads the unbatched step, so under vmap it stays a branch (a cond), instead of both
    # branches running for every lane and a select between them.
    keys = jax.random.split(jax.random.key(0), 2)
    jaxpr = jax.make_jaxpr(batched)(states, lanes, keys, jnp.int32(0))
    assert any(eqn.primitive.name == "cond" for eqn in jaxpr.jaxpr.eqns)
    per_lane_step = jax.make_jaxpr(jax.vmap(lane_update))(states, lanes, keys, jnp.zeros(2, jnp.int32))
    assert not any(eqn.primitive.name == "cond" for eqn in per_lane_step.jaxpr.eqns)  # what a per-seed step gives
    step_all = jax.jit(batched)
    for step in (0, 1):
        states, metrics = step_all(states, lanes, jax.random.split(jax.random.key(step), 2), jnp.int32(step))
    assert set(metrics) == set(mbpo.metric_names)
    assert all(v.shape == (2,) and np.all(np.isfinite(v)) for v in metrics.values())
    np.testing.assert_array_equal(metrics["model/buffer_size"], [16.0, 16.0])
    assert states.model_buffer.obs.shape == (2, 20, OBS) and states.elites.shape == (2, CFG.elites)
    kernel = states.model["params"]["mlp"]["Dense_0"]["kernel"]
    assert kernel.shape == (2, CFG.ensemble_size, OBS + ACT, CFG.model_hidden)
    assert not np.allclose(kernel[0], kernel[1])  # each lane trained its own ensemble on its own data
    obs = jnp.zeros((2, OBS))
    assert jax.vmap(lambda s, o: mbpo.act(s, o, jax.random.key(0), False))(states, obs).shape == (2, ACT)


def test_diagnostics_read_the_sac_part_of_its_state(mbpo):
    """Zero actor and critics in the SAC part: the value is 0, the target action tanh(exp(-4) * noise) (log std
    midway in [-10, 2]), and the TD error the squared reward plus the discounted entropy bonus, as SAC's."""
    state = mbpo.init(jax.random.key(8))
    zero = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
    state = state.replace(sac=state.sac.replace(actor=zero(state.sac.actor), critic=zero(state.sac.critic),
                                                critic_target=zero(state.sac.critic_target)))
    data, key, obs = transitions(), jax.random.key(9), jnp.ones((OBS,))
    assert float(mbpo.value(state, obs, key)) == 0.0
    np.testing.assert_allclose(mbpo.target_action(state, obs, key),
                               np.tanh(np.exp(-4.0) * np.asarray(jax.random.normal(key, (ACT,)))), rtol=1e-5)
    u = np.exp(-4.0) * np.asarray(jax.random.normal(key, (ROWS, ACT)))
    logp = (-0.5 * (u / np.exp(-4.0)) ** 2 + 4.0 - 0.5 * np.log(2 * np.pi) - np.log(1 - np.tanh(u) ** 2)).sum(-1)
    target = np.asarray(data["reward"]) + CFG.gamma * (0.0 - 1.0 * logp)  # initial temperature 1
    mask = np.asarray(data["mask"])
    assert float(mbpo.td_error(state, data, key)) == pytest.approx(np.sum(mask * target ** 2) / mask.sum(), rel=1e-4)


# ------------------------------------------------------------------------------------------------ config
def test_config_checks():
    assert AGENTS["mbpo"][0] is MBPOConfig
    validation.validate(MBPOConfig(), "mbpo")
    for bad, message in [({"elites": 8}, r"mbpo.elites \(8\) cannot exceed"),
                         ({"utd": 0}, "mbpo.utd must be a positive integer"),  # SAC's own rules, this section's name
                         ({"log_std_min": 3.0}, "mbpo.log_std_min"),
                         ({"model_capacity": 100}, "mbpo.model_capacity"),
                         ({"synthetic_ratio": 1.5}, r"mbpo.synthetic_ratio must be in \[0, 1\]"),
                         ({"model_layers": 2}, "model_weight_decay must list model_layers \\+ 1 = 3"),
                         ({"model_holdout_every": 1}, "model_holdout_every must be >= 2")]:
        with pytest.raises(ValueError, match=message):
            validation.validate(MBPOConfig(**bad), "mbpo")


def test_specs_load_and_the_schedule_is_checked():
    for name in ("mbpo-dyna", "mbpo-dyna-reset"):
        spec = config.load_spec(name)
        assert spec.agent == "mbpo" and spec.mbpo.retrain_every == 250 and spec.train.warmup_steps == 10_000
    assert config.load_spec("mbpo-dyna-reset").train.reset_every == 20_000
    with pytest.raises(config.SpecError, match=r"train.warmup_steps \(10100\) must be a multiple of mbpo.retrain"):
        config.load_spec("mbpo-dyna", ["train.warmup_steps=10100"])


def test_reset_renews_the_sac_part_and_keeps_the_model(mbpo, update):
    state = update(mbpo.init(jax.random.key(5)), transitions(), jax.random.key(6), jnp.int32(0))[0]  # a trained model
    fresh = mbpo.reset(state, jax.random.key(123))
    for a, b in zip(jax.tree.leaves((fresh.model, fresh.normaliser, fresh.model_buffer, fresh.elites)),
                    jax.tree.leaves((state.model, state.normaliser, state.model_buffer, state.elites))):
        np.testing.assert_array_equal(a, b)
    assert int(np.asarray(fresh.sac.opt_critic[0].count)) == 0
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(fresh.sac.actor), jax.tree.leaves(state.sac.actor)))
