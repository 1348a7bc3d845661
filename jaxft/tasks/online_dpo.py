"""Online DPO (`dpo.online=True`), as TRL's OnlineDPOTrainer: each step samples two completions of
each of its prompts with the policy as it is at that step, scores them with `dpo.online_rewards`
(`jaxft.rewards`) and takes the DPO step on the pairs.

- Prompts: data.train holds prompt records (`jaxft.data.prompts`: a "prompt" or "messages" and
  the fields the rewards read, such as "answer"); a step takes `train.batch_size` of them, in a
  seeded order that a resumed run continues.
- Sampling: `jaxft.inference.sampler.sample_ids` on the train state's own params (no copy: the
  model is merged from `state["params"]`, scanned layers left scanned, `unroll=False`), on the
  run's mesh, at `dpo.online_temperature`, up to `dpo.online_max_new_tokens` tokens. Sample j of
  a prompt at optimizer step s is drawn from seed `sampling_seed(train.seed, s) + j`, so a resumed
  run samples what an uninterrupted one samples.
- Pairs: the higher-reward sample is chosen, the lower rejected. A tie (equal rewards, e.g. two
  right answers) carries no preference: its slot stays empty (pair mask 0: no loss, no gradient)
  and it is counted in `objective/ties`. A step whose pairs all tie still applies the optimizer
  (a zero gradient: Adam's momentum and weight decay move the weights, as on any such step).
- The pair batch is the unpacked DPO layout offline DPO's data path builds
  (`jaxft.data.packing.BatchLayout`: rows 2i / 2i+1 the chosen / rejected, prompt + sampled
  tokens, the loss mask on the sampled tokens), so the jitted step is DPO's, reference and all:
  the starting policy (a frozen copy, or with LoRA the base with the adapters off), another
  folder (dpo.reference), or none.

Metrics besides DPO's (TRL's names where TRL has one): `objective/scores` (mean reward of the
samples), `objective/scores/KIND` (each reward term), `objective/scores_margin` (chosen minus
rejected reward, mean over the pairs, ties counting 0), `objective/ties` (share of tied pairs),
`val/contain_eos_token` (share of samples that ended on EOS), `val/completion_length` (mean
sampled tokens), `time/sampling` (seconds a step spent sampling and scoring).
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from jaxft.data.batch import PreferenceExample
from jaxft.data.packing import BatchLayout
from jaxft.data.pipeline import pad_id_of
from jaxft.errors import ConfigError
from jaxft.inference.completions import eos_ids, finish
from jaxft.inference.sampler import sample_ids
from jaxft.parallel.batches import to_global
from jaxft.rewards import REWARDS, make_reward, parse_rewards
from jaxft.steps.common import merge_model
from jaxft.tasks.base import RunContext
from jaxft.tasks.dpo import DPO

REWARDS_KEY = "dpo.online_rewards"


def sampling_seed(seed: int, step: int) -> int:
    """The sampler's seed at optimizer step `step` (sample j uses it + j): a function of the
    run's seed and the step only, so a resumed run draws the same samples."""
    return (int(seed) * 1_000_003 + 2 * int(step)) % (1 << 31)


def online_problem(config) -> str | None:
    """What is wrong with the dpo.online_* settings of `config` (naming the key), or None."""
    dpo, data = config.dpo, config.data
    if not dpo.online_rewards.strip():
        return (f"config key {REWARDS_KEY}: online DPO scores its samples with rewards; set one, e.g. "
                f"--config.{REWARDS_KEY}=answer (kinds: {', '.join(sorted(REWARDS))})")
    if dpo.online_max_new_tokens < 1:
        return f"config key dpo.online_max_new_tokens: must be >= 1, got {dpo.online_max_new_tokens}"
    if dpo.online_max_new_tokens >= data.max_length:
        return (f"config key dpo.online_max_new_tokens: must be below data.max_length={data.max_length} (a row "
                f"holds the prompt and the completion), got {dpo.online_max_new_tokens}")
    if not (math.isfinite(dpo.online_temperature) and dpo.online_temperature > 0):
        return (f"config key dpo.online_temperature: must be > 0 (greedy samples would always tie), got "
                f"{dpo.online_temperature}")
    if data.packing:
        return "config key data.packing: online DPO lays each sampled pair out unpacked; set it to False"
    if data.streaming:
        return "config key data.streaming: online DPO reads its prompt records into memory; set it to False"
    if dpo.precompute_reference:
        return ("config key dpo.precompute_reference: online DPO samples its pairs during training, so no "
                "reference log-probs exist before it; set it to False")
    for i, spec in enumerate(parse_rewards(dpo.online_rewards, key=REWARDS_KEY)):
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        if kind not in REWARDS:
            return f"config key {REWARDS_KEY}[{i}]: unknown reward kind {kind!r}; known: {', '.join(sorted(REWARDS))}"
    return None


