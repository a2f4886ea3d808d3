"""SAC-SVG(H): the multi-step model loss and the value expansion against hand-computed values, H = 0 against SAC's
actor loss, the target-entropy schedule, the three things taken from the authors' code (observation normalisation,
the dynamics model's gradient clipping, detach_xt) and the running statistics behind the first, and jitted updates
(under vmap, and on the real replay), all on tiny networks and synthetic transitions."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vecrl import config, replay
from vecrl.agents import AGENTS
from vecrl.agents import sac as sac_fns
from vecrl.agents.svg import SVGConfig, make_svg, target_entropy_schedule
from vecrl.running_stats import running_stats_add, running_stats_init, standardise
from vecrl.validation import validate

OBS, ACT, ROWS = 3, 2, 64
CFG = SVGConfig(hidden=8, batch_size=16, utd=2, model_hidden=8, model_batch_size=8, model_updates=2, horizon=2,
                model_actor_start=5)
LOG_STD_OF_A_ZERO_ACTOR = -1.5  # raw output 0 lands midway in [-5, 2]


def zero_params(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def trajectory(seed=0, rows=ROWS):
    """`rows` consecutive transitions of a linear system (next_obs of one row is the next row's obs); the
    transition at rows // 2 - 1 ends an episode (mask 0)."""
    rng = np.random.default_rng(seed)
    action = rng.uniform(-1, 1, size=(rows, ACT))
    obs = np.zeros((rows + 1, OBS))
    obs[0] = rng.normal(size=OBS)
    for t in range(rows):
        obs[t + 1] = 0.9 * obs[t] + 0.2 * np.concatenate([action[t], [0.0]])
    mask = np.ones(rows)
    mask[rows // 2 - 1] = 0.0
    data = {"obs": obs[:-1], "action": action, "reward": -np.sum(obs[:-1] ** 2, axis=1), "next_obs": obs[1:],
            "mask": mask}
    return {k: jnp.asarray(v, jnp.float32) for k, v in data.items()}


def sampler(data, calls=None):
    """A fake `sample(key, shape, length=None)` over one lane's consecutive transitions `data`: single rows
    uniformly, or sequences of `length` consecutive rows weighted 0 from the first episode end on, as the replay
    draws them. `calls` records each draw's (shape, length) while the update is traced."""
    n = data["reward"].shape[0]

    def sample(key, shape, length=None):
        if calls is not None:
            calls.append((tuple(shape), length))
        if length is None:
            return jax.tree.map(lambda x: x[jax.random.randint(key, shape, 0, n)], data)
        i = jax.random.randint(key, shape, 0, n - length + 1)[..., None] + jnp.arange(length)
        rows = jax.tree.map(lambda x: x[i], data)
        return {**rows, "mask": jnp.cumprod(rows["mask"], axis=-1)}

    return sample


@pytest.fixture(scope="module")
def svg():
    return make_svg(CFG, OBS, ACT)


@pytest.fixture(scope="module")
def update(svg):
    return jax.jit(lambda state, data, key, step: svg.update(state, sampler(data), key, step))


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def close(a, b):
    return all(np.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------------------------------------ the model
def dynamics_adding(dynamics, delta):
    """A model whose every step adds `delta`: all weights zero (the GRU states stay 0) but the decoder's output
    bias."""
    params = zero_params(dynamics["params"])
    params["decoder"]["Dense_2"]["bias"] = jnp.asarray(delta, jnp.float32)
    return {"params": params}


def test_multi_step_model_loss_by_hand(svg):
    state = svg.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    sequences = {"obs": rng.normal(size=(2, 3, OBS)), "action": rng.uniform(-1, 1, size=(2, 3, ACT)),
                 "next_obs": rng.normal(size=(2, 3, OBS)), "reward": np.zeros((2, 3)),
                 "mask": np.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])}
    sequences = {k: jnp.asarray(v, jnp.float32) for k, v in sequences.items()}
    x0, target, mask = (np.asarray(sequences[k]) for k in ("obs", "next_obs", "mask"))
    x0 = x0[:, 0]

    # A zero network keeps x_{t+1} = x_t: every step is compared with the first observation.
    zero = dynamics_adding(state.dynamics, np.zeros(OBS))
    per_step = np.mean((x0[:, None] - target) ** 2, axis=-1)
    expected = np.sum(mask * per_step) / mask.sum()
    assert float(svg.extras["dynamics_loss"](zero, sequences)) == pytest.approx(expected, rel=1e-5)

    # A model adding delta at every step predicts x_0 + (k + 1) delta at step k: the rollout feeds each prediction
    # (not the stored observation) into the next step.
    delta = np.asarray([0.5, -1.0, 2.0])
    adding = dynamics_adding(state.dynamics, delta)
    predicted = x0[:, None] + (np.arange(3)[None, :, None] + 1) * delta
    np.testing.assert_allclose(svg.extras["unroll"](adding, sequences["obs"][:, 0], sequences["action"]), predicted,
                               rtol=1e-5)
    per_step = np.mean((predicted - target) ** 2, axis=-1)
    expected = np.sum(mask * per_step) / mask.sum()
    assert float(svg.extras["dynamics_loss"](adding, sequences)) == pytest.approx(expected, rel=1e-5)


def test_rollout_carries_the_gru_states_from_zero(svg):
    """Each step's GRU states are the previous step's outputs, starting at zero (the paper's h_1 = 0); restarting
    them at every step would predict something else."""
    state = svg.init(jax.random.key(23))
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.normal(size=(5, OBS)), jnp.float32)
    actions = jnp.asarray(rng.uniform(-1, 1, size=(5, 3, ACT)), jnp.float32)
    net, zero_hidden = svg.extras["dynamics_net"], svg.extras["zero_hidden"]
    carried, restarted = [], []
    hidden, x, x_restarted = zero_hidden((5,)), x0, x0
    for t in range(3):
        hidden, x = net.apply(state.dynamics, hidden, x, actions[:, t])
        _, x_restarted = net.apply(state.dynamics, zero_hidden((5,)), x_restarted, actions[:, t])
        carried.append(x)
        restarted.append(x_restarted)
    predicted = np.asarray(svg.extras["unroll"](state.dynamics, x0, actions))
    np.testing.assert_allclose(predicted, np.stack(carried, axis=1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(predicted[:, 1:], np.stack(restarted, axis=1)[:, 1:], rtol=1e-3)
    assert len(hidden) == CFG.gru_layers and hidden[0].shape == (5, CFG.model_hidden)


def test_dynamics_steps_lower_the_multi_step_error():
    agent = make_svg(dataclasses.replace(CFG, model_lr=1e-2), OBS, ACT)
    state = agent.init(jax.random.key(2))
    sequences = sampler(trajectory())(jax.random.key(3), (150, 32), length=CFG.horizon)
    first = jax.tree.map(lambda x: x[0], sequences)
    trained, (losses, dropped) = jax.jit(lambda s: jax.lax.scan(agent.extras["dynamics_step"], s, sequences))(state)
    assert not np.asarray(dropped).any()
    assert float(losses[0]) == pytest.approx(float(agent.extras["dynamics_loss"](state.dynamics, first)), rel=1e-5)
    assert float(agent.extras["dynamics_loss"](trained.dynamics, first)) < 0.2 * float(losses[0])
    assert same(trained.sac, state.sac) and same(trained.reward, state.reward)


# ------------------------------------------------------------------------------------------------ the actor
def passes_first_input(mlp, scale, bias):
    """A 2-hidden-layer ReLU MLP computing scale * (x[0] + 10) + bias wherever x[0] > -10: unit 0 carries
    x[0] + 10 through both hidden layers, every other weight is zero."""
    p = zero_params(mlp)
    p["Dense_0"]["kernel"] = p["Dense_0"]["kernel"].at[0, 0].set(1.0)
    p["Dense_0"]["bias"] = p["Dense_0"]["bias"].at[0].set(10.0)
    p["Dense_1"]["kernel"] = p["Dense_1"]["kernel"].at[0, 0].set(1.0)
    p["Dense_2"]["kernel"] = p["Dense_2"]["kernel"].at[0].set(scale)
    p["Dense_2"]["bias"] = p["Dense_2"]["bias"] + bias
    return p


def twin_critic(state, head):
    """SAC's twin critic parameters with head i's replaced by head(i, its parameters): the heads are stacked."""
    stacked = state.sac.critic["params"]["heads"]["copies"]
    per_head = [head(i, jax.tree.map(lambda x, i=i: x[i], stacked)) for i in range(2)]
    return {"params": {"heads": {"copies": jax.tree.map(lambda *x: jnp.stack(x), *per_head)}}}


def zero_actor_log_prob(key, rows):
    """log pi(u) of the action a zero actor draws with `key`: u = tanh(exp(-1.5) eps), eps ~ N(0, 1)."""
    eps = np.asarray(jax.random.normal(key, (rows, ACT)), np.float64)
    pre = np.exp(LOG_STD_OF_A_ZERO_ACTOR) * eps
    return np.sum(-0.5 * eps ** 2 - LOG_STD_OF_A_ZERO_ACTOR - 0.5 * np.log(2 * np.pi) - np.log(1 - np.tanh(pre) ** 2),
                  axis=1)


def test_value_expansion_by_hand(svg):
    """H = 2 with networks simple enough to follow by hand: the model adds delta to the observation at every step,
    the reward net returns x[0], the critics return w_i (x[0] + 10) + b_i, the actor is the zero network."""
    gamma, alpha, delta = CFG.gamma, 0.3, np.asarray([0.5, 0.0, 0.0])
    w, b = (1.0, 0.5), (0.0, 3.0)  # the minimum is critic 0 below x[0] = -4, critic 1 above
    state = svg.init(jax.random.key(4))
    critic = twin_critic(state, lambda i, p: passes_first_input(p, w[i], b[i]))
    state = state.replace(sac=state.sac.replace(actor=zero_params(state.sac.actor), critic=critic,
                                                log_temperature=jnp.log(alpha)),
                          dynamics=dynamics_adding(state.dynamics, delta),
                          reward={"params": passes_first_input(state.reward["params"], 1.0, -10.0)})
    obs = np.zeros((4, OBS))
    obs[:, 0] = [-6.0, -4.7, -1.0, 2.0]
    obs[:, 1] = [3.0, -2.0, 0.5, 1.0]  # ignored by every network
    batch = {"obs": jnp.asarray(obs, jnp.float32), "mask": jnp.asarray([1.0, 1.0, 0.0, 1.0])}
    key = jax.random.key(5)

    loss, first_logp = svg.extras["actor_loss"](state.sac.actor, state, batch, key)

    logp = [zero_actor_log_prob(jax.random.fold_in(key, t), 4) for t in range(3)]
    x = obs[:, 0]
    reward = [x, x + delta[0]]  # r(x_t, u_t) = x_t[0]
    x_final = x + 2 * delta[0]
    q = np.minimum(w[0] * (x_final + 10) + b[0], w[1] * (x_final + 10) + b[1])
    value = (reward[0] - alpha * logp[0] + gamma * (reward[1] - alpha * logp[1])
             + gamma ** 2 * (q - alpha * logp[2]))
    expected = np.mean(np.asarray(batch["mask"]) * -value)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(first_logp, logp[0], rtol=1e-5)


def test_the_value_gradient_is_the_derivative_of_the_expansion(svg):
    """The actor's gradient is the full derivative of the value expansion through the model: along a random
    direction it matches a central finite difference of the loss. The reward net and the critics read only x[0]
    (not the action) and the temperature is small, so nearly all of the actor's influence goes through the model's
    predictions, and a gradient stopped anywhere along them would miss it."""
    state = svg.init(jax.random.key(6))
    critic = twin_critic(state, lambda i, p: passes_first_input(p, 3.0 + i, -10 * (3.0 + i)))
    # A model ten times as sensitive to its inputs as at initialisation, for a derivative well above float32 noise.
    dynamics = jax.tree.map(lambda x: x, state.dynamics)
    dynamics["params"]["decoder"]["Dense_2"]["kernel"] = 10.0 * dynamics["params"]["decoder"]["Dense_2"]["kernel"]
    state = state.replace(sac=state.sac.replace(critic=critic, log_temperature=jnp.log(1e-5)), dynamics=dynamics,
                          reward={"params": passes_first_input(state.reward["params"], 2.0, -20.0)})
    batch = {"obs": trajectory()["obs"][:16], "mask": jnp.ones(16)}
    key = jax.random.key(7)
    loss = jax.jit(svg.extras["actor_loss"])
    _, grads = jax.jit(jax.value_and_grad(svg.extras["actor_loss"], has_aux=True))(state.sac.actor, state, batch, key)
    leaves, treedef = jax.tree.flatten(state.sac.actor)
    directions = [jax.random.normal(k, x.shape) for k, x in zip(jax.random.split(jax.random.key(8), len(leaves)),
                                                                  leaves)]
    direction = jax.tree.unflatten(treedef, directions)
    analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grads), directions))
    eps = 1e-3

    def moved(sign):
        return jax.tree.map(lambda p, d: p + sign * eps * d, state.sac.actor, direction)

    numeric = (float(loss(moved(1), state, batch, key)[0]) - float(loss(moved(-1), state, batch, key)[0])) / (2 * eps)
    assert abs(numeric) > 1e-2
    assert analytic == pytest.approx(numeric, rel=2e-2)


