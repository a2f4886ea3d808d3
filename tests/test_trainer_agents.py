"""Every agent behind the trainer's one interface: tiny SAC, MBPO and SVG runs resume bit for bit, and periodic resets
re-initialise the agent while the replay is kept."""

import json
import os

import jax
import numpy as np
import optax
import pytest

from tests.test_trainer import TINY, _rows
from vecrl import config, run
from vecrl.checkpoint import Checkpoints
from vecrl.train import DomainProgram

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("memory_heavy")]


TINY_AGENTS = {
    "sac": {"hidden": 16, "batch_size": 8, "utd": 2},
    "mbpo": {"hidden": 16, "batch_size": 8, "utd": 2, "model_hidden": 16, "model_batch_size": 8, "retrain_every": 20,
             "model_train_steps": 5, "model_validation_rows": 16, "rollouts": 8, "model_capacity": 64},
    "svg": {"hidden": 16, "batch_size": 8, "utd": 1, "model_hidden": 16, "gru_layers": 1, "model_batch_size": 8,
            "model_updates": 1, "horizon": 2},
}


def tiny_agent(agent, **train):
    raw = json.loads(json.dumps(TINY))
    del raw["madtd"]
    raw.update({"agent": agent, agent: TINY_AGENTS[agent]})
    raw["train"].update(train)
    return config.spec_from_dict(raw)


def tiny_sac(**train):
    return tiny_agent("sac", **train)


@pytest.mark.parametrize("agent", sorted(TINY_AGENTS))  # MAD-TD's is in test_trainer.py
def test_run_resumes_bit_for_bit_across_resets(agent, tmp_path):
    # Resets at steps 30 and 60; the cut at step 40 holds an agent trained for 10 steps since the first reset (Adam
    # moments and, for MBPO and SVG, a model trained since step 20), and the resumed run trains 20 steps more before
    # the second reset. A resume that re-initialised anything, or replayed a random stream, would not match.
    spec = tiny_agent(agent, steps=80, reset_every=30)
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    summary = run.train(spec, full, progress=False)
    assert summary["status"] == "complete"
    rows = _rows(full)
    assert rows[-1]["loss/critic"] is not None and rows[-1]["temperature"] is not None
    assert rows[-1]["q_pred"] is not None and rows[-1]["td_error/train"] is not None
    if agent == "mbpo":  # the model's error on the trainer's held-out transitions, next to the critic's
        assert rows[-1]["model_error/train"] > 0 and rows[-1]["model_error/held_out"] > 0
    assert run.train(spec, resumed, progress=False, stop_after_chunks=2)["status"] == "interrupted"
    run.resume(resumed, progress=False)
    assert _rows(resumed) == rows


def _adam_count(opt_state):
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState)]
    return np.asarray(counts[0])


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_reset_comes_before_its_step_and_keeps_the_replay():
    with_resets = DomainProgram(tiny_sac(reset_every=40), ["cartpole-balance"])
    without = DomainProgram(tiny_sac(), ["cartpole-balance"])
    state, reference = with_resets.init(), without.init()
    for _ in range(2):
        state, out = with_resets.chunk(state)
        reference, _ = without.chunk(reference)
    # At step 40, where the run evaluates and checkpoints between chunks, no reset has run yet: the state is the
    # one a run without resets has (updates on steps 20..39, 2 per step).
    assert int(np.asarray(out["rejected_update"]).sum()) == 0
    _assert_trees_equal(state, reference)
    assert np.all(_adam_count(state.lanes.agent.opt_critic) == 20 * 2)
    trained = jax.tree.map(np.asarray, state.lanes.agent)
    state, _ = with_resets.chunk(state)
    # Step 40 began with the reset: Adam counts restarted (20 steps of UTD 2 since), the parameters are a new
    # draw, and the replay kept every transition.
    assert np.all(_adam_count(state.lanes.agent.opt_critic) == 20 * 2)
    fresh, before = jax.tree.leaves(state.lanes.agent.actor), jax.tree.leaves(trained.actor)
    assert all(not np.allclose(a, b, atol=1e-2) for a, b in zip(fresh, before) if a.ndim == 2)
    assert np.all(np.asarray(state.lanes.buffer.inserted) == 60)


def test_a_reset_on_the_last_step_never_happens(tmp_path):
    """reset_every == steps: the final evaluation, checkpoint and summary are those of the run without resets."""
    plain, reset = str(tmp_path / "plain"), str(tmp_path / "reset")
    run.train(tiny_sac(), plain, progress=False)
    run.train(tiny_sac(reset_every=60), reset, progress=False)
    assert _rows(reset) == _rows(plain)
    ckpts = [Checkpoints(os.path.join(d, "checkpoints"), 3) for d in (plain, reset)]
    (domain, tasks), = tiny_sac().domains().items()
    abstract = {"domains": {domain: DomainProgram(tiny_sac(), tasks).abstract_state()}}
    _assert_trees_equal(*(c.restore(60, abstract) for c in ckpts))
    for c in ckpts:
        c.close()


def test_spec_section_of_another_agent_is_refused():
    raw = json.loads(json.dumps(TINY))
    raw["sac"] = {"utd": 2}
    with pytest.raises(config.SpecError, match=r"sets \[sac\] keys but its agent is 'madtd'"):
        config.spec_from_dict(raw)
