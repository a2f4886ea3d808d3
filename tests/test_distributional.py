import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vecrl.distributional import HLGauss
from vecrl.networks import simnorm, simnorm_log

HL = HLGauss(vmax=300.0, num_bins=151, sigma_ratio=0.75)


def test_support_matches_spec():
    assert HL.bin_width == pytest.approx(4.0) and HL.sigma == pytest.approx(3.0)
    np.testing.assert_allclose(HL.centres, np.linspace(-300, 300, 151), atol=1e-4)
    assert HL.edges.shape == (152,) and float(HL.edges[0]) == pytest.approx(-302.0)


@pytest.mark.parametrize("y", [-299.0, -37.3, 0.0, 1.0, 123.456, 298.0])
def test_probs_sum_to_one_and_mean_recovers_target(y):
    p = HL.probs(jnp.asarray(y))
    chex.assert_shape(p, (151,))
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.asarray(p) >= 0)
    # Inside the support (away from the clipped edges) the expectation is the target.
    assert float(jnp.sum(p * HL.centres)) == pytest.approx(y, abs=0.05 if abs(y) < 290 else 1.5)


def test_targets_outside_support_are_clipped():
    np.testing.assert_allclose(HL.probs(jnp.asarray(1e4)), HL.probs(jnp.asarray(300.0)), atol=1e-7)
    np.testing.assert_allclose(HL.probs(jnp.asarray(-1e4)), HL.probs(jnp.asarray(-300.0)), atol=1e-7)


def test_value_of_target_logits_and_cross_entropy_scale():
    y = jnp.array([-50.0, 0.0, 75.0])
    p = HL.probs(y)
    logits = jnp.log(p + 1e-12)
    np.testing.assert_allclose(HL.value(logits), y, atol=0.05)
    ce = HL.cross_entropy(logits, p)
    chex.assert_shape(ce, (3,))
    # CE / num_bins: the entropy of the target divided by the number of bins.
    entropy = -jnp.sum(p * jnp.log(p + 1e-12), axis=-1)
    np.testing.assert_allclose(ce, entropy / 151, rtol=1e-4)


def test_simnorm_groups_are_simplices():
    x = jax.random.normal(jax.random.key(0), (5, 64))
    z = simnorm(x, 8)
    chex.assert_shape(z, (5, 64))
    np.testing.assert_allclose(z.reshape(5, 8, 8).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.exp(simnorm_log(x, 8)), z, rtol=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        simnorm(jnp.zeros((3, 10)), 8)
