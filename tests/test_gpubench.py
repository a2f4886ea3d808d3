"""`vecrl bench --suite gpu`: the prepared accelerator benchmark, run at the quickstart's sizes on the CPU."""

import json
import math
import os

import pytest

from vecrl import cli, gpubench


def test_projection_of_the_hard_suite_from_measured_figures():
    # 10-seed humanoid chunk: 30 ms per agent step with updates, 10 ms of it the warm-up (env) part.
    training = {10: {"update_ms_per_agent_step": 30.0, "warmup_ms_per_agent_step": 10.0}}
    # env agent steps/s summed over the batch: 1,000 at batch 10 and 7,000 at 70 (linear: 10 ms per batched step)
    physics = {("humanoid", 10): 1000.0, ("humanoid", 70): 7000.0, ("dog", 10): 500.0, ("dog", 70): 500.0 * 7}
    out = gpubench.project_hard_suite(physics, training)
    # humanoid: 3 tasks -> 3 x 20 ms of updates + 30 lanes / 3,000 steps/s = 70 ms per agent step, 1M steps
    assert out["hours_per_program"]["humanoid"] == pytest.approx(0.070 * 1e6 / 3600, abs=0.01)
    # dog: 4 tasks -> 4 x 20 ms + 40 / 2,000 = 100 ms
    assert out["hours_per_program"]["dog"] == pytest.approx(0.100 * 1e6 / 3600, abs=0.01)
    assert out["hours_one_device_sequential"] == pytest.approx(0.170 * 1e6 / 3600, abs=0.01)
    assert gpubench.project_hard_suite({("humanoid", 10): 1.0}, training) is None  # a domain left unmeasured


@pytest.mark.slow
def test_gpu_suite_runs_at_quickstart_size_and_never_overwrites(tmp_path):
    out = str(tmp_path / "bench")
    assert cli.main(["bench", "--suite", "gpu", "--out", out, "--size", "quickstart"]) == 0
    with open(os.path.join(out, "gpu-bench.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "device" and kinds[-1] == "done"
    physics = [r for r in rows if r["kind"] == "physics"]
    assert {(r["physics"], r["batch"]) for r in physics} == {("jax", 10), ("jax", 70), ("host", 10), ("host", 70)}
    assert all(r["rewards_finite"] for r in physics)
    madtd = {r["seeds"]: r for r in rows if r["kind"] == "madtd"}
    assert set(madtd) == {1, 10}
    for r in madtd.values():
        assert r["rejected_updates"] == 0
        assert 0 < r["warmup_ms_per_agent_step"] and 0 < r["update_ms_per_agent_step"]
        assert r["agent_steps_per_s_total"] == pytest.approx(r["lanes"] * r["agent_steps_per_s_per_seed"], rel=0.01)
        # quickstart MAD-TD: per seed, the matmuls of one agent step are at least the critic's batch-64 GEMMs
        assert r["matmul_gflop_per_agent_step_per_seed"] > 2 * 64 * 64 * 64 / 1e9
        assert math.isfinite(r["achieved_matmul_tflop_per_s"])
    cost = next(r for r in rows if r["kind"] == "madtd_update_cost")
    assert cost["update_gflop_per_agent_step"] >= cost["update_matmul_gflop_per_agent_step"] > 0
    assert cost["update_tflop_per_s"] > 0 and cost["bytes_over_agent_state"] >= 1
    ratio = next(r for r in rows if r["kind"] == "seed_scaling")["value"]
    assert ratio == pytest.approx(madtd[10]["agent_steps_per_s_total"] / madtd[1]["agent_steps_per_s_total"], rel=0.01)
    # a second run into the same folder is refused before measuring, and the first run's file is kept
    assert cli.main(["bench", "--suite", "gpu", "--out", out, "--size", "quickstart"]) == 2
    with open(os.path.join(out, "gpu-bench.jsonl")) as f:
        assert len(f.readlines()) == len(rows)
