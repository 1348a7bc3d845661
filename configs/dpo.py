"""DPO configs: `jaxft dpo --config configs/dpo.py[:PRESET] --workdir DIR [--config.KEY=VALUE ...]`.

No preset: plain DPO of your own (SFT) model, with TRL's DPO defaults: the sigmoid loss, beta
0.1, lr 1e-6, one epoch, the reference = the starting policy, its log-probs precomputed once
(no reference weights in memory during training):

  jaxft dpo --config configs/dpo.py --config.model.path=runs/my_sft/hf \\
            --config.data.train=pairs.jsonl --workdir runs/my_dpo

--config.train.steps=N trains N steps instead of the epoch (train.steps, when given, wins).

Presets:
  tiny        DPO + NLL (RPO) on the bundled preference pairs, starting from an SFT export
              (--config.model.path=SFT_WORKDIR/hf); the quickstart runs this after SFT
  llama3_8b / qwen2_5_7b / mistral_7b / deepseek_llm_7b
              real models at 2,048 tokens and lr 5e-7 (Zephyr's); set model.path and data.train
  llama3_8b_lora / llama3_8b_qlora
              DPO with LoRA rank 16 (alpha 32, all-linear, lr 5e-6) on a frozen bf16 / NF4 base: the
              reference is the base with the adapters off, so no second copy of the weights
  gemma3_4b / gemma3_4b_qlora
              Gemma-3-4B(-it), its text model: full DPO as the real models above, or LoRA rank 16
              (alpha 16, all-linear) on an NF4 base at lr 5e-6 with gradient clip 0.3
Common switches: --config.dpo.loss_type=ipo|hinge|... (TRL's names), --config.dpo.beta,
--config.dpo.reference=policy|PATH|none, --config.dpo.precompute_reference=False.
"""

from jaxft.config import base_config, lock
from jaxft.data.assets import quickstart_file


def own_model():
    """Your SFT model and preference pairs (set model.path and data.train)."""
    c = base_config()
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"
    c.data.max_length = 1024
    c.train.epochs = 1.0
    c.train.batch_size = 32  # pairs
    c.optim.lr = 1e-6  # DPO wants a far smaller step than SFT
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.1
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.dpo.loss_type = "sigmoid"
    c.dpo.beta = 0.1
    c.dpo.reference = "policy"
    c.dpo.precompute_reference = True
    return c


def tiny(c):
    c.model.preset = "tiny"
    c.model.compute_dtype = "float32"
    c.model.remat = "none"
    c.data.train = str(quickstart_file("pref_train.jsonl"))
    c.data.eval = str(quickstart_file("pref_eval.jsonl"))
    c.data.max_length = 128
    c.train.epochs = 0.0
    c.train.steps = 150
    c.train.batch_size = 16
    c.train.log_every = 25
    c.train.eval_every = 50
    c.train.save_every = 50
    c.train.loss_chunk_size = 0
    c.optim.lr = 1e-4
    c.optim.warmup_ratio = 0.0
    c.optim.warmup_steps = 10
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.dpo.loss_type = "sigmoid,sft"  # DPO + NLL on chosen (RPO), as the quickstart
    c.dpo.loss_weights = "1.0,1.0"


def real_model(c):
    c.data.max_length = 2048
    c.train.batch_size = 64
    c.optim.lr = 5e-7  # Zephyr's


def lora(c, quantization="none"):
    real_model(c)
    c.optim.lr = 5e-6  # adapters: ~10x the full fine-tuning lr
    c.model.dtype = "bfloat16"  # the frozen base; adapters and their optimizer stay float32
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = "all-linear"
    c.lora.base_quantization = quantization


def gemma3_qlora(c):
    """Gemma 3's adapters as configs/sft.py's gemma3_4b_qlora (Google's Gemma QLoRA guide: r=16,
    alpha=16, all-linear, NF4 base, max_grad_norm 0.3) at the DPO adapter lr above (5e-6): the
    Gemma guides give SFT learning rates only, so DPO's are those of the other presets (full:
    Zephyr's 5e-7)."""
    lora(c, quantization="nf4")
    c.lora.alpha = 16.0
    c.optim.clip_norm = 0.3


PRESETS = {"tiny": tiny, "llama3_8b": real_model, "qwen2_5_7b": real_model, "mistral_7b": real_model,
           "deepseek_llm_7b": real_model, "llama3_8b_lora": lora,
           "llama3_8b_qlora": lambda c: lora(c, quantization="nf4"),
           "gemma3_4b": real_model, "gemma3_4b_qlora": gemma3_qlora}


def get_config(arg: str = ""):
    c = own_model()
    if arg:
        if arg not in PRESETS:
            raise ValueError(f"configs/dpo.py: unknown preset {arg!r}; choose one of {', '.join(PRESETS)} "
                             "(or none, for your own model)")
        PRESETS[arg](c)
    return lock(c)
