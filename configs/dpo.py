"""DPO configs: `jaxft dpo --config configs/dpo.py:PRESET --workdir DIR [--config.KEY=VALUE ...]`.

Presets:
  tiny        DPO on the bundled preference pairs, starting from an SFT export
              (--config.model.path=SFT_WORKDIR/hf); the quickstart runs this after SFT
  llama3_8b / qwen2_5_7b / mistral_7b / deepseek_llm_7b
              real models: set --config.model.path (your SFT model) and --config.data.train
Common switches: --config.dpo.loss_type=ipo|hinge|... (TRL's names), --config.dpo.beta,
--config.dpo.reference=policy|PATH|none, --config.dpo.precompute_reference=True.
"""

from jaxft.config import base_config, lock
from jaxft.data.assets import quickstart_file


def get_config(arg: str = "tiny"):
    c = base_config()
    preset = arg or "tiny"
    c.dpo.beta = 0.1
    c.dpo.loss_type = "sigmoid"
    c.dpo.reference = "policy"
    if preset == "tiny":
        c.model.preset = "tiny"
        c.data.train = str(quickstart_file("pref_train.jsonl"))
        c.data.eval = str(quickstart_file("pref_eval.jsonl"))
        c.data.max_length = 128
        c.train.steps = 150
        c.train.batch_size = 16
        c.train.log_every = 25
        c.train.eval_every = 50
        c.train.save_every = 50
        c.optim.lr = 1e-4
        c.optim.warmup_steps = 10
        c.dpo.loss_type = "sigmoid,sft"  # DPO + NLL on chosen (RPO), as the quickstart
        c.dpo.loss_weights = "1.0,1.0"
        c.dpo.precompute_reference = True
        return lock(c)

    c.model.preset = ""
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    c.data.max_length = 2048
    c.train.batch_size = 64
    c.train.epochs = 1.0
    c.train.loss_chunk_size = 512
    c.optim.lr = 5e-7  # DPO wants a far smaller step than SFT (TRL / Zephyr use 5e-7)
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 50
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.dpo.precompute_reference = True  # no reference forward per step, no reference in memory
    if preset not in ("llama3_8b", "qwen2_5_7b", "mistral_7b", "deepseek_llm_7b"):
        raise ValueError(
            f"configs/dpo.py: unknown preset {preset!r}; choose tiny, llama3_8b, qwen2_5_7b, "
            "mistral_7b or deepseek_llm_7b"
        )
    return lock(c)
