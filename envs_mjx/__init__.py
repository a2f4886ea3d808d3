"""envs_mjx: the DeepMind Control Suite on MuJoCo XLA, as pure JAX functions.

    env = envs_mjx.make("walker-run", action_repeat=2)        # backend="warp" | "host": see envs_mjx/README.md
    state = env.reset(jax.random.key(0))
    state = env.step(state, action)
"""

from envs_mjx import xla_flags as _xla_flags  # must run before jax creates its CPU client

_xla_flags.apply()

import contextlib as _contextlib  # noqa: E402
import io as _io  # noqa: E402

# mujoco.mjx prints "Failed to import warp" when warp-lang is absent; only the warp backend needs it.
with _contextlib.redirect_stdout(_io.StringIO()):
    from mujoco import mjx as _mjx  # noqa: E402,F401

from envs_mjx.base import Env, EnvState  # noqa: E402
from envs_mjx.registry import (  # noqa: E402
    BACKENDS, DOMAINS, TASKS, available_domains, backend_problem, list_tasks, make)

__all__ = ["BACKENDS", "DOMAINS", "Env", "EnvState", "TASKS", "available_domains", "backend_problem", "list_tasks",
           "make"]
