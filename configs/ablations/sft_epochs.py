"""How many SFT epochs before the model overfits? SFT for 1, 2 and 4 epochs on the quickstart
data, evaluated at the end of every epoch (DeepSeek LLM fine-tunes its 7B model for 4 epochs
but its 67B for only 2, because the larger one overfits sooner).

  jaxft sweep configs/ablations/sft_epochs.py --workdir runs/sft_epochs
  jaxft compare runs/sft_epochs --data jaxft/assets/quickstart/sft_eval.jsonl --limit 100

Arg "dpo" (configs/ablations/sft_epochs.py:dpo) adds a DPO run on top of each SFT run.
"""

from pathlib import Path

import jaxft.config
from jaxft.sweep import grid, run

CONFIGS = Path(__file__).resolve().parent.parent
KIND = "sft"


def get_config(arg: str = ""):
    del arg  # the base config is the same with or without the DPO runs
    config = jaxft.config.load(f"{CONFIGS}/sft.py:tiny")
    config.train.eval_every = -1  # at the end of every epoch
    config.train.save_every = 0  # a checkpoint at the end only
    return config


def get_sweep(arg: str = ""):
    sft = grid({"train.epochs": [1.0, 2.0, 4.0]}, kind="sft", prefix="sft_")
    if arg != "dpo":
        return sft
    return sft + [run(f"{r.name}_dpo", kind="dpo", config=f"{CONFIGS}/dpo.py:tiny",
                      overrides={"model.path": f"@{r.name}/hf", "train.steps": 100}) for r in sft]
