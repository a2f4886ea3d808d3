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
from vecrl.train import DomainProgram

pytestmark = pytest.mark.slow


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
def test_run_resumes_bit_for_bit(agent, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    summary = run.train(tiny_agent(agent), full, progress=False)
    assert summary["status"] == "complete"
    rows = _rows(full)
    assert rows[-1]["loss/critic"] is not None and rows[-1]["temperature"] is not None
    assert rows[-1]["q_pred"] is not None and rows[-1]["td_error/train"] is not None
    assert run.train(tiny_agent(agent), resumed, progress=False, stop_after_chunks=1)["status"] == "interrupted"
    run.resume(resumed, progress=False)
    assert _rows(resumed) == rows


def _adam_count(opt_state):
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState)]
    return np.asarray(counts[0])


def test_reset_reinitialises_the_agent_and_keeps_the_replay():
    # Warm-up ends at step 20; the reset falls on the last step of the second chunk (step 40).
    program = DomainProgram(tiny_sac(reset_every=40), ["cartpole-balance"])
    state = program.init()
    initial_agent = jax.tree.map(np.asarray, state.lanes.agent)
    for _ in range(2):
        state, out = program.chunk(state)
    # Updates ran on steps 21..39, then the reset replaced the agent by a fresh one: Adam's counts are back at 0
    # and the parameters are a new draw, unlike the initial ones.
    assert int(np.asarray(out["rejected_update"]).sum()) == 0
    assert np.all(_adam_count(state.lanes.agent.opt_critic) == 0)
    fresh, first = jax.tree.leaves(state.lanes.agent.actor), jax.tree.leaves(initial_agent.actor)
    assert any(not np.allclose(a, b) for a, b in zip(fresh, first))
    assert np.all(np.asarray(state.lanes.buffer.inserted) == 40)
    state, _ = program.chunk(state)
    assert np.all(_adam_count(state.lanes.agent.opt_critic) == 20 * 2)  # 20 agent steps of UTD 2


def test_spec_section_of_another_agent_is_refused():
    raw = json.loads(json.dumps(TINY))
    raw["sac"] = {"utd": 2}
    with pytest.raises(config.SpecError, match=r"sets \[sac\] keys but its agent is 'madtd'"):
        config.spec_from_dict(raw)
