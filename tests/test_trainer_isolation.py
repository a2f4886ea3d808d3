"""Trainer isolation on a tiny spec: seed equivalence, NaN containment, run-folder and memory errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_trainer import tiny
from vecrl import report, run
from vecrl import train
from vecrl.train import DomainProgram

pytestmark = pytest.mark.slow


def test_seed_of_many_seed_run_equals_single_seed_run():
    many, single = DomainProgram(tiny(), ["cartpole-balance"]), DomainProgram(tiny(seeds=[1]), ["cartpole-balance"])
    s_many, s_single = many.init(), single.init()
    for _ in range(2):  # across the warm-up boundary: random actions, then policy actions and updates
        s_many, out_many = many.chunk(s_many)
        s_single, out_single = single.chunk(s_single)
    lane_many = jax.tree.map(lambda x: x[1], s_many.lanes)
    lane_single = jax.tree.map(lambda x: x[0], s_single.lanes)
    for a, b in zip(jax.tree.leaves(lane_many), jax.tree.leaves(lane_single)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        if jnp.issubdtype(a.dtype, jnp.floating):
            # Keys and counters are bitwise equal. XLA's CPU matmuls with a seed batch of 3 and of 1 may round
            # differently (measured: 2e-10 in parameters and 1.2e-7 in observations after 40 steps, 20 of them
            # acting with the learned policy), so floating-point state is compared to 1e-5.
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lane_keys_depend_on_the_task_name_not_its_place_in_the_registry(monkeypatch):
    def keys():
        return {(seed, task): tuple(np.asarray(jax.random.key_data(train.lane_key(seed, task))).tolist())
                for seed in (0, 1) for task in ("cartpole-balance", "walker-run")}

    before = keys()
    assert len(set(before.values())) == 4
    monkeypatch.setattr(train.envs_mjx, "TASKS", ["a-new-task", *reversed(train.envs_mjx.TASKS)])
    assert keys() == before


def test_nan_in_one_seed_is_contained():
    spec = tiny()
    program = DomainProgram(spec, ["cartpole-balance"])
    clean = program.init()
    copy = jax.tree.map(jnp.copy, clean)  # the chunk donates its input: `bad` must not share buffers with `clean`
    lanes = copy.lanes
    qvel = lanes.env.data.qvel.at[0, 0].set(jnp.nan)  # seed 0's physics blows up
    bad = copy.replace(lanes=lanes.replace(env=lanes.env.replace(data=lanes.env.data.replace(qvel=qvel))))
    clean_out, out = program.chunk(clean)[0], program.chunk(bad)
    state, outputs = out
    assert bool(outputs["env_nan"][:, 0, 0].all()) and not bool(outputs["env_nan"][:, 1:].any())
    assert np.all(np.isfinite(np.asarray(state.lanes.buffer.obs))), "bad transitions entered the buffer"
    assert int(state.lanes.buffer.inserted[0, 0]) == 0 and int(state.lanes.buffer.inserted[1, 0]) == 20
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[1:], state.lanes.buffer)),
                    jax.tree.leaves(jax.tree.map(lambda x: x[1:], clean_out.lanes.buffer))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _poison_seed_0(state):
    """Seed 0's target critic made NaN: every loss that reads it (TD targets, the actor's, the model's value-aware
    term) and so every gradient of seed 0 is NaN, while its other parameters stay finite; each of its optimiser
    steps must then be dropped, and nothing else of it, or of the other seeds, may change."""
    agent = state.lanes.agent
    target = jax.tree.map(lambda x: x.at[0].set(jnp.nan), agent.critic_target)
    return state.replace(lanes=state.lanes.replace(agent=agent.replace(critic_target=target)))


def test_a_non_finite_update_is_dropped_and_only_its_lane_flagged():
    program = DomainProgram(tiny(), ["cartpole-balance"])
    clean = program.init()
    bad = _poison_seed_0(jax.tree.map(jnp.copy, clean))  # the chunk donates its input: no shared buffers
    agent_0 = jax.tree.map(lambda x: np.asarray(x[0]), bad.lanes.agent)
    for _ in range(2):  # the second chunk (steps 20..39) updates on every step
        clean, _ = program.chunk(clean)
        bad, out = program.chunk(bad)
    rejected = np.asarray(out["rejected_update"])[:, :, 0]  # [step, seed]
    assert rejected[:, 0].all() and not rejected[:, 1:].any()
    _assert_trees_equal(jax.tree.map(lambda x: x[0], bad.lanes.agent), agent_0)  # every update of seed 0 dropped
    # per agent step: the encoder's and the model's steps, and UTD 2 x (critic, actor)
    assert np.all(np.asarray(out["metrics"]["updates_dropped"])[:, 0, 0] == 6)
    assert not np.asarray(out["metrics"]["updates_dropped"])[:, 1:].any()
    assert np.all(np.asarray(bad.lanes.buffer.inserted[0]) == 40)  # it still acts and collects
    _assert_trees_equal(jax.tree.map(lambda x: x[1:], bad.lanes), jax.tree.map(lambda x: x[1:], clean.lanes))


def test_a_rejecting_lane_is_flagged_in_metrics_summary_and_report(tmp_path, monkeypatch):
    fresh_init = DomainProgram.init
    monkeypatch.setattr(DomainProgram, "init", lambda self: _poison_seed_0(fresh_init(self)))
    out = str(tmp_path / "run")
    summary = run.train(tiny(), out, progress=False)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert {(r["step"], r["seed"]): r["rejected_updates"] for r in rows if r["step"] > 20} == {
        (step, seed): 20 if seed == 0 else 0 for step in (40, 60) for seed in (0, 1, 2)}
    assert summary["tasks"]["cartpole-balance"]["flagged_seeds"] == [0]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["tasks"]["cartpole-balance"]["flagged_seeds"] == [0]
    text = open(report.make_report([out], str(tmp_path / "report"), reps=200)["report"]).read()
    assert "Flagged seeds (a NaN in the physics or a rejected update): tiny: [0]" in text


def test_every_domains_program_is_dispatched_before_any_output_is_fetched(tmp_path, monkeypatch):
    """Two domains, two programs: on an accelerator, fetching one domain's outputs before dispatching the other's
    chunk would make each wait for the other's host round-trip."""
    events = []
    compile_programs, device_get = run.compile_programs, jax.device_get

    def recorded(kind, domain, program):
        def call(state):
            events.append((kind, domain))
            return program(state)
        return call

    def compile_recorded(programs, states, say):
        compiled, flops = compile_programs(programs, states, say)
        return {d: (recorded("chunk", d, c), recorded("evaluate", d, e)) for d, (c, e) in compiled.items()}, flops

    monkeypatch.setattr(run, "compile_programs", compile_recorded)
    monkeypatch.setattr(jax, "device_get", lambda tree: (events.append(("fetch",)), device_get(tree))[1])
    spec = tiny(**{"tasks": ["cartpole-balance", "pendulum-swingup"], "train.steps": 40})
    assert run.train(spec, str(tmp_path / "run"), progress=False)["status"] == "complete"
    chunks = [("chunk", "cartpole"), ("chunk", "pendulum"), ("fetch",)]
    evaluations = [("evaluate", "cartpole"), ("evaluate", "pendulum"), ("fetch",)]
    assert events[:9] == chunks + chunks + evaluations, events


