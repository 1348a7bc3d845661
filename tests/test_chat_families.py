"""Chat templates of the model families jaxft loads beyond Llama / Qwen / Mistral: Gemma 2,
Gemma 3, Phi-3, Phi-3.5 and Phi-4. Each family's released template, on jaxft's real data path,
trains exactly the assistant replies: the reply's tokens as the template writes them, the
turn-end token and whatever the template writes after it up to the next turn (the rule of
tests/test_data_tokenize.py), plus one EOS where the last reply holds none; never a system or
user turn, nor the reply header (`<start_of_turn>model\\n`, `<|assistant|>\\n`,
`<|im_start|>assistant<|im_sep|>`).

Templates: tests/assets/chat_templates/ (its README says where each comes from). Vocabularies
are stand-ins shipped with the tests (no hub here, and Gemma's 256k vocabulary is 17-33 MB as
tokenizer.json), given each family's special tokens and text handling:
  gemma   Mistral's SentencePiece vocabulary (tests/assets/mistral_v1) read as Gemma reads text
          (no "▁" prefix, spaces as "▁", BOS added); <bos> <eos> <pad> <start_of_turn>
          <end_of_turn>; EOS <eos> (the hub's tokenizer_config), which no turn holds
  phi3    the same vocabulary as Llama 2's reads it (Phi-3's), with Phi-3's added tokens
          <|endoftext|> <|assistant|> ... <|end|> <|user|>; EOS <|endoftext|>, which the
          template writes after the last turn only. The hub files strip whitespace right of
          the role tokens (rstrip); both settings are tested
  phi4    GPT-2's byte-level BPE (tests/assets/gpt2_chatml) with Phi-4's (cl100k) split regex
          and <|im_start|> <|im_sep|> <|im_end|>; EOS <|im_end|>; no BOS, no newlines

The expected mask is computed independently of jaxft's prefix renderings: from character
offsets in the whole rendered conversation, a token is trained when it starts inside a reply
(after a reply header, before the next turn's start or the end of the text).
"""

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer

from jaxft.data.formats import DataError, parse_record
from jaxft.data.tokenize import Encoder, encode_record, load_examples
from tests.test_tool_calls import runs  # the decoded runs of consecutive trained tokens

ASSETS = Path(__file__).parent / "assets"
TEMPLATES = ASSETS / "chat_templates"
# Phi-4's pre-tokenizer regex (cl100k_base's, as Llama 3's in test_tool_calls.py).
CL100K_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
              "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>",
              "<|placeholder6|>", "<|user|>"]


def _special(names, rstrip=False):
    return [AddedToken(n, special=True, normalized=False, rstrip=rstrip) for n in names]


def gemma_tokenizer(template: str):
    tok = AutoTokenizer.from_pretrained(ASSETS / "mistral_v1")
    tok.add_tokens(_special(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]),
                   special_tokens=True)
    tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Replace(" ", "▁")  # Gemma: no dummy "▁" prefix
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


def phi3_tokenizer(template: str, rstrip: bool):
    tok = AutoTokenizer.from_pretrained(ASSETS / "mistral_v1")
    tok.add_tokens(_special(PHI3_ADDED[:1]) + _special(PHI3_ADDED[1:], rstrip), special_tokens=True)
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


def phi4_tokenizer():
    tok = AutoTokenizer.from_pretrained(ASSETS / "gpt2_chatml")  # has <|im_start|> <|im_end|>
    tok.add_tokens(_special(["<|im_sep|>"]), special_tokens=True)
    tok.add_special_tokens({"eos_token": "<|im_end|>"})
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.chat_template = (TEMPLATES / "phi4.jinja").read_text()
    return tok


# name -> (tokenizer, reply header, what starts every turn)
FAMILIES = {
    "gemma2": (lambda: gemma_tokenizer("gemma.jinja"), "<start_of_turn>model\n", "<start_of_turn>"),
    "gemma3": (lambda: gemma_tokenizer("gemma3.jinja"), "<start_of_turn>model\n", "<start_of_turn>"),
    "phi3": (lambda: phi3_tokenizer("phi3.jinja", rstrip=True), "<|assistant|>\n", "<|"),
    "phi3_no_rstrip": (lambda: phi3_tokenizer("phi3.jinja", rstrip=False), "<|assistant|>\n", "<|"),
    "phi3_5": (lambda: phi3_tokenizer("phi3_5.jinja", rstrip=True), "<|assistant|>\n", "<|"),
    "phi4": (phi4_tokenizer, "<|im_start|>assistant<|im_sep|>", "<|im_start|>"),
}
NAMES = list(FAMILIES)
GEMMA2 = ("gemma2",)  # its template refuses a system turn


