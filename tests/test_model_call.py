"""The model's public call, as docs/models.md shows it: `model(tokens, positions=None, segment_ids=None)`."""

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


def test_the_bfloat16_kernel_cast_rounds_as_astype():
    # kernel_value casts float32 kernels in integer ops (XLA's TPU compiler would hoist a
    # convert out of the layer loop onto the whole stack): the bits must be astype's.
    import jax

    from jaxft.models.quantize import _to_bf16

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(50_000) * 10.0 ** rng.integers(-40, 39, 50_000)).astype(np.float32)
    x = np.concatenate([x, np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-45, 1.00390625, 1.01171875],
                                    np.float32)])
    got = np.asarray(jax.jit(_to_bf16)(x)).view(np.uint16)
    np.testing.assert_array_equal(got, np.asarray(jnp.asarray(x).astype(jnp.bfloat16)).view(np.uint16))
    assert np.isnan(np.asarray(_to_bf16(jnp.array([np.nan], jnp.float32)), np.float32)).all()
    grad = jax.grad(lambda w: jnp.sum(_to_bf16(w).astype(jnp.float32) * 3))(jnp.ones(4, jnp.float32))
    assert grad.dtype == jnp.float32 and np.all(np.asarray(grad) == 3)
