"""The model's public call, as README shows it: `model(tokens, positions=None, segment_ids=None)`."""

import jax.numpy as jnp
import numpy as np

from jaxft.models import create_model, get_preset


def test_the_public_call_takes_plain_keywords():
    cfg = get_preset("tiny").replace(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2)
    model = create_model(cfg, seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    positions = jnp.tile(jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None], (2, 1)).astype(jnp.int32)
    segment_ids = jnp.tile(jnp.array([1] * 5 + [2] * 7, jnp.int32)[None], (2, 1))
    packed = model(tokens, positions=positions, segment_ids=segment_ids)
    np.testing.assert_array_equal(packed, model(tokens, positions, segment_ids))
    # Defaults: positions 0..L-1 and one segment.
    whole = model(tokens, positions=jnp.tile(jnp.arange(12, dtype=jnp.int32)[None], (2, 1)),
                  segment_ids=jnp.ones((2, 12), jnp.int32))
    np.testing.assert_allclose(model(tokens), whole, atol=1e-6)
    # The second packed example sees only itself.
    np.testing.assert_allclose(packed[:, 5:], model(tokens[:, 5:]), atol=1e-5)