def test_horizon_zero_is_sacs_actor_loss():
    agent = make_svg(dataclasses.replace(CFG, horizon=0), OBS, ACT)
    nets = agent.extras["nets"]
    state = agent.init(jax.random.key(9))
    state = state.replace(sac=state.sac.replace(log_temperature=jnp.log(0.4)))
    data = trajectory()
    batch = {k: data[k][:16] for k in ("obs", "mask")}
    key = jax.random.key(10)
    (loss, logp), grads = jax.value_and_grad(agent.extras["actor_loss"], has_aux=True)(state.sac.actor, state,
                                                                                      batch, key)
    (sac_loss, sac_logp), sac_grads = jax.value_and_grad(sac_fns.actor_loss, has_aux=True)(
        state.sac.actor, nets, state.sac, batch, jax.random.fold_in(key, 0))
    assert float(loss) == pytest.approx(float(sac_loss), rel=1e-6)
    np.testing.assert_allclose(logp, sac_logp, rtol=1e-6)
    assert close(grads, sac_grads)


def test_gradient_step_moves_the_actor_but_not_the_model_through_the_value_gradient(svg):
    """The value expansion's gradient reaches only the actor: the critic is exactly SAC's critic step alone, and
    the dynamics do not move (they learn only from sequences)."""
    state = svg.init(jax.random.key(11))
    data = trajectory()
    batch = jax.tree.map(lambda x: x[:CFG.batch_size], data)
    key = jax.random.key(12)
    new, metrics = svg.extras["gradient_step"](state, batch, key, jnp.float32(-2.0), jnp.asarray(True))
    critic_only, _ = sac_fns.critic_step(svg.extras["nets"], state.sac, batch, jax.random.split(key)[0])
    assert close(new.sac.critic, critic_only.critic) and close(new.sac.critic_target, critic_only.critic_target)
    assert same(new.dynamics, state.dynamics) and same(new.opt_dynamics, state.opt_dynamics)
    assert not close(new.sac.actor, state.sac.actor) and not close(new.reward, state.reward)
    expected_reward_mse = np.mean((np.asarray(svg.extras["predict_reward"](state.reward, batch["obs"], batch["action"]))
                                   - np.asarray(batch["reward"])) ** 2 * np.asarray(batch["mask"])) / np.mean(
        np.asarray(batch["mask"]))
    assert float(metrics["model/reward_mse"]) == pytest.approx(expected_reward_mse, rel=1e-5)


