"""Trains the bundled tokenizer (`jaxft/assets/tokenizer/`) on the project's own text.

Usage:

    python -m jaxft.quickstart.tokenizer              # rewrites jaxft/assets/tokenizer/
    python -m jaxft.quickstart.tokenizer --out DIR    # writes elsewhere (tests compare the two)

The result is a 512-token byte-level BPE (256 byte tokens, 6 special tokens, ~250 merges)
trained on `jaxft.quickstart.data.tokenizer_training_text()`, saved with `save_pretrained` so
`transformers.AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER_DIR)` loads it offline. The
run is deterministic and takes about a second; commit its files after changing the text,
the vocabulary or the chat template.

Conventions (the data pipeline and the tests rely on them):
* Special tokens `<pad>`=0, `<s>`=1 (BOS), `</s>`=2 (EOS), then `<|system|>`, `<|user|>`,
  `<|assistant|>` as single ids. No unknown token: every byte has a token.
* Digits are split one per token, so numbers share the ten digit embeddings and arithmetic
  is learnable by a tiny model.
* Tokenizing with `add_special_tokens=True` prepends BOS only (no EOS).
* The chat template writes BOS itself, so `apply_chat_template(..., tokenize=True)` yields
  exactly one BOS; tokenize its rendered string with `add_special_tokens=False`. Each turn is
  `<|role|>\\n{content}`, ended by `\\n`, except assistant turns, which end with `</s>`: the
  EOS is the last (trainable) token of every assistant turn, and rendering a conversation up
  to an assistant turn with `add_generation_prompt=True` gives a prefix of the full rendering.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxft.data.assets import BUNDLED_TOKENIZER_DIR

VOCAB_SIZE = 512
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS) + ROLE_TOKENS

# Rendered with transformers' settings (trim_blocks, lstrip_blocks), so every newline that
# belongs to the output is written as a '\n' string literal, never as template whitespace.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tokenizer(lines: list[str] | None = None):
    """Trains the BPE and wraps it as a `transformers` tokenizer (nothing is written).

    Args:
      lines: training text; defaults to `jaxft.quickstart.data.tokenizer_training_text()`.

    Returns:
      A `transformers.PreTrainedTokenizerFast` with the special tokens, BOS post-processor and
      chat template described in the module docstring.
    """
    from transformers import PreTrainedTokenizerFast

    from jaxft.quickstart.data import tokenizer_training_text

    if lines is None:
        lines = tokenizer_training_text()
    tok = Tokenizer(models.BPE())
    # Digits first: the byte-level regex would keep "12" together, and digit-level tokens
    # are what lets a tiny model learn arithmetic.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # The post-processor in tokenizer.json is what transformers 5 honours on load (it drops
    # add_bos_token/add_eos_token from tokenizer_config.json), so BOS-only lives here.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,  # the tiny preset's max_position_embeddings
        padding_side="right",
    )


def make_tokenizer(out_dir: str | Path = BUNDLED_TOKENIZER_DIR) -> list[Path]:
    """Trains the tokenizer and saves it to `out_dir`; returns the written files, sorted."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer().save_pretrained(out_dir)
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BUNDLED_TOKENIZER_DIR), help="output folder")
    args = parser.parse_args(argv)
    for path in make_tokenizer(args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
