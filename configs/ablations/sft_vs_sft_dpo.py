"""SFT alone, or SFT then DPO? The two stages of the quickstart as a two-run sweep; compare
them on held-out questions (exact match, repetition) and preference pairs.

  jaxft sweep configs/ablations/sft_vs_sft_dpo.py --workdir runs/sft_vs_sft_dpo
  jaxft compare runs/sft_vs_sft_dpo --data jaxft/assets/quickstart/sft_eval.jsonl \
      --pairs jaxft/assets/quickstart/pref_eval.jsonl --limit 100
"""

from pathlib import Path

import jaxft.config
from jaxft.sweep import run

CONFIGS = Path(__file__).resolve().parent.parent
KIND = "sft"


def get_config(arg: str = ""):
    del arg
    return jaxft.config.load(f"{CONFIGS}/sft.py:tiny")


def get_sweep(arg: str = ""):
    del arg
    return [run("sft", kind="sft", config=""),  # this file's config
            run("sft_dpo", kind="dpo", config=f"{CONFIGS}/dpo.py:tiny", overrides={"model.path": "@sft/hf"})]
