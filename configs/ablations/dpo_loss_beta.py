"""Which DPO loss and beta? Three TRL loss types x two betas, each DPO run starting from the
same SFT run's export (the quickstart's recipe in miniature).

  jaxft sweep configs/ablations/dpo_loss_beta.py --workdir runs/dpo_loss_beta
  jaxft compare runs/dpo_loss_beta --pairs jaxft/assets/quickstart/pref_eval.jsonl --metric eval_rewards/accuracies
"""

from pathlib import Path

import jaxft.config
from jaxft.sweep import grid, run

CONFIGS = Path(__file__).resolve().parent.parent
KIND = "dpo"


def get_config(arg: str = ""):
    del arg
    config = jaxft.config.load(f"{CONFIGS}/dpo.py:tiny")
    config.model.path = ""  # set per run: the SFT run's export
    config.train.steps = 80
    config.train.eval_every = 40
    config.train.save_every = 0
    config.dpo.loss_weights = ""  # one loss each, weight 1
    return config


def get_sweep(arg: str = ""):
    del arg
    sft = run("sft", kind="sft", config=f"{CONFIGS}/sft.py:tiny", overrides={"train.eval_every": 0})
    dpo = grid({"dpo.loss_type": ["sigmoid", "ipo", "hinge"], "dpo.beta": [0.1, 0.5]}, kind="dpo",
               overrides={"model.path": "@sft/hf"})
    return [sft, *dpo]
