"""Sample generations during training (`train.sample_every`), as TRL's completion logging
does: greedy completions of the first eval prompts from the current params."""

from __future__ import annotations

from typing import Sequence

from jaxft.data.pipeline import pad_id_of
from jaxft.errors import ConfigError
from jaxft.inference.generate import generate
from jaxft.steps.common import merge_model


class Sampler:
    """Greedy completions of fixed prompts from whatever weights it is called with.

    examples: tokenized eval examples (SFT or preference); each one's prompt is its tokens
    before the first trained token (`prompt_ids`), so the model sees the prompt exactly as in
    training (chat template, BOS). The prompts keep the same padded shape at every call, so
    generation compiles once per run.
    """

    def __init__(self, graphdef, tokenizer, examples: Sequence, *, max_new_tokens: int):
        if not examples:
            raise ConfigError("sampling needs at least one eval example (train.sample_prompts)")
        self.graphdef, self.tokenizer, self.max_new_tokens = graphdef, tokenizer, max_new_tokens
        self.prompt_ids = [[int(t) for t in ex.prompt_ids] for ex in examples]
        # The prompt as the model saw it, special tokens included; completions without them.
        self.prompts = tokenizer.batch_decode(self.prompt_ids, skip_special_tokens=False)

    def __call__(self, weights) -> list[dict]:
        """weights: a params tree, or (adapters, frozen base) with LoRA, sharded or not (under
        the run's mesh). Returns [{"prompt": str, "completion": str}] in prompt order. Reads
        the weights only: training is unchanged by sampling."""
        model = merge_model(self.graphdef, weights)
        # Stop at the EOS the data pipeline trains every example to end with.
        out = generate(model, self.prompt_ids, max_new_tokens=self.max_new_tokens,
                       eos_token_id=self.tokenizer.eos_token_id, pad_token_id=pad_id_of(self.tokenizer))
        completions = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [{"prompt": p, "completion": c} for p, c in zip(self.prompts, completions)]
