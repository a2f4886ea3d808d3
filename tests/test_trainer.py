"""The fused trainer end to end on a tiny spec: equivalences, resume, faults, bad input."""

import contextlib
import json
import logging
import os

import jax
import pytest
from jax._src import compilation_cache

from envs_mjx.xla_flags import enable_compilation_cache
from vecrl import config, run
from vecrl.config import SpecError

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny", "agent": "madtd", "tasks": ["cartpole-balance"], "seeds": 3,
    "train": {"steps": 60, "warmup_steps": 20, "chunk_steps": 20, "capacity": 64, "eval_every": 40,
              "eval_episodes": 1, "checkpoint_every": 20, "action_repeat": 2, "diagnostic_rows": 16},
    "madtd": {"hidden": 16, "model_hidden": 16, "latent": 16, "batch_size": 8, "utd": 2, "alpha": 0.25, "mpc_samples": 8,
              "mpc_elites": 4},
}
TIMING = ("steps_per_s", "wall_time")


def tiny(**overrides):
    raw = json.loads(json.dumps(TINY))
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (raw[section] if section else raw)[name] = value
    return config.spec_from_dict(raw)


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


@contextlib.contextmanager
def compile_log():
    """The messages jax logs about compiling (and about hits in the persistent compilation cache) meanwhile."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        yield records
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(handler)


@pytest.fixture
def xla_cache(tmp_path):
    """The persistent compilation cache, as the CLI enables it, in a folder of this test's own (the suite keeps it
    off elsewhere: see conftest)."""
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    enable_compilation_cache(str(tmp_path / "xla"))
    compilation_cache.reset_cache()  # jax decides once per process whether a cache is in use
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "full")
    return out, run.train(tiny(), out, progress=False)


def test_run_completes_with_metrics_summary_and_config(full_run):
    out, summary = full_run
    assert summary["status"] == "complete" and summary["step"] == 60
    rows = _rows(out)
    assert len(rows) == 3 * 3  # chunks x seeds
    assert {r["seed"] for r in rows} == {0, 1, 2}
    assert [r["step"] for r in rows[::3]] == [20, 40, 60]
    assert rows[0]["loss/critic"] is None and rows[-1]["loss/critic"] is not None  # updates start after warm-up
    assert all(r["eval_return"] is not None for r in rows if r["step"] in (40, 60))
    # Each evaluation also logs the critic diagnostics (held-out losses are None while a seed's held-out buffer is
    # empty); steps without an evaluation carry none of them.
    for r in rows:
        evaluated = r["step"] in (40, 60)
        for key in ("q_pred", "q_mc", "td_error/train"):
            assert (r.get(key) is not None) == evaluated, (key, r)
        assert evaluated or r.get("td_error/held_out") is None
    for name in ("config.json", "summary.json", "checkpoints"):
        assert os.path.exists(os.path.join(out, name))


def test_resume_equals_uninterrupted(full_run, tmp_path, xla_cache):  # pylint: disable=unused-argument
    out_full, _ = full_run
    out = str(tmp_path / "resumed")
    # Cut after 20 agent steps of updates (warm-up ends at step 20): the checkpoint holds trained weights and Adam
    # moments, so a resume that re-initialised any of them, or lost a random stream, would not match.
    first = run.train(tiny(), out, progress=False, stop_after_chunks=2)
    assert first["status"] == "interrupted" and first["step"] == 40
    assert all(r["loss/critic"] is not None for r in _rows(out) if r["step"] == 40)
    # A killed, half-written checkpoint must never be picked over the last good one.
    os.makedirs(os.path.join(out, "checkpoints", "50.orbax-checkpoint-tmp-1234"))
    with compile_log() as records:
        resumed = run.resume(out, progress=False)
    assert resumed["status"] == "complete"
    assert _rows(out) == _rows(out_full)
    # The restored state is placed as a fresh one is, so the programs compiled before the interruption (here, in
    # the persistent compilation cache) serve the resumed run instead of being rebuilt.
    for name in ("jit__chunk", "jit__evaluate"):
        assert any(f"cache hit for '{name}'" in m for m in records), [m for m in records if name in m][:3]


@pytest.mark.parametrize("change,message", [
    ({"agent": "dreamer"}, "unknown agent"),
    ({"tasks": ["walker-rn"]}, "walker-run"),
    ({"train.stepz": 3}, "Did you mean 'steps'"),
    ({"train.steps": -20}, "train.steps"),
    ({"train.steps": "many"}, "integer"),
    ({"madtd.alpha": 1.5}, "alpha"),
    ({"madtd.batch_size": 512}, "larger than the replay buffer"),
    ({"seeds": 0}, "seeds"),
    ({"train.eval_every": 30}, "multiple of train.chunk_steps"),
    ({"train.physics": "mujoco"}, "train.physics must be one of"),
])
def test_bad_spec_fails_before_compiling(change, message):
    with pytest.raises(SpecError, match=message):
        tiny(**change)


