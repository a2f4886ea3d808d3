"""MBPO: the ensemble's loss by hand, elite selection, rollouts into the model buffer, the mixed SAC minibatch,
the retrain schedule, and one jitted update under vmap, all on a tiny agent and synthetic transitions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vecrl import config
from vecrl.agents import AGENTS
from vecrl.agents.mbpo import MBPOConfig, gaussian_nll, make_mbpo, model_buffer_add, model_target

OBS, ACT, ROWS = 3, 2, 32
D = OBS + 1  # the ensemble predicts [next_obs - obs, reward]
CFG = MBPOConfig(hidden=8, batch_size=20, utd=2, ensemble_size=7, elites=5, model_hidden=8, model_lr=1e-2,
                 model_batch_size=8, retrain_every=5, model_train_steps=50, model_validation_rows=16, rollouts=8,
                 model_capacity=20)


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
    """A fake `sample(key, shape)`: uniform with replacement over `data`'s rows, as the replay draws."""
    def sample(key, shape):
        i = jax.random.randint(key, shape, 0, data["reward"].shape[0])
        return jax.tree.map(lambda x: x[i], data)
    return sample


@pytest.fixture(scope="module")
def mbpo():
    return make_mbpo(CFG, OBS, ACT)


@pytest.fixture(scope="module")
def update(mbpo):
    """The agent's update, jitted once, on a lane of real transitions `data` (the replay's stand-in)."""
    return jax.jit(lambda state, data, key, step: mbpo.update(state, sampler(data), key, step))


def jitted_retrain(agent):
    return jax.jit(lambda state, data, key: agent.extras["retrain"](state, sampler(data), key))


def with_member_means(models, means, raw_logvar=-50.0):
    """Members whose networks ignore their input: member i predicts mean means[i] on every output, and a raw
    log-variance `raw_logvar` before the soft bounds (the bounds themselves are kept)."""
    mlp = jax.tree.map(jnp.zeros_like, models["params"]["mlp"])
    bias = jnp.concatenate([jnp.broadcast_to(jnp.asarray(means, jnp.float32)[:, None], (len(means), D)),
                            jnp.full((len(means), D), raw_logvar)], axis=1)
    mlp = {**mlp, "Dense_2": {**mlp["Dense_2"], "bias": bias}}
    return {**models, "params": {**models["params"], "mlp": mlp}}


def member(models, i):
    return jax.tree.map(lambda x: x[i], models)


def softplus(x):
    return np.logaddexp(0.0, x)


# ------------------------------------------------------------------------------------------------ the ensemble
def test_gaussian_nll_by_hand():
    # Row 1: N(0, 1) at 1 -> 0.5 (1 + 0 + log 2pi); row 2: N(1, 4) at 3 -> 0.5 (4/4 + log 4 + log 2pi).
    mean, logvar = jnp.asarray([[0.0], [1.0]]), jnp.asarray([[0.0], [np.log(4.0)]])
    target = jnp.asarray([[1.0], [3.0]])
    log2pi = np.log(2 * np.pi)
    expected = 0.5 * (0.5 * (1 + log2pi) + 0.5 * (1 + np.log(4.0) + log2pi))
    assert float(gaussian_nll(mean, logvar, target, jnp.asarray([1.0, 1.0]))) == pytest.approx(expected, rel=1e-6)
    # A row with mask 0 (no stored next observation) is left out of the mean.
    assert float(gaussian_nll(mean, logvar, target, jnp.asarray([1.0, 0.0]))) == pytest.approx(
        0.5 * (1 + log2pi), rel=1e-6)


def test_member_loss_by_hand_with_a_zero_network(mbpo):
    """A zero network predicts mean 0 and raw log-variance 0, squashed by the initial bounds (0.5 and -10); the
    loss adds the bound penalty 0.005 * (sum max - sum min)."""
    state = mbpo.init(jax.random.key(0))
    models = with_member_means(state.model, np.zeros(CFG.ensemble_size), raw_logvar=0.0)
    data = transitions()
    upper = 0.5 - softplus(0.5 - 0.0)
    logvar = -10.0 + softplus(upper + 10.0)
    target = np.concatenate([np.asarray(data["next_obs"] - data["obs"]), np.asarray(data["reward"])[:, None]], 1)
    per_row = 0.5 * np.mean(target ** 2 * np.exp(-logvar) + logvar + np.log(2 * np.pi), axis=1)
    mask = np.asarray(data["mask"])
    nll = np.sum(mask * per_row) / mask.sum()
    loss = mbpo.extras["member_loss"](member(models, 0), state.normaliser, data)
    assert float(loss) == pytest.approx(nll + 0.005 * D * (0.5 + 10.0), rel=1e-5)
    _, nlls = mbpo.extras["member_errors"](models, state.normaliser, data)
    np.testing.assert_allclose(nlls, np.full(CFG.ensemble_size, nll), rtol=1e-5)
    np.testing.assert_allclose(model_target(data), target, rtol=1e-6)


