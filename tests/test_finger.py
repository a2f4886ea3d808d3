"""finger: spin is served by `finger.DOMAIN`, turn_easy/turn_hard by `finger.TURN_DOMAIN` (their observation
keys differ). Needs the registry/parity support for split domains (`registry.get_domain(domain, task)` reading
`DOMAINS_BY_TASK`, `parity.task_groups`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs_mjx
from envs_mjx import finger, parity
from tests import envtest

pytestmark = pytest.mark.slow
DOMAIN = "finger"
SPIN, TURN = ["finger-spin"], ["finger-turn_easy", "finger-turn_hard"]
HINGE = np.array([0.2, 0.4])  # the spinner's hinge (x, z)
OBS_TOL, REWARD_TOL = 4e-6, 1e-6  # measured 1.6e-6 (turn_easy), 0
DIVERGENCE_TOL = 1e-6  # measured 0: binary rewards agree at every step (turn_hard returns 178 in both)
CONTACT_OBS_TOL = 2.5e-3  # measured 1.0e-3 (spin: hinge velocity of 23 rad/s in contact), 2.7e-4 (turn)


def test_one_step_parity():
    envtest.assert_one_step_parity(DOMAIN, obs_tol=OBS_TOL, reward_tol=REWARD_TOL)


def test_trajectory_divergence():
    envtest.assert_divergence_bounded(DOMAIN, mean_reward_tol=DIVERGENCE_TOL)


def test_nan_is_contained():
    envtest.assert_nan_contained(DOMAIN)


def test_split_domains_and_spin_damping():
    """Each task gets its Domain through the registry, and the model dm_control steps after its reset."""
    for task in SPIN + TURN:
        env = envs_mjx.make(task)
        assert env.domain is finger.DOMAINS_BY_TASK[task.split("-")[1]]
        dm_env = parity.load_dm_control(task)
        dm_env.reset()
        np.testing.assert_allclose(env.mj_model.dof_damping, dm_env.physics.model.dof_damping)
        assert [k for k, _ in env.observation_spec] and env.observation_size == parity.flat_dm_observation(
            dm_env.task.get_observation(dm_env.physics)).size


def _batch(task):
    """The reset/step compiled by the parity checks for `task`'s Domain (2 lanes per task of it)."""
    env, reset, step = parity._batched_fns(DOMAIN, task)  # pylint: disable=protected-access
    lanes = [t for t in (SPIN if task in SPIN else TURN) for _ in range(2)]
    params = jax.tree.map(lambda *x: jnp.stack(x), *[env.task_params(t.split("-")[1]) for t in lanes])
    return env, reset, step, lanes, params


def _dm_starts(task, n):
    dm_env = parity.load_dm_control(task, seed=1)
    qpos, tips, targets = [], [], []
    for _ in range(n):
        dm_env.reset()
        physics = dm_env.physics
        qpos.append(physics.data.qpos.copy())
        tips.append(physics.named.data.geom_xpos["fingertip", ["x", "z"]].copy())
        targets.append(physics.named.model.site_pos["target", ["x", "z"]].copy())
    return np.asarray(qpos), np.asarray(tips), np.asarray(targets)


