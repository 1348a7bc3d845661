"""`jaxft bench --compare torch`: the same steps in Hugging Face transformers + PyTorch.

The architecture is jaxft's own config written as a `config.json` (`config_to_hf`: tied
embeddings where the preset ties them) and built by `AutoModelForCausalLM.from_config` with
SDPA attention, on the very batch jaxft's bench uses (`hf_inputs`: the same [B, L] tokens,
right padding as attention_mask 0, every untrained position, prompt and padding, labelled
-100; rows 2i / 2i+1 = chosen / rejected of pair i). It runs with the settings jaxft's bench
runs with, as a transformers user sets them (HF Trainer / TRL: `bf16=True`,
`gradient_checkpointing=True`):
  weights and AdamW state in jaxft's param dtype (float32), matmuls in its compute dtype
  through `torch.autocast` when the two differ (mixed precision, as jaxft's bf16 compute on
  f32 master weights), unless PyTorch has no kernels for that dtype on this CPU (oneDNN needs
  AVX-512 or AMX: on an AVX2-only CPU a bf16 matmul runs ~100x slower than f32, where XLA's
  runs at about f32 speed), when it computes in the param dtype as a PyTorch user there
  would, and says so in `description`; gradient checkpointing of every decoder layer when jaxft remats
  (`model.remat` other than none; transformers has no finer policy); whole [B, L, V] logits
  cast to f32 for the loss (plain transformers has no chunked loss).
Each step is what a plain PyTorch fine-tuning loop does (TRL's SFT and DPO trainers, minus
their bookkeeping):
  sft            forward, token-mean cross-entropy over the labels, backward, clip 1.0, AdamW
  dpo_reference  policy forward on all B rows, a no-grad forward of a frozen reference copy,
                 sigmoid DPO loss on the completion log-prob sums, backward, clip, step
"""

from __future__ import annotations

import contextlib
import copy
import os

import numpy as np

from jaxft.errors import SetupError

IGNORE = -100  # transformers' label for "no loss here"


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as err:
        raise SetupError(
            f"--compare torch needs PyTorch and transformers ({err}); pip install torch transformers"
        ) from None
    return torch, transformers


def check_available() -> str:
    """'transformers X / torch Y' when both import; else a RuntimeError naming the install."""
    torch, transformers = _import_torch()
    return f"transformers {transformers.__version__} / torch {torch.__version__}"


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def hf_inputs(batch: dict) -> dict:
    """jaxft's bench batch as a transformers loop feeds it: int64 numpy [B, L] input_ids,
    attention_mask (1 on real tokens, 0 on padding: segment_ids 0) and labels (the token where
    loss_mask is 1, else -100: prompt and padding). The model shifts nothing; the loss compares
    position t's logits with labels[t + 1], as jaxft's `shift_targets` does."""
    real = batch["segment_ids"] > 0
    tokens = batch["tokens"].astype(np.int64)
    return {"input_ids": tokens, "attention_mask": real.astype(np.int64),
            "labels": np.where((batch["loss_mask"] > 0) & real, tokens, IGNORE)}


def _cpu_kernels(torch, dtype: str) -> bool:
    """Whether PyTorch's CPU matmuls have real kernels for `dtype` here (oneDNN's own check:
    AVX-512, AMX or Arm BF16 / FP16 instructions); float32 always does."""
    check = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}.get(dtype)
    if check is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # an older or newer PyTorch without the check: assume none
        return False


class TorchBench:
    """One transformers model (policy), its frozen reference copy and an AdamW optimizer;
    `cases(batch)` gives the timed steps on a host batch from `jaxft.perf.bench`."""

    def __init__(self, cfg, *, lr: float = 1e-5, clip_norm: float = 1.0, beta: float = 0.1,
                 threads: int | None = None, seed: int = 0):
        torch, transformers = _import_torch()
        from jaxft.models.config import config_to_hf, dtype_name

        self.torch, self.clip_norm, self.beta = torch, clip_norm, beta
        self.threads = threads or available_cores()
        torch.set_num_threads(self.threads)
        hf = config_to_hf(cfg)
        hf.pop("architectures", None)
        config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        param_dtype, compute_dtype = dtype_name(cfg.param_dtype), dtype_name(cfg.compute_dtype)
        torch.manual_seed(seed)
        self.policy = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=getattr(torch, param_dtype)).train()
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.checkpointing = cfg.remat != "none"
        if self.checkpointing:  # the reference runs under no_grad: nothing to recompute there
            # transformers' newer name for gradient_checkpointing_enable (which now warns)
            enable = getattr(self.policy, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fast = _cpu_kernels(torch, compute_dtype)
        self.autocast = None if compute_dtype == param_dtype or not fast else getattr(torch, compute_dtype)
        # jaxft's bench optimizer: AdamW, no weight decay, global-norm clipping before it.
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=lr, weight_decay=0.0, eps=1e-8)
        precision = (f"{param_dtype} weights + {compute_dtype} autocast" if self.autocast else
                     f"{param_dtype} weights and compute" if compute_dtype == param_dtype else
                     f"{param_dtype} weights and compute (PyTorch has no fast {compute_dtype} kernels on this "
                     f"{torch.backends.cpu.get_cpu_capability()} CPU)")
        self.description = (f"{check_available()}, {type(self.policy).__name__}, "
                            f"{self.policy.config._attn_implementation} attention, {precision}, "
                            f"gradient checkpointing {'on' if self.checkpointing else 'off'}, "
                            f"whole logits, {self.threads} threads")

    def _compute(self):
        """The forward's precision context: autocast to the compute dtype, or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return self.torch.autocast(device_type="cpu", dtype=self.autocast)

    def _token_logps(self, model, inputs):
        """Log-probs of each next token [B, L-1] (0 where unlabelled) and the label mask [B, L-1]."""
        F = self.torch.nn.functional
        with self._compute():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           use_cache=False).logits
        logits = logits[:, :-1].float()
        labels = inputs["labels"][:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                              ignore_index=IGNORE)
        return -nll.view(labels.shape), (labels != IGNORE).float()

    def _update(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.clip_norm)
        self.optimizer.step()

    def cases(self, batch: dict) -> dict:
        """{"sft", "dpo_reference"} -> callable running one step on `batch` (jaxft's bench batch:
        numpy [B, L] tokens, segment_ids, loss_mask; rows 2i / 2i+1 chosen / rejected)."""
        torch = self.torch
        inputs = {k: torch.from_numpy(v) for k, v in hf_inputs(batch).items()}
        chosen, rejected = torch.from_numpy(batch["chosen_row"]).long(), torch.from_numpy(batch["rejected_row"]).long()

        def sft():
            logps, mask = self._token_logps(self.policy, inputs)
            self._update(-(logps * mask).sum() / mask.sum().clamp(min=1.0))

        def dpo_reference():
            logps, mask = self._token_logps(self.policy, inputs)
            policy = (logps * mask).sum(-1)  # [B] completion log-prob sums
            with torch.no_grad():
                ref_logps, _ = self._token_logps(self.reference, inputs)
                ref = (ref_logps * mask).sum(-1)
            margin = (policy[chosen] - ref[chosen]) - (policy[rejected] - ref[rejected])
            self._update(-torch.nn.functional.logsigmoid(self.beta * margin).mean())

        return {"sft": sft, "dpo_reference": dpo_reference}
