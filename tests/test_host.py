"""The host backend (`make(task, backend="host")`): dm_control's own physics and task code behind the Env API. It
must equal dm_control itself bit for bit, draw its resets from the lane's key, carry its whole state in the
`EnvState` (so the trainer's runs repeat and resume exactly), and contain NaN as the device backend does."""

import numpy as np
import jax
import jax.numpy as jnp
import mujoco
import pytest

import envs_mjx
from envs_mjx import host
from envs_mjx.parity import flat_dm_observation, load_dm_control
from tests.test_trainer import _rows, tiny
from vecrl import run

pytestmark = pytest.mark.slow


def _batched(env):
    return jax.jit(jax.vmap(env.reset)), jax.jit(jax.vmap(env.step))


def _reset_batch(env, tasks, seed):
    """One lane per task name in `tasks` (all of env's domain), keys split from `seed`."""
    keys = jax.random.split(jax.random.key(seed), len(tasks))
    params = {"task": jnp.stack([env.task_params(t.split("-", 1)[1])["task"] for t in tasks])}
    return keys, _batched(env)[0](keys, params)


# (tasks vmapped together, action repeat): targets drawn into the model (reacher, finger, fish, swimmer), dog,
# quadruped and cheetah on dm_control's unchanged models, and the trainer's action repeat.
CASES = [(("cheetah-run",), 1), (("reacher-easy", "reacher-hard"), 2), (("finger-turn_easy", "finger-turn_hard"), 2),
         (("fish-swim",), 2), (("swimmer-swimmer6",), 1), (("quadruped-walk", "quadruped-run"), 2),
         (("dog-stand", "dog-run"), 2)]


@pytest.mark.parametrize("tasks,action_repeat", CASES, ids=lambda c: "+".join(c) if isinstance(c, tuple) else str(c))
def test_equals_dm_control_bit_for_bit(tasks, action_repeat, monkeypatch):
    """Each lane against its own dm_control environment, reset with the task's RandomState seeded from the lane's key
    words and stepped with the same controls: observations and summed rewards equal in every bit, every step. Two
    lanes per task share one simulator (one thread), so each step starts from the other lane's leftovers."""
    monkeypatch.setattr(host._simulators(tasks[0].split("-")[0]), "threads", 1)
    tasks = tasks * 2
    env = envs_mjx.make(tasks[0], action_repeat=action_repeat, backend="host")
    keys, states = _reset_batch(env, tasks, seed=7)
    _, step = _batched(env)
    # The controls exactly as `step` computes them inside its jitted program (XLA may fuse the affine map).
    to_ctrl = jax.jit(jax.vmap(lambda a: env.ctrl_from_action(jnp.clip(a, -1.0, 1.0))))
    references = []
    for lane, name in enumerate(tasks):
        dm = load_dm_control(name)
        dm.task._random = np.random.RandomState(np.asarray(jax.random.key_data(keys[lane]), np.uint32))
        obs = flat_dm_observation(dm.reset().observation).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(states.obs[lane]), obs, err_msg=f"{name}: reset observation")
        references.append(dm)
    rng = np.random.default_rng(0)
    for i in range(12):
        actions = jnp.asarray(rng.uniform(-1, 1, (len(tasks), env.action_size)), jnp.float32)
        states = step(states, actions)
        ctrl = np.asarray(to_ctrl(actions))
        for lane, dm in enumerate(references):
            reward = 0.0
            for _ in range(action_repeat):
                timestep = dm.step(ctrl[lane])
                reward += timestep.reward
            np.testing.assert_array_equal(np.asarray(states.obs[lane]),
                                          flat_dm_observation(timestep.observation).astype(np.float32),
                                          err_msg=f"{tasks[lane]}: observation after step {i + 1}")
            assert float(states.reward[lane]) == np.float32(reward), (tasks[lane], i)
    assert not np.any(np.asarray(states.nan))


def _model_arrays(model: mujoco.MjModel) -> dict[str, np.ndarray]:
    out = {}
    for name in dir(model):
        if not name.startswith("_"):
            value = getattr(model, name)
            if isinstance(value, np.ndarray):
                out[name] = value
    return out


@pytest.mark.parametrize("domain", envs_mjx.DOMAINS)
def test_episode_model_fields_hold_everything_a_reset_draws(domain):
    """What dm_control's `initialize_episode` draws into the model must be in `EPISODE_MODEL_FIELDS` (and so in a
    lane's state); otherwise a state would step with another episode's target. Two differently seeded resets of
    every task may differ only there."""
    listed = host.EPISODE_MODEL_FIELDS.get(domain, ())
    for name in envs_mjx.list_tasks(domain):
        a, b = load_dm_control(name, seed=1), load_dm_control(name, seed=2)
        a.reset(), b.reset()
        arrays_b = _model_arrays(b.physics.model.ptr)
        for field, values in _model_arrays(a.physics.model.ptr).items():
            differs = values != arrays_b[field]
            if not np.any(differs):
                continue
            rows = {int(r) for r in np.nonzero(differs.reshape(len(values), -1).any(axis=1))[0]}
            allowed = {a.physics.model.name2id(element, field.split("_")[0]) for f, element in listed if f == field}
            assert rows <= allowed, f"{name}: a reset draws model.{field} rows {sorted(rows - allowed)}, not carried"


