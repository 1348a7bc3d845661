"""`jaxft bench --compare tunix`: the same steps with Google's Tunix (JAX / Flax NNX).

The architecture is jaxft's bench config as a Tunix `llama3` model (`ModelConfig`: the same
widths, heads, vocabulary, RoPE theta and norm epsilon; Tunix's own initialisation), on the
very batch jaxft's bench uses ([B, L] tokens, a prompt quarter out of the loss, rows 2i / 2i+1
= chosen / rejected of pair i). Each step is Tunix's own jitted train step, as its trainers
build it (`jit_train_and_eval_step`), with jaxft's bench optimizer (clip 1.0, AdamW, no weight
decay):
  sft            `PeftTrainer`'s step: forward, its masked token-mean NLL, backward, update
  dpo_reference  `DPOTrainer`: its jitted reference forward (`_prepare_inputs`: the frozen
                 reference's completion log-probs), then its sigmoid-DPO train step
Tunix builds a dense [B, L, L] attention mask from the padding mask: the bench's right padding
(token 0, which the bench never draws for a real token; segment 0 in jaxft) is masked out on
both sides, so both attend causally over the same tokens and train the same targets. Tunix runs
at its own default precision: jaxft's compute dtype and remat are not passed to it.
"""

from __future__ import annotations

import numpy as np

from jaxft.errors import ConfigError, SetupError


def _import_tunix():
    try:
        import tunix  # noqa: F401
        from tunix.models.llama3 import model as llama3
        from tunix.sft import peft_trainer, utils
        from tunix.sft.dpo import dpo_trainer
    except ImportError as err:
        raise SetupError(f"--compare tunix needs Tunix ({err}); pip install google-tunix") from None
    return llama3, peft_trainer, utils, dpo_trainer


def check_available() -> str:
    """'tunix X' when it imports; else a RuntimeError naming the install."""
    _import_tunix()
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"tunix {version('google-tunix')}"
    except PackageNotFoundError:  # a source checkout
        return "tunix (source)"


def tunix_config(cfg):
    """Tunix's llama3 `ModelConfig` of a jaxft ModelConfig (Llama-architecture fields only)."""
    llama3, *_ = _import_tunix()
    if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias or cfg.qk_norm or cfg.sliding_window:
        raise ConfigError(f"--compare tunix: Tunix's llama3 model has no biases, q/k norm or sliding window; "
                         f"the {cfg.model_type} preset has them: bench a Llama-shaped preset (e.g. bench)")
    return llama3.ModelConfig(
        num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
        hidden_dim=cfg.intermediate_size, num_heads=cfg.num_heads, head_dim=cfg.dim_per_head,
        num_kv_heads=cfg.num_kv_heads, rope_theta=int(cfg.rope_theta), norm_eps=cfg.rms_norm_eps,
        weight_tying=cfg.tie_word_embeddings,
    )


class TunixBench:
    """A Tunix policy, its frozen reference and the two trainers; `cases(batch)` gives the
    timed steps on a host batch from `jaxft.perf.bench`."""

    def __init__(self, cfg, *, lr: float = 1e-5, clip_norm: float = 1.0, beta: float = 0.1, seed: int = 0):
        import optax
        from flax import nnx

        llama3, peft_trainer, self._utils, dpo_trainer = _import_tunix()
        self._dpo_input = dpo_trainer.TrainingInput
        config = tunix_config(cfg)
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(lr, weight_decay=0.0, eps=1e-8))
        # Steps only, never their loops: no checkpoints, no evaluation, no metrics files.
        sft_config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9)
        self.sft_trainer = peft_trainer.PeftTrainer(llama3.Llama3(config, rngs=nnx.Rngs(seed)), tx, sft_config)
        self.sft_trainer.with_gen_model_input_fn(self._sft_inputs)
        dpo_config = dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**9, beta=beta)
        self.dpo_trainer = dpo_trainer.DPOTrainer(llama3.Llama3(config, rngs=nnx.Rngs(seed)),
                                                  llama3.Llama3(config, rngs=nnx.Rngs(seed)), tx, dpo_config)
        self.description = (f"{check_available()}, llama3 model, dense [B, L, L] attention mask, "
                            "Tunix's own precision and remat")

    def _sft_inputs(self, x):
        """As Tunix's examples build it: positions and the causal mask from the padding (the
        bench pads with token 0), the loss from `input_mask`."""
        not_padding = x.input_tokens != 0
        return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                "positions": self._utils.build_positions_from_mask(not_padding),
                "attention_mask": self._utils.make_causal_attn_mask(not_padding)}

    def cases(self, batch: dict) -> dict:
        """{"sft", "dpo_reference"} -> callable running one step on `batch` (numpy [B, L]
        tokens and loss_mask; rows 2i / 2i+1 chosen / rejected) and waiting for it."""
        import jax
        import jax.numpy as jnp
        from tunix.sft.peft_trainer import TrainingInput

        tokens, loss_mask, real = batch["tokens"], batch["loss_mask"], batch["segment_ids"] > 0
        sft_input = TrainingInput(input_tokens=jnp.asarray(tokens), input_mask=jnp.asarray((loss_mask > 0) & real))
        # Tunix's DPO input: one prompt per pair (the shared first quarter, never padded), chosen
        # and rejected completions right-padded, their masks 0 on the padding.
        prompt_len = int(np.argmax(loss_mask[0] > 0))
        chosen, rejected = batch["chosen_row"], batch["rejected_row"]

        def completion(rows):
            return jnp.asarray(tokens[rows, prompt_len:]), jnp.asarray(real[rows, prompt_len:].astype(np.int32))

        (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = completion(chosen), completion(rejected)
        dpo_input = self._dpo_input(
            prompt_ids=jnp.asarray(tokens[chosen, :prompt_len]),
            prompt_mask=jnp.ones((len(chosen), prompt_len), jnp.int32),
            chosen_ids=chosen_ids, chosen_mask=chosen_mask, rejected_ids=rejected_ids, rejected_mask=rejected_mask)
        sft_step, _ = self.sft_trainer.jit_train_and_eval_step()
        dpo_step, _ = self.dpo_trainer.jit_train_and_eval_step()

        # Tunix's model broadcasts by rank promotion, which jaxft's tests make an error.
        def sft():
            with jax.numpy_rank_promotion("allow"):
                jax.block_until_ready(sft_step(sft_input))

        def dpo_reference():
            with jax.numpy_rank_promotion("allow"):
                example = self.dpo_trainer._prepare_inputs(dpo_input)  # the reference forward (jitted)
                jax.block_until_ready(dpo_step(example))

        return {"sft": sft, "dpo_reference": dpo_reference}
