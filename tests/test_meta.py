"""The meta-networks: uniform channel weights at initialisation (f starts at zero,
docs/semantics.md), one lambda per example and pair, and a bad pair-weight type refused when the
module is built."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2t_jax.transfer import meta


def test_initial_channel_weights_are_uniform():
    networks = meta.MetaNetworks(pairs=((0, 0), (1, 0)), source_channels=(4, 6))
    pooled = (jnp.ones((2, 4)), jnp.ones((2, 6)))
    params = networks.init(jax.random.key(0), pooled)
    channel, pair = networks.apply(params, pooled)
    np.testing.assert_allclose(channel[0], np.full((2, 4), 0.25), rtol=1e-6)
    np.testing.assert_allclose(channel[1], np.full((2, 6), 1 / 6), rtol=1e-6)
    assert [p.shape for p in pair] == [(2,), (2,)]      # one lambda per example


def test_unknown_pair_weight_type_fails_when_built():
    with pytest.raises(ValueError, match="unknown pair_weight_type 'sigmoid'"):
        meta.MetaNetworks(pairs=((0, 0),), source_channels=(4,), pair_weight_type="sigmoid")
