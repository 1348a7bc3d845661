"""PEFT adapter folders <-> jaxft LoRA adapters, without torch.

A PEFT LoRA folder is `adapter_config.json` plus `adapter_model.safetensors` holding, per
adapted Linear, `base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight`
[r, in_features] and `...lora_B.weight` [out_features, r]; the delta is
(lora_alpha / r) * B A (alpha / sqrt(r) with `use_rslora`). jaxft's A is [in dims..., r] and
B [r, out dims...] with heads split out, as its kernels (`jaxft.models.lora`).

A family whose checkpoint fuses projections (Phi-3: q/k/v in `qkv_proj`, gate/up in
`gate_up_proj`) gets one PEFT module per fused tensor: the targeted parts' A matrices stacked
([n r, in]) and their B matrices block-diagonal ([out, n r], zero rows for untargeted parts),
with `rank_pattern` n r and `alpha_pattern` n alpha (sqrt(n) alpha with rsLoRA), so PEFT's
scale alpha' / r' and its delta B' A' are exactly the parts' deltas.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxft.data.text_files import read_json
from jaxft.errors import ConfigError, DataError, PathError
from jaxft.models import families
from jaxft.models.adapters import adapter_shardings
from jaxft.models.config import ModelConfig
from jaxft.models.hf import host_array
from jaxft.models.layer_groups import layer_path
from jaxft.models.lora import ATTENTION_PROJECTIONS, LoRASpec, layer_projections, projection_dims
from jaxft.models.paths import get_path, set_path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _module(name: str) -> str:
    return "self_attn" if name in ATTENTION_PROJECTIONS else "mlp"


def _tensor_name(layer: int, name: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_module(name)}.{name}.lora_{which}.weight"


def _jaxft_path(cfg: ModelConfig, layer: int, name: str, which: str) -> tuple[tuple, int | None]:
    """(state path, index along the stacked layer axis or None) of one adapter matrix."""
    prefix, index = layer_path(cfg, layer)
    return prefix + (_module(name), f"{name}_lora_{which.lower()}"), index


def _targets(cfg: ModelConfig, layer: int) -> tuple[ModelConfig, list[str]]:
    """(the layer's config, the targeted projections it has): Gemma 4's layers differ."""
    layer_cfg, names = layer_projections(cfg, layer)
    return layer_cfg, [n for n in cfg.lora.targets if n in names]


def peft_state_dict(cfg: ModelConfig, adapters: dict) -> dict[str, np.ndarray]:
    """{PEFT tensor name: float32 array} for every adapted projection of every layer."""
    spec, out, gathered = cfg.lora, {}, {}
    for layer in range(cfg.num_layers):
        for name in _targets(cfg, layer)[1]:
            for which in ("A", "B"):
                path, index = _jaxft_path(cfg, layer, name, which)
                if path not in gathered:
                    gathered[path] = np.asarray(host_array(get_path(adapters, path)), np.float32)
                value = gathered[path] if index is None else gathered[path][index]
                r = spec.rank
                matrix = value.reshape(-1, r).T if which == "A" else value.reshape(r, -1).T
                out[_tensor_name(layer, name, which)] = np.ascontiguousarray(matrix)
    return _fuse_adapters(cfg, out)


def _fused_groups(cfg: ModelConfig) -> list[tuple[str, str, list[tuple[str, int]]]]:
    """(module, fused projection, [(part projection, rows), ...]) of each fused tensor of the
    family, e.g. ("self_attn", "qkv_proj", [("q_proj", H * D), ...]); [] when nothing is fused."""
    return [(suffix.split(".")[0], suffix.split(".")[1], [(part.split(".")[1], rows) for part, rows in parts])
            for suffix, parts in families.fused_tensors(cfg.model_type, cfg.parts()).items()]


def _fuse_adapters(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-projection PEFT tensors with each fused group's parts in one block module."""
    out = dict(tensors)
    for module, fused, parts in _fused_groups(cfg):
        targeted = [(i, part) for i, (part, _) in enumerate(parts) if part in cfg.lora.targets]
        if not targeted:
            continue
        r, starts = cfg.lora.rank, np.cumsum([0] + [rows for _, rows in parts])
        for layer in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{layer}.{module}."
            a = np.concatenate([out.pop(f"{prefix}{part}.lora_A.weight") for _, part in targeted], axis=0)
            b = np.zeros((int(starts[-1]), r * len(targeted)), np.float32)
            for k, (i, part) in enumerate(targeted):
                b[starts[i]:starts[i + 1], k * r:(k + 1) * r] = out.pop(f"{prefix}{part}.lora_B.weight")
            out[f"{prefix}{fused}.lora_A.weight"], out[f"{prefix}{fused}.lora_B.weight"] = a, b
    return out


def adapter_config(spec: LoRASpec, base_model: str, cfg: ModelConfig | None = None) -> dict:
    """PEFT's adapter_config.json for `spec` (LoraConfig fields; the rest take PEFT defaults);
    with `cfg`, fused projections as their block modules (`_fuse_adapters`)."""
    targets, ranks, alphas = list(spec.targets), {}, {}
    for _, fused, parts in _fused_groups(cfg) if cfg is not None else ():
        n = sum(part in targets for part, _ in parts)
        if n:
            targets = [t for t in targets if t not in {part for part, _ in parts}] + [fused]
            ranks[fused] = n * spec.rank
            alphas[fused] = spec.alpha * (math.sqrt(n) if spec.rslora else n)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    if ranks:
        config.update(rank_pattern=ranks, alpha_pattern=alphas)
    return config


def save_peft(cfg: ModelConfig, adapters: dict, folder: str | Path, *, base_model: str = "") -> Path:
    """Writes a PEFT LoRA folder loadable by `peft.PeftModel.from_pretrained(base, folder)`.
    Every process must call it in a multi-host run (arrays are gathered); process 0 writes."""
    folder = Path(folder)
    tensors = peft_state_dict(cfg, adapters)
    if jax.process_index() != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(adapter_config(cfg.lora, base_model, cfg), indent=2) + "\n")
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise PathError(f"lora.init_from: {path} not found; point it at a PEFT LoRA adapter folder")
    found = read_json(path, what="lora.init_from")  # invalid JSON: a ValueError naming file and line
    if found.get("peft_type", "LORA") != "LORA":
        raise DataError(f"{path}: peft_type {found.get('peft_type')!r}; jaxft reads LoRA adapters only")
    return found


