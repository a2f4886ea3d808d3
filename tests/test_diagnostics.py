"""The critic diagnostics the trainer logs at each evaluation: value overestimation against Monte-Carlo
returns, and the TD loss on training, held-out and on-policy held-out transitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_trainer import tiny
from vecrl.train import DomainProgram, overestimation_pair


def test_overestimation_pair_uses_states_far_from_the_time_limit():
    rewards = np.ones((10, 2), np.float32)
    values = np.arange(20, dtype=np.float32).reshape(10, 2)
    q_pred, q_mc = overestimation_pair(jnp.asarray(rewards), jnp.asarray(values), gamma=0.5)
    # 0.5 ** 7 < 0.01 <= 0.5 ** 6: the first 10 - 7 = 3 states; from step t the return is sum_{k < 10 - t} 0.5 ** k.
    returns = [sum(0.5 ** k for k in range(10 - t)) for t in range(3)]
    assert float(q_mc) == pytest.approx(np.mean(returns))
    assert float(q_pred) == pytest.approx(values[:3].mean())
    # A horizon longer than the episode still uses the first state.
    q_pred, q_mc = overestimation_pair(jnp.asarray(rewards), jnp.asarray(values), gamma=0.99)
    assert float(q_pred) == pytest.approx(values[0].mean())
    assert float(q_mc) == pytest.approx(sum(0.99 ** k for k in range(10)))


@pytest.mark.slow
def test_held_out_states_restore_and_feed_the_generalisation_losses():
    program = DomainProgram(tiny(**{"train.holdout_fraction": 0.5}), ["cartpole-balance"])
    state = program.init()
    generalisation = jax.jit(program._generalisation)  # pylint: disable=protected-access
    empty = generalisation(state.lanes, state.step)
    assert np.all(np.isnan(empty["td_error/held_out"])) and np.all(np.isnan(empty["td_error/on_policy"]))

    for _ in range(2):  # past warm-up: held-out rows from random and from policy actions
        state, _ = program.chunk(state)
    held = state.lanes.held_out
    inserted = np.asarray(held.inserted)  # [seed, task]; size() is for an unbatched lane
    assert inserted.min() >= 4, inserted
    # Restoring a stored physics state and replaying the stored action gives back the stored transition.
    rows = jax.tree.map(lambda x: x[:, 0, :4].reshape((x.shape[0] * 4, *x.shape[3:])), held.data)
    restored = jax.vmap(program.env.restore, in_axes=(0, 0, 0, 0, None))(
        rows["qpos"], rows["qvel"], rows["act"], rows["task_state"], program.env.params)
    np.testing.assert_allclose(restored.obs, rows["obs"], atol=1e-6)
    stepped = jax.vmap(program.env.step)(restored, rows["action"])
    np.testing.assert_allclose(stepped.reward, rows["reward"], atol=1e-5)
    np.testing.assert_allclose(stepped.obs, rows["next_obs"], atol=1e-5)

    losses = generalisation(state.lanes, state.step)
    for key in ("td_error/train", "td_error/held_out", "td_error/on_policy"):
        assert np.all(np.isfinite(np.asarray(losses[key]))) and np.all(np.asarray(losses[key]) > 0), key
    # On-policy rows take the target policy's actions, not the stored ones: their loss differs.
    assert not np.allclose(losses["td_error/held_out"], losses["td_error/on_policy"])