@pytest.mark.parametrize("group", [SPIN, TURN], ids=["spin", "turn"])
def test_initial_state_distribution(group):
    """Joint angles as dm_control draws them (limited joints uniform in range, the hinge on the circle),
    redrawn while the fingertip penetrates the spinner (8.5% of draws), velocities zero; Turn's targets on
    the spinner's tip circle, at a uniform angle."""
    env, reset, _, lanes, params = _batch(group[0])
    fingertip = env.mj_model.geom("fingertip").id
    batches = [reset(jax.random.split(jax.random.key(i), len(lanes)), params) for i in range(400 // len(lanes))]
    qpos = np.concatenate([np.asarray(s.data.qpos) for s in batches])
    tips = np.concatenate([np.asarray(s.data.geom_xpos[:, fingertip][:, [0, 2]]) for s in batches])
    assert all(np.all(np.asarray(s.data.qvel) == 0) for s in batches)
    dm_qpos, dm_tips, dm_targets = _dm_starts(group[0], 2000)
    for j in range(3):  # means and spreads of the angles
        se = np.sqrt(qpos[:, j].var() / len(qpos) + dm_qpos[:, j].var() / len(dm_qpos))
        assert abs(qpos[:, j].mean() - dm_qpos[:, j].mean()) < 4 * se, j
        assert abs(qpos[:, j].std() - dm_qpos[:, j].std()) < 0.1 * dm_qpos[:, j].std(), j
    lo, hi = env.mj_model.jnt_range[:2, 0], env.mj_model.jnt_range[:2, 1]
    assert np.all(qpos[:, :2] >= lo) and np.all(qpos[:, :2] <= hi) and np.all(np.abs(qpos[:, 2]) <= np.pi)
    # The rejection: 13% of unfiltered draws put the fingertip within the spinner's reach, 5% of dm_control's
    # (collision-free) starts do; MJX must agree within 4 standard errors.
    near, dm_near = (np.mean(np.linalg.norm(t - HINGE, axis=1) < 0.16) for t in (tips, dm_tips))
    se = np.sqrt(dm_near * (1 - dm_near) * (1 / len(tips) + 1 / len(dm_tips)))
    assert abs(near - dm_near) < 4 * se, (near, dm_near)
    # Every MJX start is contact-free for MuJoCo itself.
    dm_env = parity.load_dm_control(group[0])
    for states in batches[:25]:
        for lane, task in enumerate(lanes):
            dm_env.reset()
            parity.copy_state_into(dm_env, env, states, lane)
            assert dm_env.physics.data.ncon == 0
    if group is TURN:
        targets = np.concatenate([np.asarray(s.task_state["target"]) for s in batches])
        np.testing.assert_allclose(np.linalg.norm(targets - HINGE, axis=1), 0.13, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(dm_targets - HINGE, axis=1), 0.13, atol=1e-6)
        angle = np.arctan2(targets[:, 0] - HINGE[0], targets[:, 1] - HINGE[1])
        hist = np.histogram(angle, bins=8, range=(-np.pi, np.pi))[0]
        expected = len(angle) / 8
        assert np.sum((hist - expected) ** 2 / expected) < 24.3, hist  # chi-square, 7 dof, p = 0.001


def _one_step_errors(env, step, states, lanes, actions, dm_envs):
    stepped = step(states, jnp.asarray(actions))
    obs_err, dm_rewards = 0.0, []
    for lane, task in enumerate(lanes):
        dm_env = dm_envs[task]
        dm_env.reset()
        parity.copy_state_into(dm_env, env, states, lane)
        ts = dm_env.step(env.ctrl_from_action(actions[lane]))
        obs_err = max(obs_err, float(np.max(np.abs(np.asarray(stepped.obs[lane])
                                                    - parity.flat_dm_observation(ts.observation)))))
        assert float(stepped.reward[lane]) == ts.reward, (task, float(stepped.reward[lane]), ts.reward)
        dm_rewards.append(ts.reward)
    return obs_err, dm_rewards


def test_turn_rewarded_states():
    """Starts with the tip inside the target (17% of turn_easy's, 7% of turn_hard's draws; random rollouts
    rarely reach them): one control step with zero action matches dm_control, reward 1 included."""
    env, reset, step, lanes, params = _batch(TURN[0])
    found = {t: [] for t in TURN}
    for i in range(60):
        states = reset(jax.random.split(jax.random.key(500 + i), len(lanes)), params)
        dist = np.asarray(states.obs[:, -1])  # dist_to_target, the last observation
        for lane, task in enumerate(lanes):
            if dist[lane] < -0.005 and len(found[task]) < 2:
                found[task].append(jax.tree.map(lambda x, lane=lane: x[lane], states))
    picked = [s for t in TURN for s in found[t]]
    assert len(picked) == len(lanes)
    states = jax.tree.map(lambda *x: jnp.stack(x), *picked)
    dm_envs = {t: parity.load_dm_control(t) for t in TURN}
    obs_err, dm_rewards = _one_step_errors(env, step, states, lanes, np.zeros((len(lanes), 2), np.float32),
                                           dm_envs)
    assert dm_rewards == [1.0] * len(lanes)
    assert obs_err < OBS_TOL, obs_err


def test_spin_rewarded_states():
    """The spinner turning faster than 15 rad/s the right way (reward 1), while the finger pushes it."""
    env, reset, step, lanes, params = _batch(SPIN[0])
    states = reset(jax.random.split(jax.random.key(7), len(lanes)), params)
    hinge = env.mj_model.joint("hinge").dofadr[0]
    qvel = states.data.qvel.at[:, hinge].set(jnp.array([-30.0, -25.0]))
    # The compiled step brings the edited velocities' dependents up to date (the first substep uses stale ones).
    states = step(states.replace(data=states.data.replace(qvel=qvel)), jnp.zeros((len(lanes), 2)))
    dm_envs = {SPIN[0]: parity.load_dm_control(SPIN[0])}
    rng = np.random.default_rng(0)
    obs_err, rewards = 0.0, []
    for _ in range(5):
        actions = rng.uniform(-1, 1, (len(lanes), 2)).astype(np.float32)
        err, dm_rewards = _one_step_errors(env, step, states, lanes, actions, dm_envs)
        obs_err, rewards = max(obs_err, err), rewards + dm_rewards
        states = step(states, jnp.asarray(actions))
    assert sum(rewards) >= 8, rewards
    assert obs_err < OBS_TOL, obs_err


@pytest.mark.parametrize("group", [SPIN, TURN], ids=["spin", "turn"])
def test_contact_states(group):
    """One-step parity from states where the fingertip touches the spinner (the touch sensors and the contact
    solve), found along a 150-step random-action rollout of the parity batch."""
    env, reset, step, lanes, params = _batch(group[0])
    states = reset(jax.random.split(jax.random.key(11), len(lanes)), params)
    dm_envs = {t: parity.load_dm_control(t) for t in group}
    rng = np.random.default_rng(1)
    obs_err, n_contact = 0.0, 0
    for _ in range(150):
        actions = rng.uniform(-1, 1, (len(lanes), 2)).astype(np.float32)
        stepped = step(states, jnp.asarray(actions))
        for lane, task in enumerate(lanes):
            dm_env = dm_envs[task]
            dm_env.reset()
            parity.copy_state_into(dm_env, env, states, lane)
            if dm_env.physics.data.ncon == 0:
                continue
            n_contact += 1
            ts = dm_env.step(env.ctrl_from_action(actions[lane]))
            obs_err = max(obs_err, float(np.max(np.abs(np.asarray(stepped.obs[lane])
                                                        - parity.flat_dm_observation(ts.observation)))))
            assert float(stepped.reward[lane]) == ts.reward
        states = stepped
    print(f"{group}: {n_contact} contact states, obs err {obs_err:.3g}")
    assert n_contact >= 5, n_contact
    assert obs_err < CONTACT_OBS_TOL, obs_err