def check_matches(found: dict, spec: LoRASpec, source: str) -> None:
    """Raises naming every lora.* key that differs from the adapter folder's config."""
    targets = found.get("target_modules") or []
    targets = sorted(targets) if isinstance(targets, list) else targets
    wanted = {"r": ("lora.rank", spec.rank), "lora_alpha": ("lora.alpha", spec.alpha),
              "use_rslora": ("lora.rslora", spec.rslora), "target_modules": ("lora.targets", sorted(spec.targets))}
    have = {"r": found.get("r"), "lora_alpha": found.get("lora_alpha"),
            "use_rslora": bool(found.get("use_rslora", False)), "target_modules": targets}
    bad = [f"--config.{key}={_flag(field, have[field])} (the run has {value})"
           for field, (key, value) in wanted.items() if have[field] != value
           and not (field == "lora_alpha" and have[field] is not None and float(have[field]) == float(value))]
    if bad:
        raise ConfigError(f"{source} was trained with other LoRA settings; set " + ", ".join(bad))


def _flag(field, value):
    return ",".join(value) if field == "target_modules" and isinstance(value, list) else value


def load_peft(folder: str | Path, cfg: ModelConfig, mesh) -> dict:
    """Adapters read from a PEFT LoRA folder, sharded over `mesh` like fresh ones."""
    folder = Path(folder)
    if any(part in cfg.lora.targets for _, _, parts in _fused_groups(cfg) for part, _ in parts):
        raise ConfigError(f"lora.init_from: starting {cfg.model_type} adapters on fused projections from a PEFT "
                          "folder is not supported yet; merge it into the base (jaxft export) and set model.path")
    check_matches(read_adapter_config(folder), cfg.lora, str(folder / CONFIG_FILE))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise PathError(f"lora.init_from: {weights} not found (jaxft reads safetensors adapters)")
    spec, host = cfg.lora, {}
    with safe_open(weights, framework="np") as f:
        names = set(f.keys())
        for layer in range(cfg.num_layers):
            layer_cfg, targets = _targets(cfg, layer)
            for name in targets:
                in_shape, _, out_shape, _ = projection_dims(layer_cfg, name)
                for which, shape in (("A", in_shape + (spec.rank,)), ("B", (spec.rank,) + out_shape)):
                    tensor = _tensor_name(layer, name, which)
                    if tensor not in names:
                        raise DataError(f"{weights}: missing tensor {tensor}; is the adapter for this base model?")
                    matrix = f.get_tensor(tensor).astype(np.float32)
                    expected = (spec.rank, int(np.prod(in_shape))) if which == "A" else (int(np.prod(out_shape)), spec.rank)
                    if matrix.shape != expected:
                        raise DataError(f"{weights}: {tensor} has shape {matrix.shape}, the model needs {expected}")
                    path, index = _jaxft_path(cfg, layer, name, which)
                    value = matrix.T.reshape(shape)
                    if index is None:
                        host[path] = value
                    else:
                        host.setdefault(path, {})[index] = value
    shardings = adapter_shardings(cfg, mesh)
    adapters: dict = {}
    for path, value in host.items():
        value = np.stack([value[k] for k in sorted(value)]) if isinstance(value, dict) else value
        array = jax.make_array_from_callback(value.shape, get_path(shardings, path), lambda idx, v=value: v[idx])
        set_path(adapters, path, array)
    return adapters


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "adapter_config", "load_peft", "peft_state_dict", "save_peft"]
