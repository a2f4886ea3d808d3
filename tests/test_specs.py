"""Every shipped spec starts: it resolves, every domain's run state is shaped, and the programs of the papers'
comparisons lower (trace into XLA without compiling) at their real sizes. `vecrl check all` lowers every spec."""

import pytest

from vecrl import config, run
from vecrl.train import DomainProgram

SPECS = config.shipped_specs()
# One spec per agent and per set of domains the shipped specs use (the others vary hyperparameters of these).
LOWERED = ["madtd-hard", "sac-dyna", "mbpo-dyna", "svg-h2", "quickstart", "sac-quickstart", "mbpo-quickstart",
           "svg-quickstart"]


def test_the_lowered_specs_cover_every_agent_and_domain_of_the_shipped_specs():
    assert set(LOWERED) <= set(SPECS)
    used = {(s.agent, d) for s in map(config.load_spec, SPECS) for d in s.domains()}
    covered = {(s.agent, d) for s in map(config.load_spec, LOWERED) for d in s.domains()}
    assert used == covered


@pytest.mark.parametrize("name", SPECS)
def test_every_shipped_spec_resolves_and_its_state_is_shaped(name):
    spec = config.load_spec(name)
    for domain, tasks in spec.domains().items():
        state = DomainProgram(spec, tasks).abstract_state()
        assert state.lanes.episode_return.shape == (len(spec.seeds), len(tasks)), domain
        assert state.lanes.buffer.reward.shape == (len(spec.seeds), len(tasks), spec.train.capacity), domain
        assert run.tree_bytes(state) > 0


@pytest.mark.parametrize("name", LOWERED)
def test_spec_programs_lower(name, release_traces):  # pylint: disable=unused-argument
    spec = config.load_spec(name)
    result = run.check(spec)
    assert set(result["domains"]) == set(spec.domains())
    for domain in result["domains"].values():
        assert domain["state_bytes"] > 0
