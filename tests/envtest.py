"""Shared checks for the per-domain env tests. Each domain's test module calls these with its own tolerances;
compiled functions are shared across a module through `envs_mjx.parity`'s cache (one vmapped reset and one
vmapped step per domain, over all of its tasks at once)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import envs_mjx
from envs_mjx import parity


@functools.lru_cache(maxsize=None)
def parity_results(domain: str, per_task: int = 2, rollout_steps: int = 20):
    return {r.task: r for r in parity.one_step_parity(domain, per_task=per_task, rollout_steps=rollout_steps)}


@functools.lru_cache(maxsize=None)
def divergence_results(domain: str, per_task: int = 2, steps: int = 200):
    return {r.task: r for r in parity.trajectory_divergence(domain, per_task=per_task, steps=steps)}


def assert_one_step_parity(domain: str, obs_tol: float | dict[str, float], reward_tol: float, **kw):
    """`obs_tol` bounds every observation value, or (a dict) each observation key's values apart, for domains
    whose contact-force sensors differ by far more than their positions do."""
    for task, r in parity_results(domain, **kw).items():
        if isinstance(obs_tol, dict):
            assert set(obs_tol) == set(r.step_obs_err_by_key), f"{task}: tolerances for {sorted(obs_tol)}"
            for when, errs in (("reset", r.reset_obs_err_by_key), ("stepped", r.step_obs_err_by_key)):
                for key, err in errs.items():
                    assert err <= obs_tol[key], f"{task}: {when} {key} differs from dm_control by {err:.3g}"
        else:
            assert r.reset_obs_err <= obs_tol, f"{task}: reset obs differs from dm_control by {r.reset_obs_err:.3g}"
            assert r.step_obs_err <= obs_tol, f"{task}: stepped obs differs from dm_control by {r.step_obs_err:.3g}"
        assert r.step_reward_err <= reward_tol, f"{task}: reward differs from dm_control by {r.step_reward_err:.3g}"


def assert_divergence_bounded(domain: str, mean_reward_tol: float | dict[str, float], **kw):
    """`mean_reward_tol` bounds every task, or (a dict) each task apart."""
    for task, r in divergence_results(domain, **kw).items():
        tol = mean_reward_tol[task] if isinstance(mean_reward_tol, dict) else mean_reward_tol
        assert r.mean_abs_reward_diff <= tol, (
            f"{task}: mean |reward diff| over {r.steps} steps is {r.mean_abs_reward_diff:.3g} "
            f"(returns: mjx {r.return_mjx:.2f}, dm_control {r.return_dm:.2f})")


def assert_nan_contained(domain: str, per_task: int = 2):
    """A non-finite physics state is flagged, keeps the last finite data, and zeroes obs and reward."""
    # Same lanes as the parity checks (pass their per_task), so no new compilation.
    for tasks in parity.task_groups(domain):
        env, step, _, snapshots = parity.sample_states(domain, tasks, per_task, 0)
        states = snapshots[0]
        n = states.obs.shape[0]
        bad = states.replace(data=states.data.replace(qvel=states.data.qvel.at[0].set(jnp.nan)))
        out = step(bad, jnp.zeros((n, env.action_size)))
        assert bool(out.nan[0]) and not bool(out.nan[1])
        assert np.all(np.asarray(out.obs[0]) == 0) and float(out.reward[0]) == 0
        assert np.all(np.isfinite(np.asarray(out.obs))) and np.all(np.isfinite(np.asarray(out.reward)))
        again = step(out, jnp.zeros((n, env.action_size)))
        assert bool(again.nan[0]), "the NaN flag must stay set until reset"


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic D (the critical value at the 0.1% level for n + n draws is
    about 1.95 * sqrt(2 / n): 0.062 for 2000 + 2000)."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                               - np.searchsorted(b, grid, side="right") / len(b))))


def reset_qpos(domain: str, per_task: int, n_batches: int, seed: int = 1000) -> np.ndarray:
    """qpos of n_batches x (per_task x tasks) fresh resets through the domain's compiled parity batch (no new
    compilation when per_task is the parity checks'); every reset must start at rest."""
    out = []
    for i in range(n_batches):
        _, _, _, (states, *_) = parity.sample_states(domain, parity.list_tasks(domain), per_task, 0, seed=seed + i)
        out.append(np.asarray(states.data.qpos))
        assert np.all(np.asarray(states.data.qvel) == 0)
    return np.concatenate(out)


def dm_control_reset_qpos(task: str, n: int, seed: int = 0) -> tuple[np.ndarray, object]:
    """qpos after each of n dm_control resets of `task`, and dm_control's model."""
    dm_env = parity.load_dm_control(task, seed=seed)
    qpos = []
    for _ in range(n):
        dm_env.reset()
        qpos.append(dm_env.physics.data.qpos.copy())
    return np.asarray(qpos), dm_env.physics.model