def test_unported_task_fails_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(run.envs_mjx, "available_domains", lambda: ["acrobot"])
    with pytest.raises(run.RunError, match="cartpole-balance: not ported"):
        run.train(tiny(), str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_run_folder_and_memory_errors_before_compiling(tmp_path):
    out_full = tmp_path / "existing"
    out_full.mkdir()
    (out_full / "config.json").write_text(json.dumps({"spec": tiny().to_dict(), "fingerprint": tiny().fingerprint()}))
    out_full = str(out_full)
    with pytest.raises(run.RunError, match="already holds a run"):
        run.train(tiny(), out_full, progress=False)
    with pytest.raises(run.RunError, match="GiB"):
        run.train(tiny(**{"train.capacity": 4_000_000_000, "seeds": 10}), str(tmp_path / "huge"), progress=False)
    assert not (tmp_path / "huge").exists()  # a run that cannot fit leaves no folder behind
    with pytest.raises(run.RunError, match="different spec"):
        run.resume(out_full, progress=False, spec=tiny(**{"madtd.alpha": 0.1}))
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
            target = str(tmp_path / "file" / "run")
            (tmp_path / "file").write_text("x")
        else:
            target = str(locked / "run")
        with pytest.raises(run.RunError, match="cannot write"):
            run.train(tiny(), target, progress=False)
    finally:
        os.chmod(locked, 0o700)