# ------------------------------------------------------------------------------------------------ schedule
def test_target_entropy_schedule():
    # The paper's eq. 14: (init - final) (1 - t/T)^beta + final, held at final after T.
    def at(step, decay):
        return float(target_entropy_schedule(jnp.int32(step), 1.0, -4.0, decay, 100))

    assert [at(s, 2.0) for s in (0, 50, 100, 150)] == pytest.approx([1.0, -2.75, -4.0, -4.0])
    assert at(75, 1.0) == pytest.approx(-2.75)
    assert at(50, 0.0625) == pytest.approx(5.0 * 0.5 ** 0.0625 - 4.0)
    assert at(100, 0.0) == pytest.approx(1.0)  # beta 0: (1 - t/T)^0 = 1 holds the target at init
    default = make_svg(CFG, OBS, ACT).extras["target_entropy"]
    assert [float(default(jnp.int32(s))) for s in (0, 10**7)] == [-ACT, -ACT]  # SAC's usual target, fixed
    decaying = make_svg(dataclasses.replace(CFG, target_entropy_init=0.0, target_entropy_final=-10.0,
                                            target_entropy_decay=1.0, target_entropy_steps=1000), OBS, ACT)
    assert float(decaying.extras["target_entropy"](jnp.int32(250))) == pytest.approx(-2.5)


