import fcntl
import gc
import os

import jax
import pytest

import envs_mjx  # noqa: F401  (sets the XLA CPU flags before jax starts)
from envs_mjx.xla_flags import enable_compilation_cache

# The persistent compilation cache is opt-in for the suite (VECRL_TEST_XLA_CACHE=1: compiled programs are then
# reused across test runs on this machine). Off by default: CI starts from a clean machine, and each entry written
# is one more large allocation and set of memory mappings in a worker (see `release_programs_after_each_file`).
if os.environ.get("VECRL_TEST_XLA_CACHE"):
    enable_compilation_cache()
else:
    os.environ["VECRL_XLA_CACHE"] = "off"  # also for the CLI, in this process and in the subprocesses tests start


@pytest.fixture(scope="module", autouse=True)
def release_programs_after_each_file():
    """XLA's CPU runtime maps each compiled program's kernels into memory separately (a tiny training chunk and its
    evaluation: about 5,600 mappings; released, they are unmapped). A test worker that kept the programs of every
    file it ran neared Linux's limit of 65,530 mappings per process (vm.max_map_count) late in the suite and aborted
    inside XLA (measured: 64,553 mappings and 9.8 GB resident in the worker that died). The five worker crashes seen
    in full-suite runs were all in the same file, run late by a long-lived worker."""
    yield
    _release_programs()


@pytest.fixture
def release_traces():
    """For tests of paper-size or dog programs: their traces and executables take gigabytes, and a test worker that
    kept all of them would starve the other worker of memory."""
    yield
    _release_programs()


def _release_programs():
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def memory_heavy(tmp_path_factory):
    """One test at a time across the xdist workers: compiling humanoid's and dog's training chunks takes up to 8 GiB
    of this 24 GiB machine (with it, the suite's lowest free memory measured was 9 GB)."""
    lock_path = tmp_path_factory.getbasetemp().parent / "memory-heavy.lock"  # shared by the run's workers
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
