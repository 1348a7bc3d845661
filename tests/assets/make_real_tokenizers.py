"""How the real tokenizers in tests/assets/ were made (CI never runs this; it needs downloads).

Two vocabularies of released models, converted offline into `transformers` tokenizer folders
(`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`) that `AutoTokenizer` loads:

* `mistral_v1/`: Mistral 7B's 32k SentencePiece BPE (`tokenizer.model.v1` from the
  `mistral_common` wheel), converted by transformers' own SentencePiece converter, with a
  BOS-adding post-processor (as the hub's Mistral tokenizer.json has) and a Mistral-instruct
  `[INST] ... [/INST]` chat template written here. The template writes BOS itself, has no
  `{% generation %}` tags and ignores `add_generation_prompt`: the hard case for masks.
* `gpt2_chatml/`: GPT-2's byte-level BPE (`whisper/assets/gpt2.tiktoken` from the
  openai-whisper sdist; the merges are recovered from the ranks), plus `<|im_start|>` /
  `<|im_end|>` and a Qwen2-like ChatML template with a default system prompt. No BOS; the
  end-of-turn token `<|im_end|>` is not the EOS `<|endoftext|>`, which is also the pad token.

Steps (about 10 s):

    mkdir -p /tmp/rt && cd /tmp/rt
    pip download mistral-common==1.13.1 --no-deps -d .
    pip download openai-whisper==20250625 --no-deps --no-binary :all: -d .
    unzip -q mistral_common-1.13.1-py3-none-any.whl -d mc
    tar xzf openai_whisper-20250625.tar.gz
    pip install --target /tmp/spm sentencepiece   # the converter needs it; jaxft does not
    PYTHONPATH=/tmp/spm python tests/assets/make_real_tokenizers.py \\
        --spm /tmp/rt/mc/mistral_common/data/tokenizer.model.v1 \\
        --tiktoken /tmp/rt/openai_whisper-20250625/whisper/assets/gpt2.tiktoken

tokenizer.json is written without indentation to keep each file under ~1.5 MB.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent

# Mistral-instruct (v0.3 style): a system message is folded into the first user turn, the
# assistant reply follows `[/INST]` after one space and ends with EOS.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message != '' %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user, assistant and system roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Qwen2-like ChatML: a default system prompt when none is given; turns end with <|im_end|>\n.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _compact(folder: Path, **config) -> None:
    """Rewrite tokenizer.json without indentation and drop load-time keys from the config."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(key, None)
    cfg.update(config)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_mistral(spm_model: Path, out: Path) -> None:
    from tokenizers import processors
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(spm_model, Path(tmp) / "tokenizer.model")
        # legacy: every chunk after a special token gets the "▁" prefix, as in the hub
        # files (so "<s>[INST]" encodes to the familiar 1, 733, 16289, 28793).
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=True, add_prefix_space=True)
    assert len(tok) == 32000, len(tok)
    backend = tok.backend_tokenizer
    # The converter leaves BOS to the (gone) slow class; the hub's Mistral tokenizer.json
    # carries it in the post-processor, which is what transformers 5 honours.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    assert tok("[INST]").input_ids == [1, 733, 16289, 28793], tok("[INST]").input_ids
    tok.chat_template = MISTRAL_TEMPLATE
    tok.model_max_length = 32768
    tok.save_pretrained(out)
    _compact(out, legacy=True)  # else LlamaTokenizer rebuilds the non-legacy pre-tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in byte-level vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _recover_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two parts BPE joins to make `token`: run BPE with only the lower-ranked merges."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            break
        i = best[0]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    assert len(parts) == 2, (token, parts)
    return parts[0], parts[1]


def make_gpt2_chatml(tiktoken_file: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ranks = {}
    for line in tiktoken_file.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    byte_map = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {to_str(t): r for t, r in ranks.items()}
    merges = [tuple(map(to_str, _recover_merge(ranks, t)))
              for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,
    )
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [50256, 50257, 50258], ids
    assert tok("Hello world").input_ids == [15496, 995]  # GPT-2's well-known ids
    tok.save_pretrained(out)
    _compact(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spm", type=Path, required=True, help="mistral_common tokenizer.model.v1")
    parser.add_argument("--tiktoken", type=Path, required=True, help="whisper gpt2.tiktoken")
    args = parser.parse_args()
    make_mistral(args.spm, ASSETS / "mistral_v1")
    make_gpt2_chatml(args.tiktoken, ASSETS / "gpt2_chatml")
    for path in sorted(ASSETS.glob("*/*")):
        print(f"{path.relative_to(ASSETS)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
