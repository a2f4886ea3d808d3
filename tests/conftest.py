import gc

import jax
import pytest

import envs_mjx  # noqa: F401  (sets the XLA CPU flags before jax starts)
from envs_mjx.xla_flags import enable_compilation_cache

# Compiled MJX programs are reused across test runs on the same machine (first run: tens of seconds each).
enable_compilation_cache()


@pytest.fixture
def release_traces():
    """For tests of paper-size or dog programs: their traces and executables take gigabytes, and a test worker that
    kept all of them would starve the other worker of memory."""
    yield
    jax.clear_caches()
    gc.collect()
