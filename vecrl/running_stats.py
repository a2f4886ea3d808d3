"""Running per-feature mean and standard deviation (Welford's algorithm), one observation at a time, for agents
that standardise their inputs by everything they have collected (SAC-SVG's code does).

brax ships a vmappable equivalent (`brax.training.acme.running_statistics`), but importing it imports brax's
physics and its optional MuJoCo-Warp backend, and installing it adds five dependencies to every install and to the
offline bundle, for these few lines.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class RunningStats:
    count: jax.Array  # float32 []: observations added (exact up to 2^24)
    mean: jax.Array  # [D]
    m2: jax.Array  # [D]: sum of squared deviations from the running mean


def running_stats_init(size: int) -> RunningStats:
    return RunningStats(count=jnp.zeros(()), mean=jnp.zeros((size,)), m2=jnp.zeros((size,)))


def running_stats_add(stats: RunningStats, x: jax.Array, valid: jax.Array) -> RunningStats:
    """Add one observation `x` [D] where `valid`, else return `stats` unchanged (in value)."""
    count = stats.count + 1.0
    delta = x - stats.mean
    mean = stats.mean + delta / count
    added = RunningStats(count=count, mean=mean, m2=stats.m2 + delta * (x - mean))
    # A select rather than a weight: an invalid `x` may be non-finite, and 0 * inf is NaN.
    return jax.tree.map(lambda new, old: jnp.where(valid, new, old), added, stats)


def standardise(stats: RunningStats, x: jax.Array, std_min: float, std_max: float) -> jax.Array:
    """(x - mean) / std with the sample standard deviation clamped into [std_min, std_max] (which also covers the
    first observations, before a spread exists)."""
    std = jnp.sqrt(stats.m2 / jnp.maximum(stats.count - 1.0, 1.0))
    return (x - stats.mean) / jnp.clip(std, std_min, std_max)
