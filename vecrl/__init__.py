"""vecrl: many-seed model-based off-policy RL on the accelerator."""

from envs_mjx import xla_flags as _xla_flags

_xla_flags.apply()  # before anything starts jax's CPU client
