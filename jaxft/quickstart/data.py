"""The project's own generated data: quickstart instructions/preferences and tokenizer text.

The quickstart retells the DeepSeek LLM story (SFT, then DPO) with a ~1M-parameter model on
two CPU cores, so the data is built for learnability rather than variety:

* Questions are small arithmetic problems (operands 0-9), asked
  directly ("What is 7 + 5?") or as word problems ("Tom has 3 apples and buys 4 more. ...").
  Every answer first restates the problem as an equation and then commits to a number:
  "3 + 4 = 7. The answer is 7." The equation turns every phrasing into the same computation,
  and "The answer is N" makes answers checkable (`extract_answer`).
* Evaluation questions never occur in training as text: by default they are new wordings of
  training problems (the instruction-following a tiny model can learn in a minute); with
  `eval_split="problem"` whole `(operation, a, b)` problems are held out, which measures
  arithmetic the model was never shown (too hard for the quickstart's budget).
* A configurable share of SFT answers repeat their last sentence ("... The answer is 12. The
  answer is 12. The answer is 12."), as real SFT data does. The repetitive answers are drawn
  first from one "noisy" phrasing per operation (the "NAME asks: calculate ..." prompts): were they
  spread uniformly, greedy decoding would never repeat (stopping is always the likelier
  continuation) and DPO would have nothing visible to fix.
* Preference pairs prefer the clean correct answer over a wrong one (off by one or another
  number) or a degenerate, repetitive one; prompts of the noisy phrasing always get a
  repetitive rejected answer, which is what teaches DPO to stop repeating.

Records follow TRL's conversational formats (docs/data.md, "Data formats"); each also carries its
gold `answer` as a string.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from jaxft.errors import ConfigError
from jaxft.io import atomic

SPLITS = ("sft_train", "sft_eval", "pref_train", "pref_eval")

# Operation -> (equation symbol, operand pairs). Subtraction keeps results non-negative.
_OPERANDS = {
    "add": [(a, b) for a in range(10) for b in range(10)],
    "sub": [(a, b) for a in range(10) for b in range(a + 1)],
    "mul": [(a, b) for a in range(10) for b in range(10)],
}
_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
_RESULT = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}

_NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Emma")
# (singular, plural)
_ITEMS = (
    ("apple", "apples"), ("pear", "pears"), ("book", "books"), ("coin", "coins"),
    ("marble", "marbles"), ("sticker", "stickers"), ("pencil", "pencils"), ("cookie", "cookies"),
)
_SYSTEM_PROMPTS = (
    "You are a helpful math tutor.",
    "Solve the problem and end with: The answer is N.",
    "You are a careful assistant. Answer briefly.",
)

# Question templates per operation. Placeholders: {a} {b} (numbers), {na} {nb} (counted
# nouns, e.g. "1 apple" / "3 apples"), {bags} (a counted), {items} (plural), {name}.
# The first template of each list is the "noisy" phrasing (see the module docstring).
_TEMPLATES = {
    "add": (
        "{name} asks: calculate {a} + {b}.",
        "What is {a} + {b}?",
        "What is {a} plus {b}?",
        "Add {a} and {b}.",
        "{name} has {na} and buys {b} more. How many {items} does {name} have?",
    ),
    "sub": (
        "{name} asks: calculate {a} - {b}.",
        "What is {a} - {b}?",
        "What is {a} minus {b}?",
        "Subtract {b} from {a}.",
        "{name} has {na} and gives {b} away. How many {items} are left?",
    ),
    "mul": (
        "{name} asks: calculate {a} * {b}.",
        "What is {a} * {b}?",
        "What is {a} times {b}?",
        "Multiply {a} by {b}.",
        "{name} has {bags} with {nb} in each. How many {items} in total?",
    ),
}
_NOISY_TEMPLATE = 0

_ANSWER_RE = re.compile(r"The answer is\s*(-?\d+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """Returns the number N of the first "The answer is N" in `text`, or None.

    The first occurrence counts because it is the answer the model committed to; anything
    after it (a degenerate repeat, a truncated tail) should not change the verdict. The
    number is normalised ("07" -> "7") so it compares equal to a record's `answer`.
    """
    match = _ANSWER_RE.search(text)
    return None if match is None else str(int(match.group(1)))


def _count(n: int, item: tuple[str, str]) -> str:
    return f"{n} {item[0] if n == 1 else item[1]}"


def _question(rng: random.Random, op: str, a: int, b: int, template: int) -> str:
    item = rng.choice(_ITEMS)
    return _TEMPLATES[op][template].format(
        a=a, b=b, na=_count(a, item), nb=_count(b, item), items=item[1], name=rng.choice(_NAMES),
        bags=_count(a, ("bag", "bags")),
    )


def _solution(op: str, a: int, b: int, result: int, repeats: int = 0) -> str:
    """`a op b = result. The answer is result.` followed by `repeats` copies of the last sentence."""
    final = f"The answer is {result}."
    return " ".join([f"{a} {_SYMBOL[op]} {b} = {result}.", final] + [final] * repeats)


def split_problems(seed: int = 0, eval_fraction: float = 0.15) -> tuple[list, list]:
    """Splits every `(op, a, b)` problem into train and held-out eval lists, per operation.

    Returns `(train, eval)`, each a list of `(op, a, b)` tuples; the split depends only on
    `seed` and `eval_fraction`, so eval questions never share a problem with training ones.
    """
    rng = random.Random(f"split-{seed}")
    train, held_out = [], []
    for op, pairs in _OPERANDS.items():
        pairs = list(pairs)
        rng.shuffle(pairs)
        n_eval = max(1, round(eval_fraction * len(pairs)))
        held_out += [(op, a, b) for a, b in sorted(pairs[:n_eval])]
        train += [(op, a, b) for a, b in sorted(pairs[n_eval:])]
    return train, held_out


def _prompt(rng: random.Random, problem: tuple, system_fraction: float) -> tuple[list[dict], int]:
    """Samples a phrasing of `problem`; returns (prompt messages, template index)."""
    op, a, b = problem
    template = rng.randrange(len(_TEMPLATES[op]))
    messages = []
    if rng.random() < system_fraction:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": _question(rng, op, a, b, template)})
    return messages, template


def _sft_records(rng, problems, n, *, repeat_fraction, system_fraction) -> list[dict]:
    drafts = []
    for _ in range(n):
        problem = rng.choice(problems)
        messages, template = _prompt(rng, problem, system_fraction)
        drafts.append((problem, messages, template))
    # Exactly round(repeat_fraction * n) repetitive answers, noisy phrasings first.
    order = list(range(n))
    rng.shuffle(order)
    order.sort(key=lambda i: drafts[i][2] != _NOISY_TEMPLATE)
    repetitive = set(order[: round(repeat_fraction * n)])
    records = []
    for i, ((op, a, b), messages, _) in enumerate(drafts):
        result = _RESULT[op](a, b)
        repeats = rng.randint(2, 3) if i in repetitive else 0
        answer = {"role": "assistant", "content": _solution(op, a, b, result, repeats)}
        records.append({"messages": messages + [answer], "answer": str(result)})
    return records


def _wrong_result(rng: random.Random, result: int) -> int:
    """A plausible mistake: mostly off by one, sometimes another small number."""
    if rng.random() < 0.6:
        candidates = [r for r in (result - 1, result + 1) if r >= 0]
    else:
        candidates = [r for r in range(max(0, result - 10), result + 11) if r != result]
    return rng.choice(candidates)


def _pref_records(rng, problems, n, *, system_fraction) -> list[dict]:
    records = []
    for _ in range(n):
        problem = rng.choice(problems)
        op, a, b = problem
        prompt, template = _prompt(rng, problem, system_fraction)
        result = _RESULT[op](a, b)
        chosen = _solution(op, a, b, result)
        kind = "repeat" if template == _NOISY_TEMPLATE else rng.choice(("wrong", "wrong", "repeat", "wrong_repeat"))
        repeats = rng.randint(2, 3) if kind != "wrong" else 0
        shown = _wrong_result(rng, result) if kind != "repeat" else result
        rejected = _solution(op, a, b, shown, repeats)
        records.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "answer": str(result),
        })
    return records


def make_quickstart_data(
    seed: int = 0,
    num_sft: int = 4000,
    num_pref: int = 2000,
    num_eval: int = 200,
    *,
    repeat_fraction: float = 0.12,
    system_fraction: float = 0.05,
    eval_fraction: float = 0.15,
    eval_split: str = "wording",
) -> dict[str, list[dict]]:
    """Generates the quickstart's SFT and preference data, deterministically from `seed`.

    Args:
      seed: seeds the problem split and every sampling choice (a private `random.Random`).
      num_sft / num_pref: number of training records of each kind.
      num_eval: number of records in each of `sft_eval` and `pref_eval`.
      repeat_fraction: share of `sft_train` answers that repeat their last sentence.
      system_fraction: share of prompts that start with a system message.
      eval_split: "wording" (default): eval questions are worded differently from every
        training question (text never seen in training) but ask for facts from the training
        distribution — what a ~1M-parameter model can learn in a minute; "problem": eval
        problems (op, a, b) are held out entirely, which measures arithmetic never shown.
      eval_fraction: with eval_split="problem", the share of each operation's problems held out.

    Returns:
      `{"sft_train", "sft_eval", "pref_train", "pref_eval"}` -> records. SFT records are
      `{"messages": [system?, user, assistant], "answer": str}`; `sft_eval` answers are always
      clean. Preference records are `{"prompt": [system?, user], "chosen": [assistant],
      "rejected": [assistant], "answer": str}` with a clean, correct `chosen`.
    """
    rng = random.Random(seed)
    if eval_split == "problem":
        train_problems, eval_problems = split_problems(seed, eval_fraction)
    elif eval_split == "wording":
        train_problems = eval_problems = [p for ps in split_problems(seed, 0.0) for p in ps]
    else:
        raise ConfigError(f"eval_split must be 'wording' or 'problem', got {eval_split!r}")
    sft_train = _sft_records(rng, train_problems, num_sft, repeat_fraction=repeat_fraction,
                             system_fraction=system_fraction)
    pref_train = _pref_records(rng, train_problems, num_pref, system_fraction=system_fraction)
    seen = {_question_text(r) for r in sft_train + pref_train}

    def unseen(make):
        # Draw until `num_eval` records whose question text never occurs in training.
        out = []
        while len(out) < num_eval:
            out += [r for r in make(num_eval) if _question_text(r) not in seen][: num_eval - len(out)]
        return out

    return {
        "sft_train": sft_train,
        "sft_eval": unseen(lambda n: _sft_records(rng, eval_problems, n, repeat_fraction=0.0,
                                                  system_fraction=system_fraction)),
        "pref_train": pref_train,
        "pref_eval": unseen(lambda n: _pref_records(rng, eval_problems, n, system_fraction=system_fraction)),
    }


def _question_text(record: dict) -> str:
    messages = record.get("messages") or record["prompt"]
    return next(m["content"] for m in messages if m["role"] == "user")


def write_quickstart_data(out_dir: str | Path, seed: int = 0, **kwargs) -> dict[str, Path]:
    """Writes `make_quickstart_data(seed, **kwargs)` as `<split>.jsonl` files in `out_dir`.

    Returns `{split: path}` for the four splits (`sft_train.jsonl`, `sft_eval.jsonl`,
    `pref_train.jsonl`, `pref_eval.jsonl`); the directory is created if needed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in make_quickstart_data(seed, **kwargs).items():
        paths[split] = out_dir / f"{split}.jsonl"
        atomic.write_text(paths[split], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return paths


# The bundled tokenizer's corpus (below) is frozen on purpose and shares nothing with the
# generator above: tuning the quickstart data (templates, ranges, splits) must not change
# token ids, which golden tests and trained checkpoints depend on. Editing the corpus means
# re-running `python -m jaxft.quickstart.tokenizer`, committing jaxft/assets/tokenizer, and
# updating the golden ids in tests/test_data_tokenize.py.
_CORPUS_QUESTIONS = (
    "What is {a} {op} {b}?",
    "Calculate {a} {op} {b}.",
    "{name} asks: calculate {a} {op} {b}.",
    "What is {a} plus {b}?",
    "What is {a} minus {b}?",
    "What is {a} times {b}?",
    "Add {a} and {b}.",
    "Subtract {b} from {a}.",
    "Multiply {a} by {b}.",
    "{name} has {a} {items} and buys {b} more. How many {items} does {name} have?",
    "{name} had {a} {items}. A friend gave {name} {b} more. How many {items} does {name} have now?",
    "{name} has {a} {items} and gives {b} away. How many {items} are left?",
    "A basket holds {a} {items}. {name} takes {b} of them. How many {items} are still in the basket?",
    "{name} has {a} bags with {b} {items} in each. How many {items} in total?",
    "There are {a} boxes. Each box holds {b} {items}. How many {items} are there in total?",
)
_CORPUS_WORDS = {
    "name": ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Emma"),
    "items": ("apples", "pears", "books", "coins", "marbles", "stickers", "pencils", "cookies"),
    "system": ("You are a helpful math tutor.", "Solve the problem and end with: The answer is N.",
               "You are a careful assistant. Answer briefly."),
}
_CORPUS_SIZE = 3000  # question/answer pairs: plenty for ~250 merges, trains in about a second

# Plain English, so that text outside the quickstart (a README example, a user's own prompt)
# still gets a few sensible merges instead of falling back to bytes only.
_ENGLISH = """\
The quick brown fox jumps over the lazy dog.
A language model predicts the next token from the tokens that came before it.
Fine-tuning adapts a pretrained model to a new task with a small amount of data.
Supervised fine-tuning teaches the model to follow instructions written by people.
Preference optimization then teaches it which of two answers people like better.
Direct preference optimization needs no separate reward model and no sampling loop.
The reference model stays frozen while the policy model is trained.
Please write a short summary of the article in three sentences.
Can you explain how a transformer uses attention to mix information between positions?
Yesterday it rained in the morning, but the afternoon was warm and sunny.
She opened the window, made a cup of tea and sat down to read the letter.
The train to the city leaves at half past eight and arrives before ten.
Children in the park were playing football while their parents talked on the benches.
He forgot his umbrella at home, so he waited under the bridge until the storm passed.
Our team meets every Monday to plan the work for the week ahead.
If you have any questions about the schedule, send a message to the group.
The library is open from nine in the morning until six in the evening.
Water boils at one hundred degrees Celsius at sea level.
The moon moves around the earth, and the earth moves around the sun.
Good software is tested often, reviewed by others and easy to change.
Read the instructions carefully before you start the experiment.
This document describes how to install the package and run the first example.
Thank you for your help; the results look much better now.
I would like to book a table for two people on Friday evening.
What time does the museum close on weekends?
Where is the nearest station, and how long does it take to walk there?
Why is the sky blue during the day and red at sunset?
Which of these two answers is more helpful, and why?
Write a friendly email inviting your colleagues to a farewell lunch.
The model was trained for three epochs with a learning rate of two times ten to the minus five.
Every night the old man walked his dog along the river and counted the boats.
Learning to play an instrument takes patience, practice and a good teacher.
The garden was full of roses, tulips and tall green grass.
They decided to paint the kitchen yellow and the bedroom light blue.
A good answer is correct, clear and no longer than it needs to be.
Repeating the same sentence again and again does not make an answer more helpful.
The first step is to read the data; the second is to clean it; the third is to train.
Most people agree that breakfast is an important meal of the day.
Please translate the following sentence into French.
The weather forecast says there will be snow in the mountains tomorrow.
"""


def tokenizer_training_text() -> list[str]:
    """The text the bundled tokenizer is trained on (a frozen corpus; see `_CORPUS_QUESTIONS`).

    Returns a list of lines: system prompts, then `_CORPUS_SIZE` arithmetic questions in the
    quickstart's phrasings, each followed by its worked answer ("7 + 5 = 12. The answer is
    12."), then the English sentences above. Deterministic (a private, fixed-seed
    `random.Random`), no downloads, and independent of `make_quickstart_data`'s settings.
    """
    rng = random.Random("tokenizer-corpus")
    lines = list(_CORPUS_WORDS["system"])
    for _ in range(_CORPUS_SIZE):
        op = rng.choice("+-*")
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = rng.choice(_CORPUS_QUESTIONS).format(
            a=a, b=b, op=op, name=rng.choice(_CORPUS_WORDS["name"]), items=rng.choice(_CORPUS_WORDS["items"]))
        lines += [question, f"{a} {op} {b} = {result}. The answer is {result}."]
    return lines + _ENGLISH.splitlines()
