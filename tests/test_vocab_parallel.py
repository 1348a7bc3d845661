"""The chunked loss with the vocabulary split over devices (jaxft/losses/vocab_parallel.py), on
the 8 CPU devices of conftest: the same log-probs, argmax, vocabulary means and gradients as the
whole logits under every way a mesh splits rows, positions and lm_head; a frozen head (LoRA)
computes no d(lm_head); and the compiled program never holds or moves a whole [E, V] array,
which the plain chunked path under the same mesh does. (The loss inside the real steps, on
meshes that take this path: tests/test_loss_paths.py.)"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jaxft import losses
from jaxft.parallel import sharding
from tests.test_losses import _packed_mask

EMBED, VOCAB = 16, 48


def _put(x, mesh, axes):
    return jax.device_put(x, NamedSharding(mesh, sharding.logical_to_spec(axes, x.shape, mesh)))


def _case(batch, length, mesh, vocab_major, seed=0):
    """Hidden states, the head's parameter ([E, V], or [V, E] for a vocabulary-major head: tied
    embeddings), targets, mask and two cotangent weights, placed as the model places them."""
    rng = np.random.default_rng(seed)
    hidden = _put(rng.normal(0, 1, (batch, length, EMBED)).astype(np.float32), mesh,
                  ("act_batch", "act_length", "act_embed"))
    head = rng.normal(0, 0.5, (EMBED, VOCAB)).astype(np.float32)
    head = _put(head.T.copy(), mesh, ("vocab", "embed")) if vocab_major else _put(head, mesh, ("embed", "vocab"))
    targets = rng.integers(0, VOCAB, (batch, length)).astype(np.int32)
    weights = rng.normal(0, 1, (2, batch, length)).astype(np.float32)
    return hidden, head, targets, np.asarray(_packed_mask(batch, length, seed)), weights


# (mesh, rows, positions, soft-cap, vocabulary-major head)
SPLITS = {
    "rows-and-columns": ({"data": 2, "fsdp": 2, "tensor": 2}, 4, 12, None, False),
    "all-fsdp-softcap": ({"fsdp": 8}, 8, 10, 5.0, False),
    "context-parallel": ({"data": 2, "sequence": 4}, 2, 16, None, False),
    # tensor devices hold the same tokens (their d(hidden) parts are summed); tied embeddings
    "sequence-and-tensor-tied": ({"fsdp": 2, "sequence": 2, "tensor": 2}, 2, 16, None, True),
    # 2 rows on data 2 x fsdp 4: rows split over data only, the fsdp devices share tokens
    "rows-over-data-only": ({"data": 2, "fsdp": 4}, 2, 12, None, False),
}


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
def test_vocab_parallel_equals_the_whole_logits_in_values_and_gradients(split):
    mesh_shape, batch, length, softcap, vocab_major = split
    mesh = sharding.make_mesh(**{"data": 1, **mesh_shape})
    with jax.set_mesh(mesh):
        hidden, head, targets, mask, (w_logps, w_means) = _case(batch, length, mesh, vocab_major)
        axes = sharding.vocab_parallel_axes(batch, length, (EMBED, VOCAB))
        assert axes is not None

        def as_head(p):
            return p.T if vocab_major else p

        def full(h, p):
            logits = h @ as_head(p)
            logps, correct = losses.full_token_logps(logits, targets, logit_softcap=softcap)
            capped = logits if softcap is None else softcap * jnp.tanh(logits / softcap)
            trained = mask > 0
            out = (jnp.where(trained, logps, 0.0), correct & trained, jnp.where(trained, capped.mean(-1), 0.0))
            return jnp.sum(out[0] * w_logps + out[2] * w_means), out

        def split_loss(h, p):
            out = losses.chunked_token_logps(h, as_head(p), targets, mask, chunk_size=3, logit_softcap=softcap,
                                             vocab_parallel=axes, lm_head_vocab_major=vocab_major)
            return jnp.sum(out[0] * w_logps + out[2] * w_means), out

        @jax.jit
        def both(h, p):
            return [jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, p) for f in (full, split_loss)]

        ((_, want), grads_f), ((_, got), grads_s) = both(hidden, head)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)  # log-probs, 0 off the targets
    np.testing.assert_array_equal(got[1], want[1])  # argmax == target
    np.testing.assert_allclose(got[2], want[2], atol=1e-5)  # vocabulary-mean logits
    np.testing.assert_allclose(grads_s[0], grads_f[0], atol=1e-5)  # d/d hidden
    np.testing.assert_allclose(grads_s[1], grads_f[1], atol=1e-5)  # d/d head, in the parameter's shape
    assert grads_s[1].sharding.is_equivalent_to(head.sharding, head.ndim)  # where the optimizer has it


def test_a_tie_between_shards_takes_the_first_index_as_argmax_does():
    """Every logit equal: the argmax is column 0, on the first device, whatever the shard."""
    mesh = sharding.make_mesh(data=1, fsdp=8)
    with jax.set_mesh(mesh):
        hidden = _put(np.zeros((8, 4, EMBED), np.float32), mesh, ("act_batch", "act_length", "act_embed"))
        head = _put(np.ones((EMBED, VOCAB), np.float32), mesh, ("embed", "vocab"))
        targets = np.tile(np.array([0, 1, VOCAB // 8, VOCAB - 1], np.int32), (8, 1))
        out = jax.jit(lambda h, w: losses.chunked_token_logps(
            h, w, targets, np.ones_like(targets), chunk_size=2,
            vocab_parallel=sharding.vocab_parallel_axes(8, 4, (EMBED, VOCAB))))(hidden, head)
    np.testing.assert_allclose(out[0], -np.log(VOCAB), rtol=1e-6)
    np.testing.assert_array_equal(out[1], np.tile([True, False, False, False], (8, 1)))


def _dots_shaped(jaxpr, shape) -> int:
    """dot_general equations (nested ones included) whose result has `shape`."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            count += any(tuple(v.aval.shape) == shape for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _dots_shaped(inner, shape)
    return count