@pytest.fixture(scope="module")
def toks():
    return {name: make() for name, (make, _, _) in FAMILIES.items()}


def user(c):
    return {"role": "user", "content": c}


def bot(c):
    return {"role": "assistant", "content": c}


SYSTEM = {"role": "system", "content": "You answer in one line."}
TURNS = [user("What is 2+2?"), bot("It is 4."), user("And 3+3, twice?"), bot("6, of course; 6.")]
CONVERSATIONS = {
    "system": [SYSTEM] + TURNS,
    "no_system": TURNS,
    # Leading / trailing whitespace and inner newlines (Gemma's template trims the content).
    "whitespace": [user(" Two lines:\nok? "), bot("  Line one.\nLine two.  "), user("More"),
                   bot("Three.\n")],
}
CASES = [(n, c) for n in NAMES for c in CONVERSATIONS if not (n in GEMMA2 and c == "system")]


def encode(tok, record, max_length=512):
    example, status, _ = encode_record(Encoder(tok), parse_record(record, "rec"), 0, "rec",
                                       max_length=max_length)
    assert status == "ok"
    return example.input_ids.tolist(), example.loss_mask.tolist()


def expected(tok, name, messages, first_trained=0):
    """(ids, mask) by character offsets: the template's text tokenised whole, a token trained
    when it starts inside one of the replies from the `first_trained`-th on; BOS in front unless
    the template wrote it, EOS appended (and trained) unless the last reply holds it."""
    _, header, turn_start = FAMILIES[name]
    text = tok.apply_chat_template(messages, tokenize=False)
    spans, at = [], text.find(header)
    while at >= 0:
        start = at + len(header)
        end = text.find(turn_start, start)
        # Phi-3's turn-end <|end|> also starts with "<|"; the next turn starts after it.
        while end >= 0 and text.startswith(("<|end|>", "<|endoftext|>"), end):
            end = text.find(turn_start, end + 1)
        spans.append((start, len(text) if end < 0 else end))
        at = text.find(header, start)
    spans = spans[first_trained:]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, mask = list(enc["input_ids"]), []
    for s, e in enc["offset_mapping"]:
        inside = [a <= s < b for a, b in spans]
        # A header token may take the whitespace after it (Phi-3's rstrip tokens: the header's
        # newline and a reply's leading spaces); it stays untrained. Nothing else straddles.
        assert not any(s < a < e and text[a:e].strip() for a, _ in spans), "a token straddles"
        mask.append(int(any(inside)))
    bos = tok.bos_token_id
    if tok("a")["input_ids"][0] == bos and ids[:1] != [bos]:
        ids, mask = [bos] + ids, [0] + mask
    last = [t for t, (s, _) in zip(enc["input_ids"], enc["offset_mapping"])
            if spans[-1][0] <= s < spans[-1][1]]
    if tok.eos_token_id not in last:
        ids, mask = ids + [tok.eos_token_id], mask + [1]
    return ids, mask


@pytest.mark.parametrize("name,conv", CASES)
def test_mask_covers_exactly_the_assistant_replies(toks, name, conv):
    tok, messages = toks[name], CONVERSATIONS[conv]
    ids, mask = encode(tok, {"messages": messages})
    assert (ids, mask) == expected(tok, name, messages)
    if tok.bos_token_id is not None:  # Gemma's template writes <bos> and its tokenizer adds one
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


# The trained runs of the "system" conversation (the "no_system" one for Gemma 2), decoded: each
# reply with its turn end and what follows up to the next turn (Gemma's newline; Phi-3's when
# <|end|> does not strip it, after the stand-in vocabulary's "▁"), the last with the EOS.
TRAINED = {
    "gemma2": ["It is 4.<end_of_turn>\n", "6, of course; 6.<end_of_turn>\n<eos>"],
    "gemma3": ["It is 4.<end_of_turn>\n", "6, of course; 6.<end_of_turn>\n<eos>"],
    "phi3": ["It is 4.<|end|>", "6, of course; 6.<|end|><|endoftext|>"],
    "phi3_no_rstrip": ["It is 4.<|end|> \n", "6, of course; 6.<|end|> \n<|endoftext|>"],
    "phi3_5": ["It is 4.<|end|>", "6, of course; 6.<|end|><|endoftext|>"],
    "phi4": ["It is 4.<|im_end|>", "6, of course; 6.<|im_end|>"],
}