def assert_randomized_joints_match(mjx_q: np.ndarray, dm_q: np.ndarray, model, fixed_joints: tuple[str, ...]):
    """dm_control's randomize_limited_and_rotational_joints on a planar model: `fixed_joints` (the root slides)
    stay at 0, limited joints are uniform in their range and unlimited hinges uniform in [-pi, pi]; means and
    spreads agree with dm_control's own draws (and with the uniform law) within sampling error."""
    fixed = [model.name2id(j, "joint") for j in fixed_joints]
    assert np.all(mjx_q[:, fixed] == 0) and np.all(dm_q[:, fixed] == 0)
    for j in range(model.njnt):
        if j in fixed:
            continue
        lo, hi = model.jnt_range[j] if model.jnt_limited[j] else (-np.pi, np.pi)
        q, name = mjx_q[:, model.jnt_qposadr[j]], model.id2name(j, "joint")
        assert np.all((q >= lo - 1e-6) & (q <= hi + 1e-6)), name
        sd = (hi - lo) / np.sqrt(12)
        se = sd * np.sqrt(2 / len(q))
        assert abs(q.mean() - dm_q[:, model.jnt_qposadr[j]].mean()) < 4 * se, name
        assert abs(q.std() - dm_q[:, model.jnt_qposadr[j]].std()) < 0.2 * sd, name
        assert abs(q.std() - sd) < 0.15 * sd, name


def assert_same_mean_and_spread(a, b, name: str):
    """Two samples of one quantity (MJX's and dm_control's draws): means within 4 standard errors, spreads
    within 10%."""
    se = np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 4 * se, (name, a.mean(), b.mean())
    assert abs(a.std() - b.std()) < 0.1 * b.std(), (name, a.std(), b.std())


@functools.lru_cache(maxsize=None)
def initial_draws(task: str, n: int, seed: int = 1):
    """keys, data and task_state of `n` fresh episodes from the task's `initialize` (no forward pass, so cheap to
    compile), for checking the initial-state distribution against dm_control's."""
    env = envs_mjx.make(task)
    init = env.jit(jax.vmap(lambda k: env.domain.initialize(env.mj_model, env.mjx_model, k, env.params)))
    keys = jax.random.split(jax.random.key(seed), n)
    data, task_state = init(keys)
    return keys, data, task_state


@functools.lru_cache(maxsize=None)
def agent_like_results(domain: str, per_task: int = 2):
    return parity.agent_like_results(domain, parity.list_tasks(domain), per_task)


def assert_agent_like_parity(domain: str, obs_tol: float | dict[str, float], reward_tol: float, per_task: int = 2):
    """`parity.agent_like_parity` on the JAX backend, on the lanes and step of the one-step checks with the same
    `per_task`, within `assert_agent_like_within`'s bounds."""
    assert_agent_like_within(agent_like_results(domain, per_task), obs_tol, reward_tol)


def assert_agent_like_within(results: dict[str, parity.AgentLikeResult], obs_tol: float | dict[str, float],
                             reward_tol: float, sensitivity_factor: float = 10.0):
    """After 1 and 2 control steps every observation value (`obs_tol`: one bound, or one per key) and the reward
    summed over the repeat (`reward_tol`) agree with dm_control up to the bound plus `sensitivity_factor` times
    dm_control's own difference from a start 1e-6 away, which is what float rounding alone becomes where a contact
    begins within the step. The running tasks' states must really be at speed (at least half a target of 3 m/s or
    more: random rollouts never get there, so the recipe must not quietly lose what it is for; at walking speeds
    the velocity noise dominates)."""
    for task, r in results.items():
        for repeat, errs in r.step_obs_err_by_key.items():
            for key, err in errs.items():
                tol = obs_tol[key] if isinstance(obs_tol, dict) else obs_tol
                bound = tol + sensitivity_factor * r.self_obs_err_by_key[repeat][key]
                assert err <= bound, (f"{task} x{repeat} ({r.speed:.1f} m/s): {key} differs from dm_control by "
                                      f"{err:.3g} (bound {bound:.3g})")
            bound = reward_tol + sensitivity_factor * r.self_reward_err[repeat]
            assert r.step_reward_err[repeat] <= bound, \
                f"{task} x{repeat}: reward differs from dm_control by {r.step_reward_err[repeat]:.3g} (bound {bound:.3g})"
        if parity.TARGET_SPEEDS[task] >= 3:
            assert r.speed >= 0.5 * parity.TARGET_SPEEDS[task], f"{task}: the states move at {r.speed:.2f} m/s"
