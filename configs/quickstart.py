"""The quickstart's SFT stage as a config file (`jaxft quickstart` runs SFT and then DPO).

  jaxft sft --config configs/quickstart.py:WORKDIR --workdir WORKDIR/sft

expects WORKDIR/data and WORKDIR/base as `jaxft quickstart --workdir WORKDIR` writes them; the
DPO stage is `quickstart_configs(...)[1]` in jaxft/quickstart/pipeline.py.
"""

from pathlib import Path

from jaxft.quickstart.pipeline import quickstart_configs


def get_config(arg: str = "jaxft_quickstart"):
    sft, _ = quickstart_configs(Path(arg or "jaxft_quickstart").absolute())
    return sft