# ------------------------------------------------------------------------------------------------ updates
def test_jitted_update_under_vmap_over_two_lanes(svg):
    lanes = jax.tree.map(lambda a, b: jnp.stack([a, b]), trajectory(0), trajectory(1))
    states = jax.vmap(svg.init)(jax.random.split(jax.random.key(13), 2))
    calls = []

    def lane_update(state, data, key, step):
        return svg.update(state, sampler(data, calls), key, step)

    batched = jax.vmap(lane_update, in_axes=(0, 0, 0, None))
    keys = jax.random.split(jax.random.key(0), 2)
    # The model-or-SAC actor choice reads the unbatched step, so under vmap it stays a branch (a cond, inside the
    # scan over gradient steps) instead of both losses running for every lane; a per-seed step would give a select.
    assert "cond[" in str(jax.make_jaxpr(batched)(states, lanes, keys, jnp.int32(0)))
    assert "cond[" not in str(jax.make_jaxpr(jax.vmap(lane_update))(states, lanes, keys, jnp.zeros(2, jnp.int32)))
    assert set(calls) == {((CFG.utd, CFG.batch_size), None), ((CFG.model_updates, CFG.model_batch_size), CFG.horizon)}
    step_all = jax.jit(batched)
    for step in (4, 5):
        states, metrics = step_all(states, lanes, jax.random.split(jax.random.key(step), 2), jnp.int32(step))
    assert set(metrics) == set(svg.metric_names)
    assert all(v.shape == (2,) and np.all(np.isfinite(v)) for v in metrics.values())
    assert np.all(np.asarray(metrics["model/obs_mse"]) > 0) and np.all(np.asarray(metrics["model/reward_mse"]) > 0)
    np.testing.assert_array_equal(metrics["target_entropy"], [-ACT, -ACT])
    kernel = states.dynamics["params"]["gru_0"]["ir"]["kernel"]
    assert kernel.shape == (2, CFG.model_hidden, CFG.model_hidden)
    assert not np.allclose(kernel[0], kernel[1])
    obs = jnp.zeros((2, OBS))
    assert jax.vmap(lambda s, o: svg.act(s, o, jax.random.key(0), False))(states, obs).shape == (2, ACT)


def test_actor_uses_sacs_loss_until_model_actor_start(svg, update):
    """Before `model_actor_start` the SAC part learns exactly as SVG(0)'s (the model trains meanwhile); from it on
    the actor follows the value expansion."""
    sac_like = make_svg(dataclasses.replace(CFG, horizon=0), OBS, ACT)
    sac_like_update = jax.jit(lambda state, data, key, step: sac_like.update(state, sampler(data), key, step))
    data, key = trajectory(), jax.random.key(14)
    state, reference = svg.init(jax.random.key(15)), sac_like.init(jax.random.key(15))
    assert same(state.sac, reference.sac)
    before, _ = update(state, data, key, jnp.int32(CFG.model_actor_start - 1))
    expected, metrics = sac_like_update(reference, data, key, jnp.int32(CFG.model_actor_start - 1))
    assert close(before.sac, expected.sac)
    assert not same(before.dynamics, state.dynamics) and not same(before.reward, state.reward)
    assert float(metrics["model/obs_mse"]) == 0.0 and same(expected.dynamics, reference.dynamics)
    at_start, _ = update(state, data, key, jnp.int32(CFG.model_actor_start))
    assert close(at_start.sac.critic, expected.sac.critic) and not close(at_start.sac.actor, expected.sac.actor)


