"""SFT configs: `jaxft sft --config configs/sft.py:PRESET --workdir DIR [--config.KEY=VALUE ...]`.

Presets (the part after the colon):
  tiny             the bundled tiny model on the bundled arithmetic data; ~1 minute on a laptop CPU
  llama3_8b        Llama-3/3.1-8B(-Instruct): set --config.model.path and --config.data.train
  qwen2_5_7b       Qwen2.5-7B(-Instruct)
  mistral_7b       Mistral-7B-v0.3(-Instruct)
  deepseek_llm_7b  the DeepSeek LLM SFT recipe at 7B: 4 epochs, lr 1e-5, general/math/code mixture
  deepseek_llm_67b the same at 67B: only 2 epochs (the larger model overfits sooner), lr 5e-6
"""

from jaxft.config import base_config, lock
from jaxft.data.assets import quickstart_file


def get_config(arg: str = "tiny"):
    c = base_config()
    preset = arg or "tiny"
    if preset == "tiny":
        c.model.preset = "tiny"
        c.data.train = str(quickstart_file("sft_train.jsonl"))
        c.data.eval = str(quickstart_file("sft_eval.jsonl"))
        c.data.max_length = 128
        c.data.packing = True
        c.train.steps = 250  # ~50 s of training on 2 CPU cores (~10k tokens/s)
        c.train.batch_size = 16
        c.train.log_every = 25
        c.train.eval_every = 100
        c.train.save_every = 100
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 20
        c.optim.weight_decay = 0.01
        return lock(c)

    # Real models: bf16 compute on fp32 master weights, packed 4k rows, FSDP over all devices.
    c.model.path = ""  # required: --config.model.path=/path/to/hf/folder
    c.model.preset = ""
    c.model.dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    c.data.max_length = 4096
    c.data.packing = True
    c.train.batch_size = 64
    c.train.log_every = 10
    c.train.save_every = 500
    c.train.loss_chunk_size = 512  # large vocabularies: never materialise [B, L, V] logits
    c.optim.lr = 2e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.train.epochs = 3.0
    if preset == "llama3_8b":
        c.optim.lr = 2e-5
    elif preset == "qwen2_5_7b":
        c.optim.lr = 1e-5
    elif preset == "mistral_7b":
        c.optim.lr = 2e-5
    elif preset in ("deepseek_llm_7b", "deepseek_llm_67b"):
        # DeepSeek LLM (2024), section 5: 7B fine-tuned for 4 epochs at lr 1e-5; 67B for only 2
        # epochs at 5e-6 because it overfits sooner. Instruction mix: 31.2% general, 46.6% math,
        # 22.2% code (point the three files at your data).
        big = preset == "deepseek_llm_67b"
        c.train.epochs = 2.0 if big else 4.0
        c.optim.lr = 5e-6 if big else 1e-5
        c.train.batch_size = 128
        c.data.train = "general.jsonl=0.312,math.jsonl=0.466,code.jsonl=0.222"
        if big:
            c.mesh.tensor = 8
    else:
        raise ValueError(
            f"configs/sft.py: unknown preset {preset!r}; choose tiny, llama3_8b, qwen2_5_7b, "
            "mistral_7b, deepseek_llm_7b or deepseek_llm_67b"
        )
    return lock(c)