@pytest.mark.parametrize("name", NAMES)
def test_trained_text(toks, name):
    tok = toks[name]
    messages = CONVERSATIONS["no_system" if name in GEMMA2 else "system"]
    ids, mask = encode(tok, {"messages": messages})
    assert runs(tok, ids, mask) == TRAINED[name]
    untrained = tok.decode([t for t, m in zip(ids, mask) if not m])
    for msg in messages:
        assert (msg["content"] in untrained) == (msg["role"] != "assistant"), msg
    _, header, _ = FAMILIES[name]
    assert untrained.count(header.strip()) == 2  # both reply headers stay in the prompt


def test_gemma_trims_replies_and_trains_what_it_renders(toks):
    tok = toks["gemma3"]
    ids, mask = encode(tok, {"messages": CONVERSATIONS["whitespace"]})
    assert runs(tok, ids, mask) == ["Line one.\nLine two.<end_of_turn>\n",
                                    "Three.<end_of_turn>\n<eos>"]


def test_gemma3_folds_the_system_turn_into_the_first_user_turn(toks):
    tok = toks["gemma3"]
    ids, mask = encode(tok, {"messages": CONVERSATIONS["system"]})
    prompt = tok.decode(ids[:mask.index(1)])
    assert prompt == ("<bos><start_of_turn>user\nYou answer in one line.\n\nWhat is 2+2?"
                      "<end_of_turn>\n<start_of_turn>model\n")


def test_gemma2_refuses_a_system_turn_naming_the_record(toks, tmp_path):
    path = tmp_path / "train.jsonl"
    records = [{"messages": TURNS}, {"messages": [SYSTEM] + TURNS}, {"messages": TURNS}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=rf"^{path} line 2: the chat template rejects this "
                                        r"record: System role not supported"):
        load_examples(str(path), toks["gemma2"], kind="sft", max_length=128)
    loaded = load_examples(str(path), toks["gemma2"], kind="sft", max_length=128, skip_invalid=True)
    assert [e.index for e in loaded.examples] == [0, 2]
    assert loaded.report.num_skipped == 1 and loaded.report.errors[0][0] == f"{path} line 2"


@pytest.mark.parametrize("name", NAMES)
def test_prompt_completion_trains_only_the_completion(toks, name):
    tok = toks[name]
    messages = CONVERSATIONS["no_system" if name in GEMMA2 else "system"]
    ids, mask = encode(tok, {"prompt": messages[:-1], "completion": messages[-1:]})
    assert (ids, mask) == expected(tok, name, messages, first_trained=1)


@pytest.mark.parametrize("name", NAMES)
def test_preference_pair_masks(toks, name):
    tok = toks[name]
    prompt = TURNS[:3]
    record = {"prompt": prompt, "chosen": [bot("Twelve.")], "rejected": [bot("Eleven.")]}
    example, status, _ = encode_record(Encoder(tok), parse_record(record, "rec"), 0, "rec",
                                       max_length=512)
    for side, ids, mask in (("Twelve.", example.chosen_ids, example.chosen_mask),
                            ("Eleven.", example.rejected_ids, example.rejected_mask)):
        assert (ids.tolist(), mask.tolist()) == expected(tok, name, prompt + [bot(side)],
                                                         first_trained=1)


def test_end_of_conversation_text_other_than_special_tokens_is_still_refused(toks):
    # Phi-3 writes its EOS only after the last turn: a run of special tokens the whole
    # conversation also ends with is left out of an earlier turn. Plain text there is not
    # (the template would render earlier turns differently): a DataError, never a guessed mask.
    tok = phi3_tokenizer("phi3.jinja", rstrip=True)
    tok.chat_template = tok.chat_template.replace("{{ eos_token }}", "{{ 'The end.' }}")
    with pytest.raises(DataError, match=r"rec: the chat template renders the first 2 messages "
                                        r"differently .*\(not a token prefix\)"):
        encode(tok, {"messages": TURNS})
    encode(tok, {"messages": TURNS[:2]})  # one turn: nothing before the end to compare