def pair_examples(prompts, completions, rewards) -> tuple[list[PreferenceExample | None], dict]:
    """The DPO pair of each prompt from its two sampled completions: (one PreferenceExample or
    None for a tie per prompt, the pair metrics).

    prompts: the `PromptBatch`; completions: per prompt its two `Completion`s; rewards: the
    reward function's output ({"reward": [P, 2], "reward/KIND": [P, 2], ...})."""
    total = np.asarray(rewards["reward"], np.float64)
    pairs, margins = [], []
    for ids, index, (a, b), r in zip(prompts.prompt_ids, prompts.indices, completions, total):
        if r[0] == r[1] or not np.isfinite(r).all():  # no preference (a NaN reward: none either)
            pairs.append(None)
            margins.append(0.0)
            continue
        chosen, rejected = (a, b) if r[0] > r[1] else (b, a)
        prompt = np.asarray(ids, np.int32)

        def sequence(c):
            return (np.concatenate([prompt, np.asarray(c.token_ids, np.int32)]),
                    np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(c.token_ids), np.int32)]))

        (c_ids, c_mask), (r_ids, r_mask) = sequence(chosen), sequence(rejected)
        pairs.append(PreferenceExample(c_ids, c_mask, r_ids, r_mask, index=int(index)))
        margins.append(float(abs(r[0] - r[1])))
    samples = [c for row in completions for c in row]
    metrics = {
        "objective/scores": float(total.mean()),
        **{f"objective/scores/{k.removeprefix('reward/')}": float(np.mean(v)) for k, v in rewards.items()
           if k != "reward"},
        "objective/scores_margin": float(np.mean(margins)),
        "objective/ties": float(np.mean([p is None for p in pairs])),
        "val/contain_eos_token": float(np.mean([c.finish_reason == "eos" for c in samples])),
        "val/completion_length": float(np.mean([len(c.token_ids) for c in samples])),
    }
    return pairs, metrics


class OnlineDPO(DPO):
    """DPO on pairs sampled and scored each step (module docstring). Its `step` takes a
    `jaxft.data.prompts.PromptBatch`, not a device batch."""

    @classmethod
    def validate(cls, config):
        problem = online_problem(config)
        if problem:
            raise ConfigError(problem)
        super().validate(config)

    @classmethod
    def load_data(cls, config, tokenizer, *, kind: str, workdir):
        """(the prompts of data.train, data.eval's preference pairs or None)."""
        from jaxft.data.from_config import eval_data
        from jaxft.data.prompts import load_prompts

        prompts = load_prompts(config.data.train, tokenizer, batch_size=config.train.batch_size,
                               seed=config.train.seed, max_length=config.data.max_length,
                               max_new_tokens=config.dpo.online_max_new_tokens,
                               chat_template=config.data.chat_template or None,
                               max_record_bytes=config.data.max_record_bytes)
        return prompts, eval_data(config, tokenizer, kind=kind, workdir=workdir)

    @classmethod
    def create(cls, ctx: RunContext, params: dict) -> "OnlineDPO":
        reward = make_reward(parse_rewards(ctx.config.dpo.online_rewards, key=REWARDS_KEY), key=REWARDS_KEY)
        task = super().create(ctx, params)
        task.reward = reward
        tok = ctx.tokenizer
        task.eos_ids = eos_ids(tok, ctx.model_config)
        task.layout = BatchLayout("dpo", False, ctx.config.data.max_length, pad_id_of(tok), 1,
                                  jax.process_index(), jax.process_count())
        return task

    def sample_pairs(self, state: dict, prompts) -> tuple[dict, dict]:
        """(the global DPO batch of `prompts`' sampled pairs, the sampling metrics), sampled
        with `state["params"]` as they are."""
        step = int(state["step"])  # waits for the previous update: the samples are of its weights
        began = time.perf_counter()
        ctx, cfg = self.ctx, self.ctx.config
        model = merge_model(ctx.graphdef, ctx.weights.merge_args(state["params"]))
        rows = sample_ids(model, prompts.prompt_ids, samples=2, max_new_tokens=cfg.dpo.online_max_new_tokens,
                          temperature=cfg.dpo.online_temperature, eos_ids=self.eos_ids,
                          seed=sampling_seed(cfg.train.seed, step),
                          batch_size=2 * len(prompts.prompt_ids), unroll=False)
        del model  # its arrays are the state's, which the train step donates

        def decode(tokens):
            return ctx.tokenizer.decode(tokens, skip_special_tokens=True)

        completions = [[finish(r, eos_ids=self.eos_ids, decode=decode) for r in row] for row in rows]
        rewards = self.reward(prompts.records, [[c.text for c in row] for row in completions])
        pairs, metrics = pair_examples(prompts, completions, rewards)
        batch, real, slots = self.layout.build([[] if p is None else [(p, p.index)] for p in pairs])
        metrics["real_tokens"] = float(real)  # the Window's tokens/s (`jaxft.loop.hooks`)
        metrics["padding_fraction"] = 1.0 - real / slots
        metrics["time/sampling"] = time.perf_counter() - began
        return to_global(batch, ctx.mesh), metrics

    def step(self, state: dict, prompts) -> tuple[dict, dict]:
        """Samples and scores the pairs of `prompts` (a `PromptBatch`) with the current params,
        then DPO's train step on them."""
        batch, sampled = self.sample_pairs(state, prompts)
        state, metrics = self.train_step(state, batch)
        return state, {**metrics, **sampled}
