"""The chunked cross-entropy inside the real steps: the same losses and gradients as the whole
logits (full fine-tuning, LoRA, DPO, rows split over devices and context parallelism), and the
default step's compiled memory at a real vocabulary holds one chunk of logits, whatever the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import losses
from jaxft.losses.chunked import AUTO_LOGITS_BYTES
from jaxft.models import create_model, get_preset
from jaxft.models.adapters import init_adapters
from jaxft.models.from_config import split_params
from jaxft.models.lora import PROJECTIONS, LoRASpec
from jaxft.parallel import sharding
from jaxft.steps.common import jit_step, token_logps_for, with_frozen
from jaxft.steps.dpo import batch_shardings, make_dpo_step, pair_logps
from jaxft.steps.optimizer import make_optimizer
from jaxft.steps.sft import make_sft_step
from jaxft.steps.state import create_train_state

CFG = get_preset("tiny").replace(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2)
PAIR_KEYS = ("chosen_row", "chosen_segment", "rejected_row", "rejected_segment", "pair_mask", "pair_index")


def packed_batch(rows=8, length=16, seed=0):
    """Two packed examples per row (each a 2-token prompt, then its completion), a padding
    tail, varied lengths; pairs = (row 2i segment s, row 2i + 1 segment s)."""
    rng = np.random.default_rng(seed)
    segments, positions = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.int32)
    for r in range(rows):
        a, b = 4 + r % 5, length - 4 - r % 5 - r % 3
        segments[r, :a], segments[r, a:a + b] = 1, 2
        positions[r, :a], positions[r, a:a + b] = np.arange(a), np.arange(b)
        loss_mask[r, 2:a], loss_mask[r, a + 2:a + b] = 1, 1
    pairs = rows  # 2 per row pair
    return {
        "tokens": rng.integers(1, CFG.vocab_size, (rows, length)).astype(np.int32), "positions": positions,
        "segment_ids": segments, "loss_mask": loss_mask,
        "chosen_row": np.repeat(np.arange(0, rows, 2), 2).astype(np.int32),
        "rejected_row": np.repeat(np.arange(1, rows, 2), 2).astype(np.int32),
        "chosen_segment": np.tile([1, 2], rows // 2).astype(np.int32),
        "rejected_segment": np.tile([1, 2], rows // 2).astype(np.int32),
        "pair_mask": np.ones(pairs, np.int32), "pair_index": np.arange(pairs, dtype=np.int32),
    }


def _sft_loss(graphdef, chunk):
    def loss(params, batch):
        out = token_logps_for(graphdef, params, batch, loss_chunk_size=chunk)
        logps, mask = out.logps, out.target_mask
        return losses.sft_loss(logps, mask)[0]
    return loss


def _dpo_loss(graphdef, chunk):
    def loss(params, batch):
        rows = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "loss_mask")}
        pol, _ = pair_logps(graphdef, params, rows, {k: batch[k] for k in PAIR_KEYS}, num_segments=2,
                            loss_chunk_size=chunk)
        zeros = jnp.zeros_like(pol.chosen)
        # The logits/* metric enters the loss too, so its gradient is checked as well.
        value, _ = losses.dpo_loss(pol.chosen, pol.rejected, zeros, zeros, beta=0.1, loss_type="sigmoid")
        return value + 1e-2 * jnp.mean(pol.chosen_logits - pol.rejected_logits)
    return loss


@pytest.mark.parametrize("method,mesh_shape,lora", [
    ("sft", {"data": 2, "fsdp": 2, "tensor": 2}, False),  # rows split 4 ways: 4 token groups
    ("sft", {"data": -1}, True),  # LoRA: gradients reach the adapters through the chunked head
    ("sft", {"data": 2, "fsdp": 4}, True),  # LoRA, the frozen head split over fsdp (vocab-parallel loss)
    ("dpo", {"data": 2, "sequence": 4}, False),  # context parallelism: each device its own positions
], ids=["sft-dp-fsdp-tp", "sft-lora", "sft-lora-fsdp", "dpo-context-parallel"])
def test_chunked_loss_equals_whole_logits_in_the_steps(method, mesh_shape, lora):
    """(Rows shorter than a chunk, packed rows and the loss alone: tests/test_losses.py; a whole
    context-parallel run: tests/test_context_parallel.py.)"""
    mesh = sharding.make_mesh(**mesh_shape)
    host = packed_batch()
    with jax.set_mesh(mesh):
        graphdef, params = split_params(create_model(CFG, seed=0, mesh=mesh))
        if lora:
            lcfg = CFG.replace(lora=LoRASpec(rank=4, alpha=8.0, targets=PROJECTIONS))
            graphdef, adapters = init_adapters(lcfg, seed=1, mesh=mesh)
            # Non-zero B, so the adapters change the logits and get a gradient.
            adapters = jax.tree.map(lambda x: x + 0.05, adapters)
            trainable, frozen = adapters, params
        else:
            trainable, frozen = params, None
        batch = {k: jax.device_put(v, sharding.batch_sharding(mesh) if v.ndim == 2 else sharding.replicated(mesh))
                 for k, v in host.items()}
        make = _sft_loss if method == "sft" else _dpo_loss

        @jax.jit
        def both(p, b):
            return [jax.value_and_grad(lambda q: make(graphdef, chunk)(with_frozen(q, frozen), b))(p)
                    for chunk in (0, 5)]

        (whole, g_whole), (chunked, g_chunked) = both(trainable, batch)
    np.testing.assert_allclose(float(chunked), float(whole), rtol=1e-5)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g_whole), jax.tree.leaves(g_whole),
                          jax.tree.leaves(g_chunked)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, err_msg=str(path[0]))


# ---------------------------------------------------------------- compiled memory at a real vocabulary

QWEN_VOCAB = 151_936


@pytest.fixture(scope="module")
def qwen_vocab_steps():
    """Compiled memory (temp bytes, one device) of the default (-1) SFT and DPO steps of a
    2 x 64 body on Qwen2.5's vocabulary, bf16 compute, full remat (the presetless recipe),
    96-token rows, at batch 8 and 16. Nothing runs: shapes only."""
    cfg = CFG.replace(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=128, compute_dtype=jnp.bfloat16,
                      remat="full")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "sequence", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 4)
    out = {"chunk": losses.resolve_chunk_size(-1, QWEN_VOCAB), "num_params": cfg.num_params()}
    with jax.set_mesh(mesh):
        graphdef, params = split_params(create_model(cfg, seed=0, mesh=mesh))
        tx, schedule = make_optimizer(lr=1e-5, schedule="constant", total_steps=1)
        state, shardings = create_train_state(params, tx, mesh)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        for rows in (8, 16):
            row = {k: jax.ShapeDtypeStruct((rows, 96), jnp.int32) for k in ("tokens", "positions", "segment_ids",
                                                                               "loss_mask")}
            pairs = {k: jax.ShapeDtypeStruct((rows // 2,), jnp.int32) for k in PAIR_KEYS}
            table = jax.ShapeDtypeStruct((rows // 2, 2), jnp.float32)
            for setting in (-1,):
                chunk = losses.resolve_chunk_size(setting, QWEN_VOCAB)
                sft = jit_step(make_sft_step(graphdef, tx, schedule, loss_chunk_size=chunk),
                               state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh))
                dpo = jit_step(make_dpo_step(graphdef, tx, schedule, loss_kwargs={"loss_type": "sigmoid", "beta": 0.1},
                                             reference_mode="table", num_segments=1, rows_per_pair=2,
                                             loss_chunk_size=chunk),
                               state_shardings=shardings, batch_sharding=batch_shardings(mesh),
                               leading_shardings=(sharding.replicated(mesh),))
                out["sft", rows, setting] = sft.lower(abstract, row).compile().memory_analysis().temp_size_in_bytes
                out["dpo", rows, setting] = dpo.lower(abstract, table, {**row, **pairs}).compile() \
                    .memory_analysis().temp_size_in_bytes
    return out


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_default_step_holds_one_chunk_of_logits_at_a_real_vocabulary(qwen_vocab_steps, method):
    m = qwen_vocab_steps
    chunk_bytes = m["chunk"] * QWEN_VOCAB * 4  # one chunk's f32 logits
    assert chunk_bytes <= 2 * AUTO_LOGITS_BYTES
    gradient_bytes = m["num_params"] * 4  # f32 gradients of every parameter
    default = m[method, 16, -1]
    # Scratch = the gradients plus at most a few chunk-sized buffers (logits, their softmax
    # and its gradient, which XLA fuses); the whole [16, 96, V] logits alone are 890 MiB.
    assert default <= gradient_bytes + 3 * chunk_bytes, (default, gradient_bytes, chunk_bytes)
    # ... and it does not grow with the batch (the old chunks held [rows, chunk, V]).
    assert m[method, 16, -1] - m[method, 8, -1] < chunk_bytes // 8
