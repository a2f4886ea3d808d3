"""The matmul FLOP counter that the GPU benchmark and the CPU warning rely on."""

import jax
import jax.numpy as jnp

from vecrl.flops import traced_matmul_flops, xla_cost_flops


def _flops(f, *args):
    return traced_matmul_flops(jax.jit(f).trace(*args))


def test_a_loop_free_program_counts_what_xla_counts():
    x, w = jnp.ones((8, 32)), jnp.ones((32, 16))
    f = lambda x, w: jnp.tanh(x @ w) @ w.T  # noqa: E731
    assert _flops(f, x, w) == 2 * 8 * 32 * 16 * 2
    # XLA's own count also has the tanh; matmuls are all but a few hundred of its FLOPs.
    xla = xla_cost_flops(jax.jit(f).lower(x, w).compile())
    assert xla is None or 2 * 8 * 32 * 16 * 2 <= xla < 2 * 8 * 32 * 16 * 2 + 8 * 16 * 50


def test_scans_multiply_by_their_trip_count_and_batching_is_in_the_shapes():
    x = jnp.ones((4, 4))
    step = lambda c, _: (c @ c, None)  # noqa: E731
    inner = lambda c, _: (jax.lax.scan(step, c, None, length=8)[0], None)  # noqa: E731
    nested = lambda x: jax.lax.scan(inner, x, None, length=3)[0]  # noqa: E731
    assert _flops(nested, x) == 3 * 8 * 2 * 4 ** 3
    assert _flops(jax.vmap(nested), jnp.ones((5, 4, 4))) == 5 * 3 * 8 * 2 * 4 ** 3
    fori = lambda x: jax.lax.fori_loop(0, 6, lambda i, c: c @ c, x)  # noqa: E731
    assert _flops(fori, x) == 6 * 2 * 4 ** 3


def test_a_cond_counts_its_costliest_branch():
    x = jnp.ones((4, 4))
    f = lambda p, x: jax.lax.cond(p, lambda: x @ x @ x, lambda: x @ x)  # noqa: E731
    assert _flops(f, True, x) == 2 * 2 * 4 ** 3
