"""`vecrl bench` builds a valid spec for every agent at both sizes (no compilation here)."""

import pytest

from vecrl import bench, config
from vecrl.agents import AGENTS


@pytest.mark.parametrize("agent", sorted(AGENTS))
@pytest.mark.parametrize("size", ["quickstart", "paper"])
def test_bench_spec_is_valid_for_every_agent(agent, size):
    base = config.load_spec("quickstart" if agent == "madtd" else f"{agent}-quickstart")
    for chunk_steps in (5, 50):
        spec = bench.bench_spec(base, 3, size, chunk_steps)  # validates, or raises SpecError
        assert spec.agent == agent and spec.seeds == (0, 1, 2) and spec.tasks == ("cartpole-balance",)
        cfg = spec.agent_config
        for key, value in bench.SIZES[agent][size].items():
            assert getattr(cfg, key) == value
        assert spec.train.warmup_steps % chunk_steps == 0
        assert spec.train.warmup_steps * (1 - spec.train.holdout_fraction) > cfg.batch_size
        if agent == "mbpo":
            assert spec.train.warmup_steps % cfg.retrain_every == 0
