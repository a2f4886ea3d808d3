"""Flax modules shared by agents: MLP blocks, SimNorm, and MAD-TD's heads."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def uniform_fan_in(key, shape, dtype=jnp.float32):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a Dense kernel [fan_in, fan_out]."""
    bound = 1.0 / jnp.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def dense(features: int, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, kernel_init=uniform_fan_in, bias_init=nn.initializers.zeros, name=name)


def simnorm(x: jax.Array, group: int = 8) -> jax.Array:
    """Softmax over consecutive groups of `group` features (a product of simplices)."""
    shape = x.shape
    if shape[-1] % group:
        raise ValueError(f"SimNorm group {group} does not divide feature size {shape[-1]}")
    return jax.nn.softmax(x.reshape(*shape[:-1], shape[-1] // group, group), axis=-1).reshape(shape)


def simnorm_log(x: jax.Array, group: int = 8) -> jax.Array:
    """Per-group log-softmax (log of `simnorm`)."""
    shape = x.shape
    return jax.nn.log_softmax(x.reshape(*shape[:-1], shape[-1] // group, group), axis=-1).reshape(shape)


class MLP(nn.Module):
    """Hidden blocks Dense -> LayerNorm -> Mish (MAD-TD's), or Dense -> `activation` without normalisation
    (SAC's ReLU networks), then an optional linear output layer."""

    hidden: Sequence[int]
    out: int | None = None
    layer_norm: bool = True
    activation: Callable[[jax.Array], jax.Array] = jax.nn.mish

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = dense(width)(x)
            x = self.activation(nn.LayerNorm()(x) if self.layer_norm else x)
        if self.out is not None:
            x = dense(self.out)(x)
        return x


class LatentHead(nn.Module):
    """MLP -> Dense -> LayerNorm: logits of a SimNorm latent (the encoder's and the latent dynamics' output)."""

    hidden: Sequence[int]
    latent: int

    @nn.compact
    def __call__(self, x):
        x = MLP(self.hidden)(x)
        return nn.LayerNorm()(dense(self.latent)(x))


class StackedMLP(nn.Module):
    """`copies` MLPs of one shape on stacked weights (parameters with a leading [copies] axis) applied to the same
    input, output [copies, ..., out]: each layer is one batched matmul instead of `copies` small ones (the twin
    heads of a critic), with each copy initialised from its own key."""

    copies: int
    hidden: Sequence[int]
    out: int | None = None
    layer_norm: bool = True
    activation: Callable[[jax.Array], jax.Array] = jax.nn.mish

    @nn.compact
    def __call__(self, x):
        # The input is broadcast to every copy rather than shared (in_axes=None): every layer, the first included,
        # is then a batched matmul with its output already in [copies, ...] order, with no transposes between
        # layers (about a quarter fewer kernels and bytes than sharing, measured on a CPU; see docs/benchmarks.md).
        stacked = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0, out_axes=0)
        x = jnp.broadcast_to(x, (self.copies, *x.shape))
        return stacked(self.hidden, self.out, self.layer_norm, self.activation, name="copies")(x)
