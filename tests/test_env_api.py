"""Registry and API behaviour that needs no MJX compilation."""

import jax
import jax.numpy as jnp
import pytest

import envs_mjx


def test_thirty_tasks_listed():
    tasks = envs_mjx.list_tasks()
    assert len(tasks) == 30 and len(set(tasks)) == 30
    assert "ball_in_cup-catch" in tasks and "swimmer-swimmer6" in tasks
    assert envs_mjx.list_tasks("walker") == ["walker-stand", "walker-walk", "walker-run"]


@pytest.mark.parametrize("name,suggestion", [("walker-rn", "walker-run"), ("cartpole-swingup-sparse",
                                                                           "cartpole-swingup_sparse"),
                                             ("ballincup-catch", "ball_in_cup-catch")])
def test_unknown_task_suggests_closest(name, suggestion):
    with pytest.raises(ValueError, match=suggestion):
        envs_mjx.make(name)


def test_bad_action_repeat():
    with pytest.raises(ValueError, match="action_repeat"):
        envs_mjx.make("cartpole-swingup", action_repeat=0)
    with pytest.raises(ValueError, match="divide"):
        envs_mjx.make("cartpole-swingup", action_repeat=3)


def test_wrong_action_shape_or_dtype_fails_at_trace_time():
    env = envs_mjx.make("cartpole-swingup", action_repeat=2)
    assert env.episode_length == 500
    state = jax.eval_shape(env.reset, jax.random.key(0))
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        jax.eval_shape(env.step, state, jnp.zeros((2,)))
    with pytest.raises(TypeError, match="floating"):
        jax.eval_shape(env.step, state, jnp.zeros((1,), jnp.int32))
    out = jax.eval_shape(env.step, state, jnp.zeros((1,)))
    assert out.obs.shape == (env.observation_size,) and out.obs.dtype == jnp.float32