def test_update_on_the_real_replay(svg):
    buf = replay.train_buffer_init(ROWS, OBS, ACT)
    data = trajectory()
    add = jax.jit(replay.train_buffer_add)
    for t in range(ROWS - 4):
        held = t % 10 == 3
        buf = add(buf, data["obs"][t], data["action"][t], data["reward"][t], data["next_obs"][t],
                  data["mask"][t] == 0, jnp.asarray(t == ROWS // 2), jnp.asarray(not held), jnp.asarray(True))
    lengths = []

    def lane_update(state, buffer, key, step):
        def sample(key, shape, **kwargs):  # the trainer's sampler, recording how the agent calls it
            lengths.append(kwargs.get("length"))
            return functools.partial(replay.train_buffer_sample, buffer)(key, shape, **kwargs)

        return svg.update(state, sample, key, step)

    state, metrics = jax.jit(lane_update)(svg.init(jax.random.key(16)), buf, jax.random.key(17), jnp.int32(10))
    assert sorted(lengths, key=str) == [CFG.horizon, None]
    assert set(metrics) == set(svg.metric_names) and all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["model/obs_mse"]) > 0


def test_reset_renews_the_sac_part_and_keeps_the_model(svg, update):
    state = update(observed(svg, svg.init(jax.random.key(20))), trajectory(), jax.random.key(21), jnp.int32(0))[0]
    fresh = svg.reset(state, jax.random.key(22))
    assert same((fresh.dynamics, fresh.reward, fresh.opt_dynamics, fresh.opt_reward, fresh.obs_stats),
                (state.dynamics, state.reward, state.opt_dynamics, state.opt_reward, state.obs_stats))
    assert float(fresh.obs_stats.count) == len(SEEN)
    assert int(np.asarray(fresh.sac.opt_critic[0].count)) == 0
    assert float(fresh.sac.log_temperature) == pytest.approx(np.log(CFG.init_temperature))
    assert not close(fresh.sac.actor, state.sac.actor)


# ------------------------------------------------------------------------------- observation normalisation
# Observations spread as the clamps are meant for: feature 0 by about 1.2 (kept), feature 1 by about 0.008 (its
# standard deviation clamped up to obs_std_min = 0.1), feature 2 by about 200 (clamped down to obs_std_max = 10).
SEEN = np.asarray([[0.5, 3.0, 100.0], [1.5, 3.01, -200.0], [-1.0, 2.99, 50.0], [2.0, 3.0, 300.0], [0.0, 3.0, -150.0]])
UNSEEN = np.asarray([1e6, -1e6, 1e6])  # observed with valid false, after SEEN[2]: must count for nothing


def observed(agent, state, rows=SEEN):
    """`state` after the agent observed `rows` (valid) and UNSEEN (not valid), one at a time, as the trainer does."""
    observe = jax.jit(agent.observe)
    for i, x in enumerate(rows):
        state = observe(state, jnp.asarray(x, jnp.float32), jnp.asarray(True))
        if i == 2:
            state = observe(state, jnp.asarray(UNSEEN, jnp.float32), jnp.asarray(False))
    return state


def by_hand_normalised(x, rows=SEEN):
    """(x - mean) / std with numpy's mean and sample standard deviation of `rows`, the latter clamped to [0.1, 10]."""
    return (np.asarray(x) - rows.mean(axis=0)) / np.clip(rows.std(axis=0, ddof=1), 0.1, 10.0)


SHIFT = 100.0


def reads_obs(mlp, w, b):
    """A 2-hidden-layer ReLU MLP computing (x[:n] + SHIFT) @ w + b wherever every x[i] > -SHIFT, n = len(w): hidden
    unit i < n carries x[i] + SHIFT through both layers, every other weight is zero, so inputs from n on (a critic's
    action) are ignored."""
    w = jnp.asarray(w, jnp.float32)
    n, diagonal = w.shape[0], jnp.arange(w.shape[0])
    p = zero_params(mlp)
    p["Dense_0"]["kernel"] = p["Dense_0"]["kernel"].at[diagonal, diagonal].set(1.0)
    p["Dense_0"]["bias"] = p["Dense_0"]["bias"].at[:n].set(SHIFT)
    p["Dense_1"]["kernel"] = p["Dense_1"]["kernel"].at[diagonal, diagonal].set(1.0)
    p["Dense_2"]["kernel"] = p["Dense_2"]["kernel"].at[:n].set(w)
    p["Dense_2"]["bias"] = p["Dense_2"]["bias"] + jnp.asarray(b, jnp.float32)
    return {"params": p}


def test_observe_keeps_welford_statistics_of_the_valid_observations(svg):
    state = observed(svg, svg.init(jax.random.key(24)))
    stats = state.obs_stats
    assert float(stats.count) == len(SEEN)
    np.testing.assert_allclose(stats.mean, SEEN.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.sqrt(np.asarray(stats.m2) / (len(SEEN) - 1)), SEEN.std(axis=0, ddof=1), rtol=1e-3)
    x = jnp.asarray([1.0, 3.05, 45.0])
    np.testing.assert_allclose(svg.extras["normalise"](state, x), by_hand_normalised(x), rtol=1e-4)
    # Without obs_norm nothing is kept and every network sees raw observations.
    raw = make_svg(dataclasses.replace(CFG, obs_norm=False), OBS, ACT)
    assert raw.observe is None
    np.testing.assert_array_equal(raw.extras["normalise"](state, x), x)


# The test actor reads every feature: x @ ACTOR_W + bias gives the Gaussian's mean (first ACT columns) and its
# unsquashed log std (last ACT); the critics read the observation only: Q_i = x @ CRITIC_W[i] + bias_i.
ACTOR_W = np.asarray([[0.3, -0.2, 0.1, 0.0], [0.1, 0.25, 0.0, -0.1], [-0.03, 0.02, 0.01, 0.02]])
ACTOR_B = -SHIFT * ACTOR_W.sum(axis=0) + np.asarray([0.1, -0.2, 0.3, -0.4])
CRITIC_W = (np.asarray([[1.0], [0.5], [-0.3]]), np.asarray([[0.8], [-0.2], [0.4]]))
CRITIC_B = (-SHIFT * CRITIC_W[0].sum(axis=0) - 1.0, -SHIFT * CRITIC_W[1].sum(axis=0) + 2.0)


def hand_policy(xn):
    out = (np.asarray(xn, np.float64) + SHIFT) @ ACTOR_W + ACTOR_B
    mean, raw = out[..., :ACT], out[..., ACT:]
    return mean, CFG.log_std_min + 0.5 * (CFG.log_std_max - CFG.log_std_min) * (np.tanh(raw) + 1.0)


def hand_q(xn):
    return np.stack([((np.asarray(xn, np.float64) + SHIFT) @ w + b)[..., 0] for w, b in zip(CRITIC_W, CRITIC_B)])


def test_act_value_and_diagnostics_by_hand_on_normalised_observations(svg):
    """act, value, target_action and td_error with networks simple enough to follow by hand, after the agent
    observed SEEN: each sees (obs - mean) / clamped std, not the raw observation."""
    state = observed(svg, svg.init(jax.random.key(25)))
    critic = twin_critic(state, lambda i, p: reads_obs(p, CRITIC_W[i], CRITIC_B[i])["params"])
    alpha = 0.3
    state = state.replace(sac=state.sac.replace(
        actor=reads_obs(state.sac.actor["params"], ACTOR_W, ACTOR_B), critic=critic, critic_target=critic,
        log_temperature=jnp.log(alpha)))
    obs = np.asarray([1.0, 3.05, 45.0])
    xn = by_hand_normalised(obs)
    assert np.all(xn > -SHIFT)  # inside the hand networks' linear region
    mean, log_std = hand_policy(xn)
    key = jax.random.key(26)

    np.testing.assert_allclose(svg.act(state, jnp.asarray(obs, jnp.float32), key, False), np.tanh(mean), rtol=1e-4)
    assert not np.allclose(np.tanh(mean), np.tanh(hand_policy(obs)[0]), rtol=1e-2)  # raw obs would act otherwise
    eps = np.asarray(jax.random.normal(key, (ACT,)), np.float64)
    np.testing.assert_allclose(svg.target_action(state, jnp.asarray(obs, jnp.float32), key),
                               np.tanh(mean + np.exp(log_std) * eps), rtol=1e-4)
    assert float(svg.value(state, jnp.asarray(obs, jnp.float32), key)) == pytest.approx(
        float(np.min(hand_q(xn))), rel=1e-4)

    # td_error: the twin critics' squared error to r + gamma (min_i Q_i(x') - alpha log pi(u' | x')), u' drawn with
    # `key` at the normalised next observation, averaged over the heads and the rows with mask 1.
    rng = np.random.default_rng(27)
    batch = {"obs": SEEN[:4] + rng.normal(size=(4, OBS)) * [0.5, 0.005, 50.0], "next_obs": SEEN[1:],
             "action": rng.uniform(-1, 1, size=(4, ACT)), "reward": np.asarray([1.0, -0.5, 2.0, 0.0]),
             "mask": np.asarray([1.0, 1.0, 0.0, 1.0])}
    xn, xn_next = by_hand_normalised(batch["obs"]), by_hand_normalised(batch["next_obs"])
    assert np.all(xn > -SHIFT) and np.all(xn_next > -SHIFT)
    mean, log_std = hand_policy(xn_next)
    eps = np.asarray(jax.random.normal(key, (4, ACT)), np.float64)
    u = mean + np.exp(log_std) * eps
    log_one_minus_tanh2 = 2.0 * (np.log(2.0) - u - np.logaddexp(0.0, -2.0 * u))
    logp = np.sum(-0.5 * eps ** 2 - log_std - 0.5 * np.log(2 * np.pi) - log_one_minus_tanh2, axis=-1)
    target = batch["reward"] + CFG.gamma * (np.min(hand_q(xn_next), axis=0) - alpha * logp)
    per_row = np.sum((hand_q(xn) - target) ** 2, axis=0)
    expected = np.sum(batch["mask"] * per_row) / 2 / np.sum(batch["mask"])
    batch = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
    assert float(svg.td_error(state, batch, key)) == pytest.approx(expected, rel=1e-4)
    assert svg.metric_names[:len(sac_fns.METRICS)] == sac_fns.METRICS


def scaled(data):
    """`data` with observations on SEEN's scales (the dynamics unchanged up to the change of units)."""
    scale, shift = np.asarray([1.0, 0.01, 100.0]), np.asarray([0.0, 3.0, 20.0])
    return {**data, "obs": data["obs"] * scale + shift, "next_obs": data["next_obs"] * scale + shift}


def test_update_trains_every_network_on_normalised_observations(svg, update):
    """An update draws raw rows and sequences and normalises their obs and next_obs with the statistics as they
    stand: exactly what an agent without obs_norm does on rows normalised beforehand (critic, actor through the
    model, temperature, reward net and dynamics model alike)."""
    raw_agent = make_svg(dataclasses.replace(CFG, obs_norm=False), OBS, ACT)
    raw_update = jax.jit(lambda state, data, key, step: raw_agent.update(state, sampler(data), key, step))
    state = observed(svg, svg.init(jax.random.key(28)))
    data = scaled(trajectory())
    # Normalised in float32 from the agent's own statistics (checked against numpy above), so that both runs see
    # the same numbers.
    stats = jax.tree.map(np.asarray, state.obs_stats)
    std = np.clip(np.sqrt(stats.m2 / (stats.count - 1)), np.float32(0.1), np.float32(10.0))
    normalised = {**data, **{k: jnp.asarray((np.asarray(data[k]) - stats.mean) / std) for k in ("obs", "next_obs")}}
    key, step = jax.random.key(29), jnp.int32(CFG.model_actor_start)
    new, metrics = update(state, data, key, step)
    expected, expected_metrics = raw_update(state, normalised, key, step)
    assert close(new, expected) and close(metrics, expected_metrics)
    unnormalised, _ = raw_update(state, data, key, step)
    for part in ("sac", "reward", "dynamics"):
        assert not close(getattr(unnormalised, part), getattr(expected, part))


# ------------------------------------------------------------------------------- the code's model training
def adam_moments(opt_state) -> optax.ScaleByAdamState:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x))