def test_log_variance_stays_within_its_soft_bounds(mbpo):
    state = mbpo.init(jax.random.key(0))
    x = transitions()
    for raw, inside in ((1e3, lambda lv: lv <= 0.5 + 1e-3), (-1e3, lambda lv: lv >= -10.0 - 1e-3)):
        models = with_member_means(state.model, np.zeros(CFG.ensemble_size), raw_logvar=raw)
        _, logvar = mbpo.extras["ensemble_predict"](models, state.normaliser, x["obs"], x["action"])
        assert logvar.shape == (CFG.ensemble_size, ROWS, D) and np.all(inside(np.asarray(logvar)))


def test_retrain_lowers_the_ensembles_error(mbpo):
    state = mbpo.init(jax.random.key(1))
    data = transitions()
    trained = jitted_retrain(mbpo)(state, data, jax.random.key(2))
    before, _ = mbpo.extras["member_errors"](state.model, trained.normaliser, data)
    after, _ = mbpo.extras["member_errors"](trained.model, trained.normaliser, data)
    assert np.all(np.asarray(after) < 0.5 * np.asarray(before))
    # The normaliser was refitted on the inputs of the validation draw (the retrain's first key's rows).
    validation = sampler(data)(jax.random.split(jax.random.key(2))[0], (CFG.model_validation_rows,))
    inputs = np.concatenate([np.asarray(validation["obs"]), np.asarray(validation["action"])], axis=1)
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
    mse, _ = mbpo.extras["member_errors"](models, state.normaliser, still_transitions())
    np.testing.assert_allclose(mse, MEANS ** 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(mbpo.extras["select_elites"](mse), BEST_FIVE)


def test_retrain_keeps_the_best_members_as_elites():
    """With a vanishing learning rate the retrain leaves the members as they are, so it must pick the five with the
    lowest known errors on its validation draw, and report their mean error."""
    agent = make_mbpo(dataclasses.replace(CFG, model_lr=1e-12), OBS, ACT)
    state = agent.init(jax.random.key(0))
    state = state.replace(model=with_member_means(state.model, MEANS), elites=jnp.asarray([0, 2, 5, 6, 3]))
    out = jitted_retrain(agent)(state, still_transitions(), jax.random.key(1))
    np.testing.assert_array_equal(out.elites, BEST_FIVE)
    assert float(out.model_mse_elites) == pytest.approx(np.mean(MEANS[BEST_FIVE] ** 2), rel=1e-4)


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


def test_diagnostics_are_sacs_on_its_state(mbpo):
    from vecrl.agents.sac import make_sac  # pylint: disable=import-outside-toplevel

    sac = make_sac(CFG.sac_config(), OBS, ACT)
    state = mbpo.init(jax.random.key(8))
    data, key, obs = transitions(), jax.random.key(9), jnp.ones((OBS,))
    assert float(mbpo.td_error(state, data, key)) == float(sac.td_error(state.sac, data, key))
    assert float(mbpo.value(state, obs, key)) == float(sac.value(state.sac, obs, key))
    np.testing.assert_array_equal(mbpo.target_action(state, obs, key), sac.target_action(state.sac, obs, key))
    assert mbpo.metric_names[:len(sac.metric_names)] == sac.metric_names


# ------------------------------------------------------------------------------------------------ config
def test_config_checks():
    assert AGENTS["mbpo"][0] is MBPOConfig
    with pytest.raises(ValueError, match="mbpo.elites"):
        MBPOConfig(elites=8).validate()
    with pytest.raises(ValueError, match="mbpo.utd"):  # SAC's own rules, under this section's name
        MBPOConfig(utd=0).validate()
    with pytest.raises(ValueError, match="mbpo.model_capacity"):
        MBPOConfig(model_capacity=100).validate()
    with pytest.raises(ValueError, match="mbpo.synthetic_ratio"):
        MBPOConfig(synthetic_ratio=1.5).validate()


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
