"""SFT configs: `jaxft sft --config configs/sft.py[:PRESET] --workdir DIR [--config.KEY=VALUE ...]`.

No preset: the recipe for your own model and data, with TRL's SFT defaults (lr 2e-5, cosine
decay after a 3% warmup, 3 epochs, 1,024-token rows, bf16 compute, FSDP over every device):

  jaxft sft --config configs/sft.py --config.model.path=/path/to/hf_model \\
            --config.data.train=train.jsonl --workdir runs/my_sft

The run's length: train.epochs, or train.steps when given (--config.train.steps=N trains N steps
whatever the epochs); the warmup: optim.warmup_ratio, or optim.warmup_steps when given.

Presets (the part after the colon):
  tiny             the bundled tiny model on the bundled arithmetic data; ~1 minute on a laptop CPU
  llama3_8b        Llama-3/3.1-8B(-Instruct): packed 4k rows; set model.path and data.train
  qwen2_5_7b       Qwen2.5-7B(-Instruct)
  mistral_7b       Mistral-7B-v0.3(-Instruct)
  deepseek_llm_7b  the DeepSeek LLM SFT recipe at 7B: 4 epochs, lr 1e-5, general/math/code mixture
  deepseek_llm_67b the same at 67B: only 2 epochs (the larger model overfits sooner), lr 5e-6
  llama3_8b_lora   Llama-3-8B with LoRA rank 16 (alpha 32, all-linear, lr 2e-4) on a frozen bf16 base
  llama3_8b_qlora  the same on an NF4 base (QLoRA): fits one 16 GiB chip (jaxft plan --target v5e-1)
  gemma3_4b        Gemma-3-4B(-it), its text model: full fine-tuning on packed 4k rows at lr 2e-5
  gemma3_4b_qlora  Gemma-3-4B on an NF4 base, LoRA rank 16 (alpha 16, all-linear) at lr 2e-4 and
                   gradient clip 0.3, as Google's Gemma QLoRA guide
Any preset or your own model takes adapters with --config.lora.rank=16 (see docs/lora.md).
"""

from jaxft.config import base_config, lock
from jaxft.data.assets import quickstart_file


def own_model():
    """Your model and data (set model.path and data.train), TRL's SFTConfig defaults."""
    c = base_config()
    c.model.compute_dtype = "bfloat16"  # on fp32 master weights
    c.model.remat = "full"
    c.data.max_length = 1024
    c.train.epochs = 3.0
    c.train.batch_size = 64
    c.train.log_every = 10
    c.train.save_every = 500
    c.optim.lr = 2e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.03
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c


def tiny(c):
    c.model.preset = "tiny"
    c.model.compute_dtype = "float32"
    c.model.remat = "none"
    c.data.train = str(quickstart_file("sft_train.jsonl"))
    c.data.eval = str(quickstart_file("sft_eval.jsonl"))
    c.data.max_length = 128
    c.data.packing = True
    c.train.epochs = 0.0  # the length is the steps (--config.train.epochs=N clears them)
    c.train.steps = 250  # ~50 s of training on 2 CPU cores (~10k tokens/s)
    c.train.batch_size = 16
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.save_every = 100
    c.train.loss_chunk_size = 0
    c.optim.lr = 3e-3  # a ~1M-parameter model from random weights learns fast
    c.optim.warmup_ratio = 0.0
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.01
    c.mesh.data = -1
    c.mesh.fsdp = 1


def packed_4k(c, lr=2e-5):
    """7-8B models: packed 4k rows."""
    c.data.max_length = 4096
    c.data.packing = True
    c.optim.lr = lr


def deepseek_llm(c, big=False):
    # DeepSeek LLM (2024), section 5: 7B fine-tuned for 4 epochs at lr 1e-5; 67B for only 2
    # epochs at 5e-6 because it overfits sooner. Instruction mix: 31.2% general, 46.6% math,
    # 22.2% code (point the three files at your data).
    packed_4k(c, lr=5e-6 if big else 1e-5)
    c.train.epochs = 2.0 if big else 4.0
    c.train.batch_size = 128
    c.data.train = "general.jsonl=0.312,math.jsonl=0.466,code.jsonl=0.222"
    if big:
        c.mesh.tensor = 8


def lora(c, quantization="none"):
    """PEFT-style LoRA on every projection (QLoRA with quantization="nf4"), on packed 4k rows."""
    packed_4k(c, lr=2e-4)  # adapters take a ~10x larger lr than full fine-tuning
    c.model.dtype = "bfloat16"  # the frozen base; adapters and their optimizer stay float32
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = "all-linear"
    c.lora.base_quantization = quantization


def gemma3(c, quantization=None):
    """Gemma 3 (its text model; set model.path to the HF folder), on packed 4k rows.

    Full fine-tuning: lr 2e-5, TRL's SFTConfig default, which TRL's own Gemma 3 recipe keeps
    (examples/scripts/sft_gemma3.py full-fine-tunes gemma-3-12b-it with it). Adapters: Google's
    "Fine-Tune Gemma using Hugging Face Transformers and QLoRA" guide
    (ai.google.dev/gemma/docs/core/huggingface_text_finetune_qlora): an NF4 base, LoRA r=16,
    alpha=16 on all linear layers, lr 2e-4 (the QLoRA paper's), max_grad_norm 0.3.
    """
    if quantization is None:
        packed_4k(c, lr=2e-5)
        return
    lora(c, quantization=quantization)  # lr 2e-4, rank 16, all-linear, bf16 compute
    c.lora.alpha = 16.0
    c.optim.clip_norm = 0.3


PRESETS = {
    "tiny": tiny,
    "llama3_8b": packed_4k,
    "qwen2_5_7b": lambda c: packed_4k(c, lr=1e-5),
    "mistral_7b": packed_4k,
    "deepseek_llm_7b": deepseek_llm,
    "deepseek_llm_67b": lambda c: deepseek_llm(c, big=True),
    "llama3_8b_lora": lora,
    "llama3_8b_qlora": lambda c: lora(c, quantization="nf4"),
    "gemma3_4b": gemma3,
    "gemma3_4b_qlora": lambda c: gemma3(c, quantization="nf4"),
}


def get_config(arg: str = ""):
    c = own_model()
    if arg:
        if arg not in PRESETS:
            raise ValueError(f"configs/sft.py: unknown preset {arg!r}; choose one of {', '.join(PRESETS)} "
                             "(or none, for your own model)")
        PRESETS[arg](c)
    return lock(c)
