"""Shared checks for the per-domain env tests. Each domain's test module calls these with its own tolerances;
compiled functions are shared across a module through `envs_mjx.parity`'s cache (one vmapped reset and one
vmapped step per domain, over all of its tasks at once)."""

import functools

import jax.numpy as jnp
import numpy as np

from envs_mjx import parity


@functools.lru_cache(maxsize=None)
def parity_results(domain: str, per_task: int = 2, rollout_steps: int = 20):
    return {r.task: r for r in parity.one_step_parity(domain, per_task=per_task, rollout_steps=rollout_steps)}


@functools.lru_cache(maxsize=None)
def divergence_results(domain: str, per_task: int = 2, steps: int = 200):
    return {r.task: r for r in parity.trajectory_divergence(domain, per_task=per_task, steps=steps)}


def assert_one_step_parity(domain: str, obs_tol: float, reward_tol: float, **kw):
    for task, r in parity_results(domain, **kw).items():
        assert r.reset_obs_err <= obs_tol, f"{task}: reset obs differs from dm_control by {r.reset_obs_err:.3g}"
        assert r.step_obs_err <= obs_tol, f"{task}: stepped obs differs from dm_control by {r.step_obs_err:.3g}"
        assert r.step_reward_err <= reward_tol, f"{task}: reward differs from dm_control by {r.step_reward_err:.3g}"


def assert_divergence_bounded(domain: str, mean_reward_tol: float, **kw):
    for task, r in divergence_results(domain, **kw).items():
        assert r.mean_abs_reward_diff <= mean_reward_tol, (
            f"{task}: mean |reward diff| over {r.steps} steps is {r.mean_abs_reward_diff:.3g} "
            f"(returns: mjx {r.return_mjx:.2f}, dm_control {r.return_dm:.2f})")


def assert_nan_contained(domain: str):
    """A non-finite physics state is flagged, keeps the last finite data, and zeroes obs and reward."""
    # Same lanes as the parity checks, so no new compilation.
    env, step, _, (states,) = parity.sample_states(domain, parity.list_tasks(domain), 2, 0)
    n = states.obs.shape[0]
    bad = states.replace(data=states.data.replace(qvel=states.data.qvel.at[0].set(jnp.nan)))
    out = step(bad, jnp.zeros((n, env.action_size)))
    assert bool(out.nan[0]) and not bool(out.nan[1])
    assert np.all(np.asarray(out.obs[0]) == 0) and float(out.reward[0]) == 0
    assert np.all(np.isfinite(np.asarray(out.obs))) and np.all(np.isfinite(np.asarray(out.reward)))
    again = step(out, jnp.zeros((n, env.action_size)))
    assert bool(again.nan[0]), "the NaN flag must stay set until reset"
