"""A reward model: a Hugging Face sequence-classification folder (`LlamaForSequenceClassification`,
`Qwen2ForSequenceClassification`, ... of any family jaxft loads) run in JAX.

Its backbone is a jaxft decoder read from the folder (its `lm_head` is not there: the head is
`score.weight` [num_labels, E]); the reward of a (prompt, completion) is `score` applied to the
final-norm hidden state of the text's last token, label 0, as transformers pools it. The text is
the prompt's messages plus the completion as an assistant turn under the folder's chat template
(a string prompt: prompt + completion), tokenised as transformers' reward-model pipelines do.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.errors import DataError
from jaxft.iterate.pairs import prompt_of
from jaxft.rewards import register

LENGTH_BUCKET = 64  # rows pad to a multiple of this, so few shapes compile


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _last_hidden_scores(graphdef, state, score_NE, tokens_BL, lengths_B):
    model = nnx.merge(graphdef, state)
    B, L = tokens_BL.shape
    col_L = jnp.arange(L, dtype=jnp.int32)
    real_BL = col_L[None, :] < lengths_B[:, None]
    hidden_BLE = model(tokens_BL, jnp.where(real_BL, col_L[None, :], 0), real_BL.astype(jnp.int32),
                       return_hidden=True)
    last_BE = jnp.take_along_axis(hidden_BLE, (lengths_B - 1)[:, None, None], axis=1)[:, 0, :]
    return (last_BE.astype(jnp.float32) @ score_NE.astype(jnp.float32).T)[:, 0]


class RewardModel:
    """reward_model(texts) -> [N] float32 rewards of `texts_of(records, completions)`."""

    def __init__(self, folder: str | Path, *, batch_size: int = 16, max_length: int = 2048):
        import transformers
        from safetensors import safe_open

        from jaxft.io.folders import model_folder
        from jaxft.models.config import read_hf_config
        from jaxft.models.hf import load_weights

        folder = model_folder(str(folder), flag="reward 'reward_model' path")
        cfg = read_hf_config(folder)
        score, source = None, None
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "np") as f:
                if "score.weight" in f.keys():
                    score, source = f.get_tensor("score.weight"), file
        if score is None:
            raise DataError(f"{folder}: no score.weight: a reward model is a *ForSequenceClassification folder "
                            "(a causal LM has lm_head instead)")
        # The backbone only: the classification folder stores no lm_head, and its score head is read above.
        self.model = load_weights(folder, cfg.replace(tie_word_embeddings=True), ignore={"score.weight"})
        self.score = jnp.asarray(score)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.batch_size, self.max_length, self.source = batch_size, max_length, source

    def texts_of(self, records, completions) -> list[tuple[str, bool]]:
        """(text, whether the chat template rendered it: its special tokens are in the text) of
        every completion, prompt-major."""
        texts = []
        template = getattr(self.tokenizer, "chat_template", None)
        for record, row in zip(records, completions):
            prompt = prompt_of(record)
            for completion in row:
                if isinstance(prompt, str):
                    texts.append((prompt + completion, False))
                elif template:
                    texts.append((self.tokenizer.apply_chat_template(
                        list(prompt) + [{"role": "assistant", "content": completion}], tokenize=False), True))
                else:
                    raise DataError("reward 'reward_model': message prompts need a tokenizer with a chat template "
                                    f"in {self.source.parent}")
        return texts

    def __call__(self, texts: list[tuple[str, bool]]) -> np.ndarray:
        ids = [self.tokenizer(text, add_special_tokens=not templated)["input_ids"][-self.max_length:]
               for text, templated in texts]
        graphdef, state = nnx.split(self.model)
        out = []
        for start in range(0, len(ids), self.batch_size):
            rows = ids[start:start + self.batch_size]
            L = -(-max(len(r) for r in rows) // LENGTH_BUCKET) * LENGTH_BUCKET
            tokens = np.zeros((self.batch_size, L), np.int32)
            lengths = np.ones((self.batch_size,), np.int32)
            for b, row in enumerate(rows):
                tokens[b, :len(row)], lengths[b] = row, len(row)
            scores = _last_hidden_scores(graphdef, state, self.score, jnp.asarray(tokens), jnp.asarray(lengths))
            out.append(np.asarray(scores)[:len(rows)])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


@register("reward_model")
def reward_model(path: str, batch_size: int = 16, max_length: int = 2048):
    model = RewardModel(path, batch_size=batch_size, max_length=max_length)

    def reward(records, completions):
        K = len(completions[0]) if completions else 0
        return model(model.texts_of(records, completions)).reshape(len(records), K)

    return reward
