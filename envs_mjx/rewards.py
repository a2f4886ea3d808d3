"""JAX port of `dm_control.utils.rewards.tolerance`, with all of its sigmoids.

Bounds, margin, sigmoid and value_at_margin are Python constants of a task (validated here, at trace time);
`x` may be any traced array.
"""

import math

import jax.numpy as jnp

_DEFAULT_VALUE_AT_MARGIN = 0.1
SIGMOIDS = (
    "gaussian", "hyperbolic", "long_tail", "reciprocal", "cosine", "linear", "quadratic", "tanh_squared",
)


def _sigmoids(x, value_at_1: float, sigmoid: str):
    """1 at x == 0, decreasing to `value_at_1` at |x| == 1, as dm_control defines each shape."""
    if sigmoid in ("cosine", "linear", "quadratic"):
        if not 0 <= value_at_1 < 1:
            raise ValueError(f"`value_at_1` must be nonnegative and smaller than 1, got {value_at_1}.")
    elif not 0 < value_at_1 < 1:
        raise ValueError(f"`value_at_1` must be strictly between 0 and 1, got {value_at_1}.")

    if sigmoid == "gaussian":
        scale = math.sqrt(-2 * math.log(value_at_1))
        return jnp.exp(-0.5 * (x * scale) ** 2)
    if sigmoid == "hyperbolic":
        scale = math.acosh(1 / value_at_1)
        return 1 / jnp.cosh(x * scale)
    if sigmoid == "long_tail":
        scale = math.sqrt(1 / value_at_1 - 1)
        return 1 / ((x * scale) ** 2 + 1)
    if sigmoid == "reciprocal":
        scale = 1 / value_at_1 - 1
        return 1 / (jnp.abs(x) * scale + 1)
    if sigmoid == "cosine":
        scale = math.acos(2 * value_at_1 - 1) / math.pi
        scaled_x = x * scale
        return jnp.where(jnp.abs(scaled_x) < 1, (1 + jnp.cos(jnp.pi * scaled_x)) / 2, 0.0)
    if sigmoid == "linear":
        scaled_x = x * (1 - value_at_1)
        return jnp.where(jnp.abs(scaled_x) < 1, 1 - scaled_x, 0.0)
    if sigmoid == "quadratic":
        scaled_x = x * math.sqrt(1 - value_at_1)
        return jnp.where(jnp.abs(scaled_x) < 1, 1 - scaled_x**2, 0.0)
    if sigmoid == "tanh_squared":
        scale = math.atanh(math.sqrt(1 - value_at_1))
        return 1 - jnp.tanh(x * scale) ** 2
    raise ValueError(f"Unknown sigmoid type {sigmoid!r}; valid: {', '.join(SIGMOIDS)}.")


def tolerance(x, bounds=(0.0, 0.0), margin=0.0, sigmoid="gaussian", value_at_margin=_DEFAULT_VALUE_AT_MARGIN):
    """1 when `x` lies inside `bounds`, decaying with distance outside them over `margin` (0 outside if 0).

    `bounds` and `margin` may be traced arrays (task parameters); then their validity is the caller's to
    ensure. Python numbers are checked exactly as dm_control checks them.
    """
    lower, upper = bounds
    if isinstance(lower, (int, float)) and isinstance(upper, (int, float)) and lower > upper:
        raise ValueError("Lower bound must be <= upper bound.")
    if isinstance(margin, (int, float)) and margin < 0:
        raise ValueError("`margin` must be non-negative.")
    x = jnp.asarray(x, jnp.float32)
    in_bounds = jnp.logical_and(lower <= x, x <= upper)
    if isinstance(margin, (int, float)) and margin == 0:
        return jnp.where(in_bounds, 1.0, 0.0).astype(jnp.float32)
    d = jnp.where(x < lower, lower - x, x - upper) / margin
    return jnp.where(in_bounds, 1.0, _sigmoids(d, value_at_margin, sigmoid)).astype(jnp.float32)
