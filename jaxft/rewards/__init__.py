"""Rewards for sampled completions (iterative and online DPO, rejection sampling), by kind.

A reward scores every completion of every prompt at once:

    reward(records, completions) -> float array [P, K]

records: the P prompt records as read (the prompt and whatever fields a check needs: "answer",
"test", ...); completions: P lists of K strings. `make_reward(specs)` builds the weighted sum of
several, each spec a dict {"kind": KIND, "weight": w, **options} (a bare string is {"kind": it}):

    answer      1 when the completion's final answer (the number after "The answer is", a
                \\boxed{}, else the last number) equals the record's "answer" (GSM8K's "#### 72"
                references too), else 0
    benchmark   1 when a registered benchmark's judge accepts it (option "benchmark": "gsm8k",
                "math", "humaneval", "mbpp", ...; the records in that benchmark's format)
    regex       1 when option "pattern" matches (re.search), else 0; "full": True for fullmatch
    length      -(words - max_words) / max_words past option "max_words", else 0
    repetition  -(the completion's repeated word 3-gram share, DeepSeek's repetition ratio)
    reward_model  option "path": a Hugging Face *ForSequenceClassification folder, run in JAX
                (`jaxft.rewards.reward_model`): its score of the prompt + completion
    python      option "function": "module:function", called TRL-style as
                function(prompts=[...], completions=[...], **{field: [...]}) on the P * K
                completions flattened prompt-major; returns P * K floats
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from jaxft.errors import ConfigError

Reward = Callable[[Sequence[dict], Sequence[Sequence[str]]], np.ndarray]
REWARDS: dict[str, Callable[..., Reward]] = {}


def register(kind: str):
    """Decorator: `make(**options) -> Reward` as reward kind `kind`."""
    def add(make):
        REWARDS[kind] = make
        return make
    return add


def _spec(spec, where: str) -> dict:
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ConfigError(f"{where}: a reward is a kind name or a dict with 'kind' (and 'weight', options), "
                          f"got {spec!r}")
    if spec["kind"] not in REWARDS:
        raise ConfigError(f"{where}: unknown reward kind {spec['kind']!r}; known: {', '.join(sorted(REWARDS))}")
    return dict(spec)


def make_reward(specs, *, key: str = "rewards") -> Callable[[Sequence[dict], Sequence[Sequence[str]]],
                                                             dict[str, np.ndarray]]:
    """The weighted sum of `specs` (see the module docstring). Returns a function of
    (records, completions) giving {"reward": [P, K] total, "reward/KIND": [P, K] each term
    unweighted}; `key` names the config key in errors."""
    specs = [specs] if isinstance(specs, (str, dict)) else list(specs or [])
    if not specs:
        raise ConfigError(f"{key}: no rewards; give at least one, e.g. [{{'kind': 'answer'}}]")
    terms = []
    for i, raw in enumerate(specs):
        spec = _spec(raw, f"{key}[{i}]")
        kind, weight = spec.pop("kind"), float(spec.pop("weight", 1.0))
        try:
            terms.append((kind, weight, REWARDS[kind](**spec)))
        except TypeError as err:
            raise ConfigError(f"{key}[{i}] ({kind}): {err}") from err
    names = [kind for kind, _, _ in terms]

    def reward(records, completions) -> dict[str, np.ndarray]:
        shape = (len(records), len(completions[0]) if len(completions) else 0)
        if len(completions) != len(records) or any(len(c) != shape[1] for c in completions):
            raise ValueError(f"need K completions for each of the {len(records)} records")
        out, total = {}, np.zeros(shape, np.float64)
        for i, (kind, weight, fn) in enumerate(terms):
            value = np.asarray(fn(records, completions), np.float64).reshape(shape)
            name = kind if names.count(kind) == 1 else f"{kind}{i}"
            out[f"reward/{name}"] = value
            total += weight * value
        out["reward"] = total
        return out

    return reward


def parse_rewards(text: str, *, key: str = "iterate.rewards") -> list[dict]:
    """Reward specs from a config string: "KIND[:WEIGHT],..." ("answer:1,repetition:0.5"), or a
    JSON list of {"kind", "weight", options} for kinds with options (regex, length, benchmark,
    python). Errors name `key`."""
    import json

    text = (text or "").strip()
    if text.startswith(("[", "{")):
        try:
            specs = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: not valid JSON ({err}): {text!r}") from err
        return [specs] if isinstance(specs, dict) else list(specs)
    specs = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        kind, _, weight = term.partition(":")
        try:
            specs.append({"kind": kind.strip(), "weight": float(weight) if weight else 1.0})
        except ValueError:
            raise ConfigError(f"{key}: {term!r}: the weight after ':' must be a number") from None
    return specs


from jaxft.rewards import checks, python_callable, reward_model  # noqa: E402,F401  (they register their kinds)
