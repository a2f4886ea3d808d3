"""HL-Gauss categorical value representation (Farebrother et al. 2024), as MAD-TD uses it.

A scalar target y becomes the probability mass of N(clip(y), sigma^2) in each of `num_bins` bins of equal
width on [-vmax, vmax] (renormalised to the support); a value is read out as the expectation over bin centres.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class HLGauss:
    vmax: float = 300.0
    num_bins: int = 151
    sigma_ratio: float = 0.75  # sigma = sigma_ratio * bin width

    def __post_init__(self):
        if self.vmax <= 0 or self.num_bins < 2 or self.sigma_ratio <= 0:
            raise ValueError(f"invalid HL-Gauss support: {self}")

    @property
    def bin_width(self) -> float:
        return 2 * self.vmax / (self.num_bins - 1)

    @property
    def sigma(self) -> float:
        return self.sigma_ratio * self.bin_width

    @property
    def centres(self) -> jax.Array:
        return jnp.linspace(-self.vmax, self.vmax, self.num_bins)

    @property
    def edges(self) -> jax.Array:
        w = self.bin_width
        return jnp.linspace(-self.vmax - w / 2, self.vmax + w / 2, self.num_bins + 1)

    def probs(self, y: jax.Array) -> jax.Array:
        """Target distribution for scalar targets y [...] -> [..., num_bins]."""
        y = jnp.clip(y, -self.vmax, self.vmax)[..., None]
        cdf = jax.scipy.special.ndtr((self.edges - y) / self.sigma)
        mass = cdf[..., 1:] - cdf[..., :-1]
        return mass / (cdf[..., -1:] - cdf[..., :1])

    def value(self, logits: jax.Array) -> jax.Array:
        """Expected value of the categorical distribution given by logits [..., num_bins] -> [...]."""
        return jnp.sum(jax.nn.softmax(logits, axis=-1) * self.centres, axis=-1)

    def cross_entropy(self, logits: jax.Array, target_probs: jax.Array) -> jax.Array:
        """Cross-entropy averaged over the bins (CE / num_bins, the reference's scale) -> [...]."""
        return -jnp.mean(target_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)
