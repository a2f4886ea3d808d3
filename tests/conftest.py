import fcntl
import gc
import os

import jax
import pytest

import envs_mjx  # noqa: F401  (sets the XLA CPU flags before jax starts)
from envs_mjx.xla_flags import enable_compilation_cache

# The persistent compilation cache is opt-in for the suite (VECRL_TEST_XLA_CACHE=1: compiled programs are then
# reused across test runs on this machine). Off by default: in two full-suite runs a worker segfaulted inside
# jaxlib 0.10.1's CPU serialiser writing an entry (test_trainer_agents; a third crashed in the compiler itself, see
# `memory_heavy`), and every entry written is one more large allocation; a crashed worker fails the whole run.
if os.environ.get("VECRL_TEST_XLA_CACHE"):
    enable_compilation_cache()
else:
    os.environ["VECRL_XLA_CACHE"] = "off"  # also for the CLI, in this process and in the subprocesses tests start


@pytest.fixture
def release_traces():
    """For tests of paper-size or dog programs: their traces and executables take gigabytes, and a test worker that
    kept all of them would starve the other worker of memory."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def memory_heavy(tmp_path_factory):
    """One test at a time across the xdist workers: compiling humanoid's and dog's training chunks takes most of
    this 24 GiB machine, and in three full-suite runs the other worker segfaulted inside XLA's compiler
    (test_trainer_agents) while they compiled, as code does that does not check a failed allocation."""
    lock_path = tmp_path_factory.getbasetemp().parent / "memory-heavy.lock"  # shared by the run's workers
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