def global_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def test_only_the_dynamics_gradient_is_clipped_to_global_norm_one():
    """The code's clip_grad_norm_(1.0) on the model: after the first dynamics step, Adam's moments are those of the
    gradient rescaled to global norm 1 (mu = 0.1 g / |g|, nu = 0.001 (g / |g|)^2; Adam's first step itself is
    nearly scale-free, its moments are not). With the clip out of reach they are the raw gradient's. The reward
    net's gradient is not clipped."""
    rng = np.random.default_rng(30)
    sequences = {"obs": rng.normal(size=(8, 2, OBS)), "action": rng.uniform(-1, 1, size=(8, 2, ACT)),
                 "next_obs": 100.0 * rng.normal(size=(8, 2, OBS)), "reward": np.zeros((8, 2)), "mask": np.ones((8, 2))}
    sequences = {k: jnp.asarray(v, jnp.float32) for k, v in sequences.items()}
    for clip in (None, 1e6):  # None: the default
        agent = make_svg(CFG if clip is None else dataclasses.replace(CFG, model_grad_clip=clip), OBS, ACT)
        state = agent.init(jax.random.key(31))
        g = jax.grad(agent.extras["dynamics_loss"])(state.dynamics, sequences)
        norm = global_norm(g)
        assert norm > 10.0
        scale = 1.0 / norm if clip is None else 1.0
        moments = adam_moments(agent.extras["dynamics_step"](state, sequences)[0].opt_dynamics)
        assert close(moments.mu, jax.tree.map(lambda x: 0.1 * scale * x, g))
        assert close(moments.nu, jax.tree.map(lambda x: 0.001 * (scale * x) ** 2, g))

    agent = make_svg(CFG, OBS, ACT)
    state = agent.init(jax.random.key(32))
    batch = jax.tree.map(lambda x: x[:CFG.batch_size], trajectory())
    batch = {**batch, "reward": 100.0 * batch["reward"]}
    g = jax.grad(agent.extras["reward_loss"])(state.reward, batch)
    assert global_norm(g) > 10.0
    new, _ = agent.extras["gradient_step"](state, batch, jax.random.key(33), jnp.float32(-2.0), jnp.asarray(True))
    assert close(adam_moments(new.opt_reward).mu, jax.tree.map(lambda x: 0.1 * x, g))


