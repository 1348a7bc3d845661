"""Online DPO: `jaxft dpo --config configs/online_dpo.py[:PRESET] --workdir DIR` (docs/dpo.md, "Online DPO").

Each step samples two completions of each of `train.batch_size` prompts of data.train with the
current weights, scores them with `dpo.online_rewards`, and takes a DPO step on the pair (higher
reward chosen; ties skipped and counted), as TRL's OnlineDPOTrainer. Everything else is a DPO
config (configs/dpo.py's keys and defaults, with the reference kept live: no precomputed table).

No preset: your own SFT model and prompt records ("prompt" or "messages", plus the fields the
rewards read, such as "answer"):

  jaxft dpo --config configs/online_dpo.py --config.model.path=runs/my_sft/hf \\
      --config.data.train=prompts.jsonl --config.dpo.online_rewards="answer:1,repetition:0.5" \\
      --workdir runs/online_dpo

Presets:
  tiny   from the quickstart's SFT model on its arithmetic prompts, rewarding exact answers and
         penalising repetition; exact match and repetition of the 200 held-out questions at the
         end (eval/arithmetic/*); a few minutes on a CPU:
           jaxft quickstart --workdir qs
           jaxft dpo --config configs/online_dpo.py:tiny --config.model.path=qs/sft/hf --workdir qs/online_dpo
"""

from pathlib import Path

from jaxft.config import load_file, lock
from jaxft.data.assets import quickstart_file


def dpo_config(preset: str = ""):
    """configs/dpo.py's config (its PRESET), unlocked."""
    c = load_file(str(Path(__file__).with_name("dpo.py")) + (f":{preset}" if preset else ""))
    c.unlock()
    return c


def online(c):
    c.dpo.online = True
    c.dpo.precompute_reference = False  # the pairs do not exist before training
    return c


def own_model():
    c = online(dpo_config())
    c.dpo.online_rewards = "answer"
    c.dpo.online_max_new_tokens = 256
    c.train.epochs = 0.0
    c.train.steps = 500
    return c


def tiny(c):
    c = online(dpo_config("tiny"))
    c.data.train = str(quickstart_file("sft_train.jsonl"))  # prompt records with their "answer"
    c.data.eval = ""
    c.train.eval_benchmarks = f"arithmetic={quickstart_file('sft_eval.jsonl')}"
    c.train.eval_benchmark_max_new_tokens = 64  # as the quickstart's table
    c.train.eval_every = 50
    c.train.steps = 200
    c.train.batch_size = 16
    c.train.log_every = 10
    c.train.save_every = 100
    c.optim.lr = 2e-5  # iterate's tiny rounds' lr (docs/iterate.md: 1e-4 costs exact match)
    c.dpo.online_rewards = "answer:1,repetition:1"
    c.dpo.online_max_new_tokens = 48
    c.dpo.online_temperature = 1.0
    return c


PRESETS = {"tiny": tiny}


def get_config(arg: str = ""):
    c = own_model()
    if arg:
        if arg not in PRESETS:
            raise ValueError(f"configs/online_dpo.py: unknown preset {arg!r}; choose one of {', '.join(PRESETS)} "
                             "(or none, for your own model)")
        c = PRESETS[arg](c)
    return lock(c)
