"""A real training chunk of tiny-network MAD-TD on every domain the shipped specs use, dog and humanoid included:
the compiled program runs the physics, fills the replay, updates the agent and stays finite. (cartpole, the
quickstart's domain, runs end to end in test_trainer.py.) Slow: compiling a dog chunk takes minutes on a CPU."""

import jax
import numpy as np
import pytest

from tests.test_trainer import tiny
from vecrl import config
from vecrl.train import DomainProgram

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("memory_heavy")]

DOMAINS = sorted({d for name in config.shipped_specs() for d in config.load_spec(name).domains()} - {"cartpole"})


def test_the_domains_are_those_of_the_hard_suite_and_the_baselines():
    assert {"humanoid", "dog"} <= set(DOMAINS)


@pytest.mark.parametrize("domain", DOMAINS)
def test_a_tiny_chunk_trains_on(domain, release_traces):  # pylint: disable=unused-argument
    task = next(t for name in config.shipped_specs() for t in config.load_spec(name).tasks
                if t.split("-")[0] == domain)
    spec = tiny(**{"tasks": [task], "seeds": 2, "train.steps": 24, "train.warmup_steps": 16, "train.chunk_steps": 8,
                   "train.eval_every": 0, "train.checkpoint_every": 0})
    program = DomainProgram(spec, [task])
    state = program.init()
    for _ in range(2):  # random actions, no updates
        state, warm = program.chunk(state)
        assert not np.asarray(warm["env_nan"]).any()
    before = jax.tree.map(np.asarray, state.lanes.agent)
    state, out = program.chunk(state)  # updates from the first step on
    assert int(state.step) == 24
    assert not np.asarray(out["env_nan"]).any()
    assert not np.asarray(out["rejected_update"]).any()
    for name, values in out["metrics"].items():
        assert np.all(np.isfinite(np.asarray(values))), name
    buffer, held_out = state.lanes.buffer, state.lanes.held_out
    np.testing.assert_array_equal(np.asarray(buffer.inserted), 24)  # every step's transition was stored
    # ... and is either sampleable for training or held out, never both
    np.testing.assert_array_equal(np.asarray(buffer.indexed) + np.asarray(held_out.inserted), 24)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                                           state.lanes.agent))
    assert any(changed), "the update chunk left the agent unchanged"