def test_reset_is_a_function_of_the_key(monkeypatch):
    env = envs_mjx.make("quadruped-run", backend="host")
    keys = jax.random.split(jax.random.key(3), 4)
    reset, _ = _batched(env)
    params = {"task": jnp.full((4,), env.params["task"])}
    monkeypatch.setattr(host._simulators("quadruped"), "threads", 1)
    first = reset(keys, params)
    # The same keys in another order and batch size, on other simulators and threads, give the same states.
    monkeypatch.setattr(host._simulators("quadruped"), "threads", 2)
    again = reset(keys[::-1][:3], jax.tree.map(lambda x: x[:3], params))
    np.testing.assert_array_equal(np.asarray(first.data.state[1:][::-1]), np.asarray(again.data.state))
    assert len({np.asarray(s).tobytes() for s in first.data.state}) == 4


def test_state_round_trips_through_the_env_state():
    """Stepping lane by lane from the stored state equals stepping one dm_control environment on (warm start
    included), so a state restored from a checkpoint into a fresh simulator continues the same."""
    env = envs_mjx.make("walker-run", action_repeat=2, backend="host")
    state = env.reset(jax.random.key(0))
    actions = jax.random.uniform(jax.random.key(1), (6, env.action_size), minval=-1, maxval=1)
    for a in actions:
        state = env.step(state, a)
    host._simulators("walker").sims.clear()  # noqa: SLF001  (a fresh process's simulators)
    fresh = env.reset(jax.random.key(0))
    for a in actions:
        fresh = env.step(fresh, a)
    np.testing.assert_array_equal(np.asarray(state.data.state), np.asarray(fresh.data.state))
    np.testing.assert_array_equal(np.asarray(state.obs), np.asarray(fresh.obs))


def test_nan_is_contained():
    env = envs_mjx.make("cheetah-run", backend="host")
    _, states = _reset_batch(env, ["cheetah-run"] * 2, seed=0)
    _, step = _batched(env)
    layout = host._from_bits(np.asarray(states.data.state[0]))  # time, qpos, qvel, ...
    nq = env.mj_model.nq
    poisoned = layout.copy()
    poisoned[1 + nq] = np.nan  # the first qvel
    bad = states.replace(data=states.data.replace(state=states.data.state.at[0].set(host._to_bits(poisoned))))
    zeros = jnp.zeros((2, env.action_size))
    out, clean = step(bad, zeros), step(states, zeros)
    assert bool(out.nan[0]) and not bool(out.nan[1])
    assert np.all(np.asarray(out.obs[0]) == 0) and float(out.reward[0]) == 0
    np.testing.assert_array_equal(np.asarray(out.data.state[0]), np.asarray(bad.data.state[0]))  # left as it was
    np.testing.assert_array_equal(np.asarray(out.obs[1]), np.asarray(clean.obs[1]))  # the other lane unharmed
    assert bool(step(out, zeros).nan[0]), "the NaN flag must stay set until reset"
    # A diverging physics state (dm_control's PhysicsError) is flagged the same way.
    blown = layout.copy()
    blown[1 + nq:1 + 2 * nq] = 1e30
    boom = states.replace(data=states.data.replace(state=states.data.state.at[1].set(host._to_bits(blown))))
    out = step(boom, zeros)
    assert bool(out.nan[1]) and float(out.reward[1]) == 0 and np.all(np.isfinite(np.asarray(out.obs)))


@pytest.mark.parametrize("task", ["cheetah-run", "finger-turn_hard", "reacher-easy", "humanoid-run"])
def test_observation_layout_matches_the_jax_backend(task):
    """Agents and checkpoints see the same observation vector whichever backend ran the physics."""
    jax_env, host_env = envs_mjx.make(task), envs_mjx.make(task, backend="host")
    assert host_env.observation_spec == jax_env.observation_spec
    assert (host_env.action_size, host_env.episode_length) == (jax_env.action_size, jax_env.episode_length)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="Valid backends: jax, warp, host"):
        envs_mjx.make("cheetah-run", backend="mujoco")


def test_trainer_on_host_physics_repeats_and_resumes(tmp_path):
    """The trainer with `train.physics = "host"`: a run cut after learning has started and resumed writes the rows of
    an uninterrupted run, bit for bit (the host simulators' state is in the checkpoint)."""
    spec = tiny(**{"train.physics": "host"})
    full = run.train(spec, str(tmp_path / "full"), progress=False)
    assert full["status"] == "complete"
    out = str(tmp_path / "resumed")
    first = run.train(spec, out, progress=False, stop_after_chunks=2)
    assert first["step"] == 40 and all(r["loss/critic"] is not None for r in _rows(out) if r["step"] == 40)
    host._simulators("cartpole").sims.clear()  # noqa: SLF001  (a resume in a fresh process has none)
    assert run.resume(out, progress=False)["status"] == "complete"
    assert _rows(out) == _rows(str(tmp_path / "full"))
