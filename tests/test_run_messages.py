"""What `vecrl train` tells the person at the terminal: the device, the projected wall time, and a warning before a
spec sized for an accelerator runs on a CPU. No compiling here."""

import pytest

from tests.test_trainer import tiny
from vecrl import config, run


def test_projection_is_said_after_the_first_chunk_with_updates_and_again_when_the_rate_changes():
    spec = tiny(**{"train.steps": 100, "train.warmup_steps": 20, "train.chunk_steps": 10})
    said = []
    projection = run.Projection(spec)
    projection.chunk_done(10, 0.01, said.append)  # warm-up chunks: random actions, not the steady rate
    projection.chunk_done(20, 0.01, said.append)
    assert not said
    projection.chunk_done(30, 2.0, said.append)  # first chunk with updates: 5 agent steps/s, 70 steps left
    assert len(said) == 1 and "5.00 agent steps/s" in said[0] and "14 s" in said[0]
    projection.chunk_done(40, 2.5, said.append)  # within a factor of 2: nothing new
    assert len(said) == 1
    projection.chunk_done(50, 10.0, said.append)  # 4x slower: said again
    assert len(said) == 2 and "1.00 agent steps/s" in said[1]


def test_an_accelerator_sized_spec_on_the_cpu_is_warned_about(monkeypatch):
    monkeypatch.setattr(run, "host_matmul_flops_per_s", lambda: 1e11)
    spec = config.load_spec("madtd-hard")
    said = []
    # 10 seeds x 1 task at ~94 GFLOP per agent step and seed: 9.4e11 FLOP per step, 1e6 steps, at 1e11 FLOP/s
    run.warn_if_accelerator_sized(spec, 9.4e11, 0, said.append)
    assert len(said) == 1 and "sized for an accelerator" in said[0] and "109 days" in said[0]
    said.clear()
    run.warn_if_accelerator_sized(config.load_spec("quickstart"), 1e6, 0, said.append)  # 16k steps: seconds
    assert not said


@pytest.mark.parametrize("seconds, text", [(42, "42 s"), (600, "10 min"), (3 * 3600, "3.0 h"),
                                           (145 * 86400, "145 days")])
def test_durations_read_as_a_person_would_say_them(seconds, text):
    assert run.format_duration(seconds) == text