def test_dynamics_loss_detaches_the_predicted_states_fed_back_as_the_code():
    """With detach_xt (the code's default) the dynamics loss differentiates through the GRU states only: on two-step
    sequences its gradient is that of the loss with the first prediction held constant where the second step takes
    it as input; without, it is the plain loss's, which differs. (The actor's value expansion does not detach:
    test_the_value_gradient_is_the_derivative_of_the_expansion runs with detach_xt on.)"""
    rng = np.random.default_rng(34)
    rows = 6
    sequences = {"obs": rng.normal(size=(rows, 2, OBS)), "action": rng.uniform(-1, 1, size=(rows, 2, ACT)),
                 "next_obs": rng.normal(size=(rows, 2, OBS)), "reward": np.zeros((rows, 2)),
                 "mask": np.asarray([[1.0, 1.0]] * (rows - 1) + [[1.0, 0.0]])}
    sequences = {k: jnp.asarray(v, jnp.float32) for k, v in sequences.items()}
    gradients = {}
    for detach in (True, False):
        agent = make_svg(dataclasses.replace(CFG, detach_xt=detach), OBS, ACT)
        assert (agent.config.detach_xt, CFG.detach_xt) == (detach, True)
        net, zero_hidden = agent.extras["dynamics_net"], agent.extras["zero_hidden"]
        dynamics = agent.init(jax.random.key(35)).dynamics
        # ten times the decoder's sensitivity, so that the path through the first prediction weighs
        dynamics["params"]["decoder"]["Dense_2"]["kernel"] = 10.0 * dynamics["params"]["decoder"]["Dense_2"]["kernel"]

        def by_hand(params):
            hidden, x1 = net.apply(params, zero_hidden((rows,)), sequences["obs"][:, 0], sequences["action"][:, 0])
            _, x2 = net.apply(params, hidden, jax.lax.stop_gradient(x1) if detach else x1,  # noqa: B023
                              sequences["action"][:, 1])
            error = jnp.stack([jnp.mean((x - sequences["next_obs"][:, t]) ** 2, axis=-1)
                               for t, x in enumerate((x1, x2))], axis=1)
            return jnp.sum(sequences["mask"] * error) / jnp.sum(sequences["mask"])

        loss, g = jax.value_and_grad(agent.extras["dynamics_loss"])(dynamics, sequences)
        hand_loss, hand_g = jax.value_and_grad(by_hand)(dynamics)
        assert float(loss) == pytest.approx(float(hand_loss), rel=1e-5)
        assert close(g, hand_g)
        gradients[detach] = g
    assert not all(np.allclose(x, y, rtol=1e-2, atol=1e-4)
                   for x, y in zip(jax.tree.leaves(gradients[True]), jax.tree.leaves(gradients[False])))


