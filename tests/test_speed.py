"""What the speed work added: the update's cost as `vecrl bench` reports it, the whole-run projection's arithmetic,
checkpoints written while training goes on, evaluation without MPC, the matmul precision option, and a clear error
for a run folder whose state layout this version cannot restore."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_trainer import tiny
from vecrl import bench, run
from vecrl.agents.madtd import MadTDConfig, make_madtd
from vecrl.checkpoint import Checkpoints
from vecrl.train import DomainProgram

pytestmark = pytest.mark.slow


def test_update_cost_scaled_from_two_steps_equals_the_unrolled_count():
    """The bench compiles the update with 1 and 2 gradient steps and scales the difference to the spec's UTD; here
    that equals the analysis of the update compiled at UTD 3 with its loop unrolled."""
    spec = tiny(**{"madtd.utd": 3})
    scaled = bench.update_cost(spec)
    flops, bytes_accessed = bench._xla_cost(spec)  # pylint: disable=protected-access
    lanes = len(spec.seeds)
    assert scaled["update_gflop_per_agent_step"] == pytest.approx(flops / lanes / 1e9, rel=0.02, abs=2e-3)
    assert scaled["update_gbytes_per_agent_step"] == pytest.approx(bytes_accessed / lanes / 1e9, rel=0.05, abs=2e-3)
    # XLA counts every FLOP, the matmul floor only the products: a ratio of at least 1, and a step that reads its
    # agent's state at least once.
    assert scaled["flop_over_matmul_floor"] >= 1.0
    assert scaled["bytes_over_agent_state"] >= 1.0
    # Three gradient steps cost clearly more than one: the loop was unrolled (were its body counted once, the
    # figures at UTD 1, 2 and 3 would all be equal, and so would the two compared above).
    one = bench.update_cost(tiny(**{"madtd.utd": 1}))
    assert scaled["update_gflop_per_agent_step"] > 1.3 * one["update_gflop_per_agent_step"]


def test_spec_schedule_and_projection_by_hand():
    spec = tiny(**{"train.steps": 200, "train.warmup_steps": 50, "train.chunk_steps": 20, "train.eval_every": 60,
                   "train.checkpoint_every": 80})
    # chunks end at 20, 40, ..., 200: warm-up chunks are those ending at 20 and 40 (the one ending at 60 has updates
    # from step 50); evaluations at 60, 120, 180 and the last step 200; checkpoints at 80, 160 and 200.
    schedule = bench.spec_schedule(spec)
    assert schedule == {"warmup_chunks": 2, "update_chunks": 8, "evaluations": 4, "checkpoints": 3}
    per_domain = {"a": {"warmup_chunk_s": 1.0, "update_chunk_s": 10.0, "evaluation_s": 5.0},
                  "b": {"warmup_chunk_s": 2.0, "update_chunk_s": 20.0, "evaluation_s": 1.0}}
    # a: 2 + 80 + 20 = 102; b: 4 + 160 + 4 = 168; checkpoints 3 x 0.5
    assert bench.projected_seconds(schedule, per_domain, 0.5) == pytest.approx(271.5)


def test_projection_of_a_tiny_spec_runs_end_to_end(tmp_path):
    result = bench.project_spec(tiny(), str(tmp_path / "ckpt"))
    assert result["warmup_chunks"] == 1 and result["update_chunks"] == 2
    timings = result["per_domain"]["cartpole"]
    assert timings["update_chunk_s"] > 0 and timings["warmup_chunk_s"] > 0 and timings["evaluation_s"] > 0
    assert result["projected_run_s"] >= 2 * timings["update_chunk_s"]


def test_a_checkpoint_is_written_from_the_state_as_saved_while_the_next_chunk_runs(tmp_path):
    """The save returns before the files are written and the next chunk donates (frees) the saved arrays: the
    checkpoint must still hold the state as it was when saved, bit for bit."""
    program = DomainProgram(tiny(), ["cartpole-balance"])
    state, _ = program.chunk(program.init())
    state, _ = program.chunk(state)  # past warm-up: trained weights
    expected = jax.tree.map(lambda x: np.array(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), state)
    ckpt = Checkpoints(str(tmp_path / "ckpt"), keep=2)
    ckpt.save(40, state)
    state, _ = program.chunk(state)  # donates the saved arrays
    assert state.lanes.agent.critic is not None
    ckpt.close()
    restored = Checkpoints(str(tmp_path / "ckpt"), keep=2).restore(40, program.abstract_state())
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        np.testing.assert_array_equal(np.asarray(a), b)


def test_evaluation_without_mpc_acts_with_the_policy_while_training_still_plans():
    cfg = MadTDConfig(hidden=16, model_hidden=16, latent=16, num_bins=21, batch_size=8, mpc=True, mpc_samples=8,
                      mpc_elites=4, mpc_iterations=2)
    planning = make_madtd(cfg, 5, 2)
    policy_eval = make_madtd(dataclasses.replace(cfg, eval_mpc=False), 5, 2)
    no_mpc = make_madtd(dataclasses.replace(cfg, mpc=False), 5, 2)
    state = planning.init(jax.random.key(0))
    obs, key = jnp.linspace(-1, 1, 5), jax.random.key(1)
    np.testing.assert_array_equal(policy_eval.act(state, obs, key, False), no_mpc.act(state, obs, key, False))
    assert not np.allclose(planning.act(state, obs, key, False), no_mpc.act(state, obs, key, False))
    np.testing.assert_array_equal(policy_eval.act(state, obs, key, True), planning.act(state, obs, key, True))


def test_matmul_precision_reaches_the_program_and_the_cpu_refuses_what_it_cannot_compute(tmp_path):
    """The dot algorithm is set while the chunk is traced, so it is in the lowered program (bfloat16 products
    accumulated in float32); a CPU cannot compile TF32 or bfloat16 products, and says so before anything compiles."""
    texts = {}
    for precision in ("default", "bfloat16"):  # (jax refuses to lower TF32 for a CPU at all)
        program = DomainProgram(tiny(**{"train.matmul_precision": precision}), ["cartpole-balance"])
        texts[precision] = program.chunk.lower(program.abstract_state()).as_text()
    assert "algorithm" not in texts["default"]
    assert "lhs_precision_type = bf16, rhs_precision_type = bf16, accumulation_type = f32" in texts["bfloat16"]
    for precision in ("bfloat16", "tf32"):
        with pytest.raises(run.RunError, match=f"matmul_precision = '{precision}' needs an accelerator"):
            run.train(tiny(**{"train.matmul_precision": precision}), str(tmp_path / precision), progress=False)
        assert not os.path.exists(tmp_path / precision)


def test_a_run_whose_state_layout_changed_is_refused_with_a_clear_error(tmp_path):
    out = str(tmp_path / "run")
    run.train(tiny(**{"train.steps": 40}), out, progress=False, stop_after_chunks=1)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["state_layout"] = "0" * 16  # as if written by a version whose networks were laid out otherwise
    with open(path, "w") as f:
        json.dump(saved, f)
    with pytest.raises(run.RunError, match="laid out differently"):
        run.resume(out, progress=False)
