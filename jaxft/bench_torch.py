"""`jaxft bench --compare torch`: the same steps in Hugging Face transformers + PyTorch.

The architecture is jaxft's own config written as a `config.json` (`config_to_hf`) and built
by `AutoModelForCausalLM.from_config` with SDPA attention, in the config's dtype (fp32 for
the `bench` preset), on the very batch jaxft's bench uses ([B, L] tokens, a prompt quarter out
of the loss, rows 2i / 2i+1 = chosen / rejected of pair i). Each step is what a plain PyTorch
fine-tuning loop does (TRL's SFT and DPO trainers, minus their bookkeeping):
  sft            forward, masked token-mean cross-entropy, backward, clip 1.0, AdamW step
  dpo_reference  policy forward on all B rows, a no-grad forward of a frozen reference copy,
                 sigmoid DPO loss on the completion log-prob sums, backward, clip, step
"""

from __future__ import annotations

import copy
import os


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as err:
        raise RuntimeError(
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


class TorchBench:
    """One transformers model (policy), its frozen reference copy and an AdamW optimizer;
    `cases(batch)` gives the timed steps on a host batch from `jaxft.bench`."""

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
        dtype = getattr(torch, dtype_name(cfg.compute_dtype))
        torch.manual_seed(seed)
        self.policy = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=dtype).train()
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        # jaxft's bench optimizer: AdamW, no weight decay, global-norm clipping before it.
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=lr, weight_decay=0.0, eps=1e-8)
        self.description = (f"{check_available()}, {type(self.policy).__name__}, "
                            f"{self.policy.config._attn_implementation} attention, {self.threads} threads")

    def _token_logps(self, model, tokens, loss_mask):
        """Per-token log-probs of the next token [B, L-1] and their loss mask [B, L-1]."""
        F = self.torch.nn.functional
        logits = model(input_ids=tokens).logits[:, :-1].float()
        targets = tokens[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return -nll.view(targets.shape), loss_mask[:, 1:]

    def _update(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.clip_norm)
        self.optimizer.step()

    def cases(self, batch: dict) -> dict:
        """{"sft", "dpo_reference"} -> callable running one step on `batch` (numpy [B, L]
        tokens and loss_mask; rows 2i / 2i+1 chosen / rejected)."""
        torch = self.torch
        tokens = torch.from_numpy(batch["tokens"].astype("int64"))
        loss_mask = torch.from_numpy(batch["loss_mask"]).float()
        chosen, rejected = torch.from_numpy(batch["chosen_row"]).long(), torch.from_numpy(batch["rejected_row"]).long()

        def sft():
            logps, mask = self._token_logps(self.policy, tokens, loss_mask)
            self._update(-(logps * mask).sum() / mask.sum().clamp(min=1.0))

        def dpo_reference():
            logps, mask = self._token_logps(self.policy, tokens, loss_mask)
            policy = (logps * mask).sum(-1)  # [B] completion log-prob sums
            with torch.no_grad():
                ref_logps, _ = self._token_logps(self.reference, tokens, loss_mask)
                ref = (ref_logps * mask).sum(-1)
            margin = (policy[chosen] - ref[chosen]) - (policy[rejected] - ref[rejected])
            self._update(-torch.nn.functional.logsigmoid(self.beta * margin).mean())

        return {"sft": sft, "dpo_reference": dpo_reference}