# ------------------------------------------------------------------------------------------------ running statistics
def test_running_stats_are_welfords_over_the_valid_rows():
    rng = np.random.default_rng(36)
    x = rng.normal(loc=[5.0, -30.0, 0.0, 100.0], scale=[2.0, 0.03, 40.0, 0.5], size=(300, 4)).astype(np.float32)
    valid = rng.uniform(size=300) > 0.3
    x[~valid] = 1e9  # junk in the skipped rows
    add = lambda stats, row: (running_stats_add(stats, *row), None)  # noqa: E731
    stats, _ = jax.jit(lambda xs, vs: jax.lax.scan(add, running_stats_init(4), (xs, vs)))(x, valid)
    kept = x[valid].astype(np.float64)
    std = kept.std(axis=0, ddof=1)
    assert float(stats.count) == valid.sum()
    np.testing.assert_allclose(stats.mean, kept.mean(axis=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.asarray(stats.m2) / (valid.sum() - 1)), std, rtol=1e-3)
    # The standard deviations are about (2, 0.03, 40, 0.5): the second clamped up to 0.1, the third down to 10.
    clamped = np.clip(std, 0.1, 10.0)
    assert clamped[1] == 0.1 and clamped[2] == 10.0 and 0.1 < clamped[0] < 10 and 0.1 < clamped[3] < 10
    query = x[valid][:7]
    np.testing.assert_allclose(standardise(stats, jnp.asarray(query), 0.1, 10.0),
                               (query - kept.mean(axis=0)) / clamped, rtol=1e-3, atol=1e-3)
    # An invalid row changes nothing; before two observations there is no spread and the floor applies.
    assert same(running_stats_add(stats, jnp.ones(4), jnp.asarray(False)), stats)
    empty, row = running_stats_init(4), jnp.asarray([1.0, -2.0, 3.0, 0.5])
    np.testing.assert_allclose(standardise(empty, row, 0.1, 10.0), np.asarray(row) / 0.1, rtol=1e-6)
    one = running_stats_add(empty, row, jnp.asarray(True))
    np.testing.assert_allclose(standardise(one, 2 * row, 0.1, 10.0), np.asarray(row) / 0.1, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ config
def test_defaults_are_the_papers_table_3():
    cfg = SVGConfig()
    assert (cfg.hidden, cfg.lr, cfg.temperature_lr, cfg.init_temperature, cfg.tau, cfg.gamma) == (
        512, 1e-4, 5e-4, 0.1, 0.005, 0.99)
    assert (cfg.batch_size, cfg.model_batch_size, cfg.model_updates, cfg.utd) == (512, 1024, 4, 1)
    assert (cfg.model_hidden, cfg.gru_layers, cfg.model_lr, cfg.horizon) == (512, 2, 1e-3, 2)
    assert (cfg.log_std_min, cfg.log_std_max) == (-5.0, 2.0)
    # and the authors' code's (not in the table): normalisation, the model's clip, detach_xt, PyTorch's Adam eps
    assert (cfg.obs_norm, cfg.obs_std_min, cfg.obs_std_max) == (True, 0.1, 10.0)
    assert (cfg.model_grad_clip, cfg.detach_xt, cfg.adam_eps) == (1.0, True, 1e-8)
    assert make_svg(dataclasses.replace(cfg, hidden=8, model_hidden=8), OBS, ACT).batch_size == 1024


def test_config_checks():
    assert AGENTS["svg"][0] is SVGConfig and issubclass(SVGConfig, sac_fns.SACConfig)
    validate(SVGConfig(), "svg")
    validate(CFG, "svg")
    for bad, message in (
            (dict(horizon=-1), "svg.horizon must be a non-negative integer, got -1"),
            (dict(horizon=2.0), "svg.horizon must be a non-negative integer, got 2.0"),
            (dict(gru_layers=0), "svg.gru_layers must be a positive integer, got 0"),
            (dict(model_updates=0), "svg.model_updates must be a positive integer, got 0"),
            (dict(target_entropy_decay=-1.0), "svg.target_entropy_decay must be >= 0, got -1.0"),
            (dict(temperature_lr=0.0), "svg.temperature_lr must be > 0, got 0.0"),
            (dict(utd=0), "svg.utd must be a positive integer, got 0"),
            (dict(target_entropy_init=float("nan")),
             "svg.target_entropy_init must be a finite number or unset, got nan"),
            (dict(model_actor_start=-5), "svg.model_actor_start must be a non-negative integer, got -5"),
            (dict(model_grad_clip=0.0), "svg.model_grad_clip must be > 0, got 0.0"),
            (dict(obs_std_min=-0.1), "svg.obs_std_min must be > 0, got -0.1"),
            # SAC's rules and relation hold for SVG's fields, named in SVG's section
            (dict(hidden=0), "svg.hidden must be a positive integer, got 0"),
            (dict(gamma=1.0), "svg.gamma must be in [0, 1), got 1.0"),
            (dict(log_std_min=2.0), "svg.log_std_min (2.0) must be below svg.log_std_max (2.0)"),
            (dict(obs_std_min=20.0), "svg.obs_std_min (20.0) must not exceed svg.obs_std_max (10.0)")):
        with pytest.raises(ValueError) as error:
            validate(SVGConfig(**bad), "svg")
        assert str(error.value) == message


def test_specs_load():
    h2, h0 = config.load_spec("svg-h2"), config.load_spec("svg-h0")
    assert h2.agent == h0.agent == "svg" and (h2.svg.horizon, h0.svg.horizon) == (2, 0)
    assert h2.tasks == h0.tasks and h2.seeds == h0.seeds and h2.train == h0.train
    assert h2.svg.target_entropy_steps == h2.train.steps
    assert dataclasses.replace(h2.svg, horizon=0) == h0.svg
    assert (h2.svg.obs_norm, h2.svg.model_grad_clip, h2.svg.detach_xt) == (True, 1.0, True)
    assert config.load_spec("svg-quickstart").svg.horizon == 2
