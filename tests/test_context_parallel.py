"""Context parallelism: a mesh with a "sequence" axis splits every row's tokens over devices,
and attention, SFT and DPO equal one device (packed rows with padding, sliding window, GQA;
forward and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import attention
from jaxft.models.attention import AttentionMask, attend
from jaxft.parallel.sharding import batch_sharding, make_mesh

# Two packed rows of 256 tokens: segments cross the shard borders (every 64 tokens at 4 shards).
SEGMENTS = np.stack([
    np.repeat([1, 2, 3, 4, 0], [50, 30, 100, 60, 16]),
    np.repeat([1, 2, 0], [130, 110, 16]),
]).astype(np.int32)


def _qkv(H=4, K=2, D=8, seed=0):
    B, L = SEGMENTS.shape
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(kq, (B, L, H, D)), jax.random.normal(kk, (B, L, K, D)),
            jax.random.normal(kv, (B, L, K, D)), jax.random.normal(kw, (B, L, H, D)))


def _loss_and_grads(fn, mesh, window):
    """sum(w * out) over real queries and its grads w.r.t. q, k, v; inputs placed on `mesh`
    with tokens split over its sequence axis."""
    q, k, v, w = _qkv()
    seg = jnp.asarray(SEGMENTS)

    def loss(q, k, v):
        out = fn(q, k, v, seg, window)
        return jnp.sum(jnp.where((seg != 0)[:, :, None, None], w * out, 0.0)), out

    with jax.set_mesh(mesh):
        tokens = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), "sequence"))
        q, k, v, seg = (jax.device_put(x, tokens) for x in (q, k, v, seg))
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    valid = SEGMENTS != 0
    return np.asarray(out)[valid], [np.asarray(g) for g in grads]


@functools.cache
def _single_device(window):
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    return _loss_and_grads(lambda q, k, v, s, w: attend(q, k, v, q_segment_ids_BL=s, kv_segment_ids_BS=s,
                                                        sliding_window=w, implementation="reference"),
                           mesh, window)


def _assert_equal_to_one_device(fn, mesh, window):
    out, grads = _loss_and_grads(fn, mesh, window)
    ref_out, ref_grads = _single_device(window)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "blockwise", "xla"])
@pytest.mark.parametrize("window", [None, 40])
def test_backends_split_over_the_sequence_axis_equal_one_device(backend, window):
    mesh = make_mesh(data=2, fsdp=1, sequence=4)
    fn = lambda q, k, v, s, w: attend(q, k, v, q_segment_ids_BL=s, kv_segment_ids_BS=s,  # noqa: E731
                                      sliding_window=w, implementation=backend, block_q=32, block_k=32)
    _assert_equal_to_one_device(fn, mesh, window)


def test_each_shard_gathers_the_keys_of_its_row_and_attends_its_own_queries():
    q, k, v, _ = _qkv()
    seg = jnp.asarray(SEGMENTS)
    fn = lambda q, k, v: attend(q, k, v, q_segment_ids_BL=seg, kv_segment_ids_BS=seg)  # noqa: E731
    with jax.set_mesh(make_mesh(data=2, sequence=4)):
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
    assert "shard_map" in jaxpr and "all_gather" in jaxpr  # of k, v and the key segment ids
    with jax.set_mesh(make_mesh(data=8)):  # no sequence axis: no split
        assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v))


def test_splash_splits_its_kernel_over_the_sequence_axis():
    # Pallas interpret mode; 256 tokens over 2 shards = one 128-query block per shard.
    mesh = make_mesh(data=2, sequence=2, tensor=2)  # kv heads split over tensor too
    fn = lambda q, k, v, s, w: attention.splash(q, k, v, AttentionMask(s, s, 0, w), interpret=True)  # noqa: E731
    _assert_equal_to_one_device(fn, mesh, None)


def test_batch_rows_split_over_data_and_fsdp_and_tokens_over_sequence():
    mesh = make_mesh(data=1, fsdp=2, sequence=4)
    x = jax.device_put(np.arange(4 * 64).reshape(4, 64), batch_sharding(mesh))
    assert x.addressable_shards[0].data.shape == (2, 16)


def test_dense_layers_take_token_rows_unless_the_mesh_splits_the_tokens():
    """[B, L, E] -> [B * L, E] rows (one contracted token axis: XLA:CPU's fast weight gradients)
    with no mesh and on batch-split meshes, where the merged axis splits as the batch does and
    needs no collective; a mesh that splits the tokens keeps [B, L, E]."""
    from jaxft.models.decoder import _token_rows

    x = jnp.zeros((8, 64, 8))
    assert _token_rows(x).shape == (512, 8)
    for mesh, rows in ((make_mesh(data=2, fsdp=4), True), (make_mesh(data=2, sequence=4), False)):
        with jax.set_mesh(mesh):
            assert (_token_rows(x).ndim == 2) == rows
            placed = jax.device_put(x, batch_sharding(mesh))
            hlo = jax.jit(lambda a: _token_rows(a) * 2).lower(placed).compile().as_text()
        assert not any(op in hlo for op in ("all-to-all", "all-gather", "collective-permute"))


def test_max_length_must_divide_over_the_sequence_axis():
    import jaxft.config
    from jaxft.parallel.sharding import check_batch_divisibility

    config = jaxft.config.load("configs/sft.py:tiny", {"data.max_length": 100, "mesh.sequence": 8})
    with pytest.raises(ValueError, match="data.max_length=100 is not divisible by mesh.sequence=8"):
        check_batch_divisibility(config, make_mesh(data=1, sequence=8))


def _train(kind, workdir, **overrides):
    """Three steps of configs/{kind}.py:tiny shrunk to a few seconds, evaluated at the end;
    the logged train rows and eval rows."""
    import json

    import jaxft.config
    from jaxft.run import run
    from tests.quickstart_subset import quickstart_head

    name = {"sft": "sft", "dpo": "pref"}[kind]
    settings = {"data.train": str(quickstart_head(workdir.parent, f"{name}_train.jsonl", 64)),
                "data.eval": str(quickstart_head(workdir.parent, f"{name}_eval.jsonl", 16)), "train.eval_every": 3,
                "data.max_length": 64, "train.steps": 3, "train.batch_size": 8, "train.log_every": 1,
                "train.save_every": 3, "train.progress": False, "optim.warmup_steps": 0,
                "optim.schedule": "constant", "model.remat": "full", **overrides}
    if kind == "dpo":
        settings.update({"dpo.loss_type": "sigmoid,sft", "dpo.loss_weights": "1.0,1.0"})
    run(jaxft.config.load(f"configs/{kind}.py:tiny", settings), workdir, kind=kind, export=False)
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


METRICS = {"sft": ("loss", "grad_norm", "mean_token_accuracy"),
           "dpo": ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logits/rejected")}


@pytest.mark.parametrize("kind, overrides", [
    # packed rows whose examples cross the shard borders; the loss chunked (strided chunks)
    ("sft", {"data.packing": True, "train.loss_chunk_size": 16}),
    # packed pairs: per-example log-prob sums over tokens of several shards; the reference
    # pass over the data (jaxft.eval.passes) split the same way
    ("dpo", {"data.packing": True, "dpo.precompute_reference": True}),
], ids=["sft-packed-chunked-loss", "dpo-packed-precomputed-reference"])
def test_a_run_with_tokens_split_over_the_sequence_axis_equals_one_without(tmp_path, kind, overrides):
    split = _train(kind, tmp_path / "split", **{**overrides, "mesh.data": 1, "mesh.fsdp": 2, "mesh.sequence": 4})
    plain = _train(kind, tmp_path / "plain", **{**overrides, "mesh.data": -1, "train.loss_chunk_size": 0})
    (train_split, eval_split), (train_plain, eval_plain) = split, plain
    assert len(train_split) == len(train_plain) == 3 and len(eval_split) == len(eval_plain) == 1
    for a, b in zip(train_split + eval_split, train_plain + eval_plain):
        for key in (*METRICS[kind], "eval_loss"):
            if key in a or key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