def test_a_frozen_head_gets_no_gradient_computed():
    """LoRA: only hidden is differentiated; the backward pass then builds no d(lm_head) (a
    [E, V / 8] product a chunk), and d(hidden) is unchanged."""
    mesh = sharding.make_mesh(data=1, fsdp=8)
    with jax.set_mesh(mesh):
        hidden, head, targets, mask, (weights, _) = _case(8, 6, mesh, False)
        axes = sharding.vocab_parallel_axes(8, 6, (EMBED, VOCAB))

        def loss(h, w, split):
            out = losses.chunked_token_logps(h, w, targets, mask, chunk_size=4, vocab_parallel=split)
            return jnp.sum(out[0] * weights)

        column_grad = (EMBED, VOCAB // 8)
        trained = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(hidden, head, axes)
        frozen = jax.make_jaxpr(jax.grad(loss), static_argnums=2)(hidden, head, axes)
        assert _dots_shaped(trained.jaxpr, column_grad) > 0 and _dots_shaped(frozen.jaxpr, column_grad) == 0
        got = jax.jit(jax.grad(loss), static_argnums=2)(hidden, head, axes)
        want = jax.jit(jax.grad(loss), static_argnums=2)(hidden, head, None)
    np.testing.assert_allclose(got, want, atol=1e-5)


def _collective_sizes(hlo: str) -> list[int]:
    """Element counts of every array a collective of the compiled program produces."""
    sizes = []
    for line in hlo.splitlines():
        found = re.search(r"=\s*(.*?)\s(?:all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                          r"(?:-start)?\(", line)
        if found:
            sizes += [math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", found[1])]
    return sizes


def test_no_device_holds_or_moves_the_whole_head():
    """Compiled for fsdp 8 (nothing runs): the split path's temporaries are a fraction of one
    [E, V] float32 array and no collective moves more than one device's [E, V / 8] block; the
    plain chunked path, partitioned by XLA, gathers the whole head and all-reduces a whole
    d(lm_head) (every chunk: inside its loops), 3x [E, V] of temporaries."""
    batch, length, embed, vocab = 8, 32, 256, 16384
    whole = embed * vocab
    mesh = sharding.make_mesh(data=1, fsdp=8)
    with jax.set_mesh(mesh):
        spec = lambda axes, shape: NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh))  # noqa: E731
        h = jax.ShapeDtypeStruct((batch, length, embed), jnp.float32,
                                 sharding=spec(("act_batch", "act_length", "act_embed"), (batch, length, embed)))
        w = jax.ShapeDtypeStruct((embed, vocab), jnp.float32, sharding=spec(("embed", "vocab"), (embed, vocab)))
        rows = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=spec(("act_batch", "act_length"), (batch, length)))
        compiled = {}
        for name, split in (("plain", None), ("split", sharding.vocab_parallel_axes(batch, length, (embed, vocab)))):
            def loss(h, w, t, m, split=split):
                return jnp.sum(losses.chunked_token_logps(h, w, t, m, chunk_size=8, groups=sharding.token_groups(
                    batch, length), vocab_parallel=split)[0])
            compiled[name] = jax.jit(jax.grad(loss, argnums=(0, 1)), out_shardings=(h.sharding, w.sharding)).lower(
                h, w, rows, rows).compile()
    temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
    moved = {k: max(_collective_sizes(c.as_text())) for k, c in compiled.items()}
    assert temp["split"] < whole * 4 // 2 and moved["split"] <= whole // 8, (temp, moved)
    assert temp["plain"] >= whole * 4 and moved["plain"] >= whole, (temp, moved)  # what this guards against


def test_the_split_applies_only_where_the_mesh_splits_the_head():
    """None (the plain path, the very program as before) without a mesh, on one device, under
    data parallelism alone, and when the head's devices do not divide the vocabulary."""
    assert sharding.vocab_parallel_axes(8, 16, (EMBED, VOCAB)) is None
    one = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1, 1), sharding.MESH_AXES,
                            axis_types=(jax.sharding.AxisType.Auto,) * 5)
    for mesh in (one, sharding.make_mesh(data=-1)):
        with jax.set_mesh(mesh):
            assert sharding.vocab_parallel_axes(8, 16, (EMBED, VOCAB)) is None
    with jax.set_mesh(sharding.make_mesh(data=2, fsdp=2, tensor=2)):
        assert sharding.vocab_parallel_axes(4, 16, (EMBED, VOCAB)) == (("data", "fsdp"), (), ("fsdp",), ("tensor",))
        assert sharding.vocab_parallel_axes(4, 16, (EMBED, VOCAB + 2)) is None  # 50 columns over 4 devices
    with jax.set_mesh(sharding.make_mesh(data=2, sequence=4)):
        assert sharding.vocab_parallel_axes(2, 16, (EMBED, VOCAB)) == (("data",), ("sequence",), ("sequence",), ())


def test_a_split_that_does_not_fit_says_so():
    hidden, head = jnp.zeros((3, 4, EMBED)), jnp.zeros((EMBED, VOCAB))
    rows = jnp.zeros((3, 4), jnp.int32)
    split = (("fsdp",), (), ("fsdp",), ())
    with pytest.raises(ValueError, match="needs the ambient mesh"):
        losses.chunked_token_logps(hidden, head, rows, rows, chunk_size=2, vocab_parallel=split)
    with jax.set_mesh(sharding.make_mesh(data=1, fsdp=8)), pytest.raises(ValueError, match="each must divide"):
        losses.chunked_token_logps(hidden, head, rows, rows, chunk_size=2, vocab_parallel=split)
