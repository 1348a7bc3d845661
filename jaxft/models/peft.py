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

Mixture-of-experts models. transformers 5.x holds a layer's routed experts as two 3D
parameters, `mlp.experts.gate_up_proj` [X, 2F, E] (gate rows, then up) and
`mlp.experts.down_proj` [X, E, F], which PEFT adapts through `target_parameters`
(`lora.ParamWrapper`: lora_A [X r', in] expert-major, lora_B [out, r' X] rank-major, one
A per expert for the whole fused tensor). jaxft's per-expert gate and up adapters go in as
one block adapter per expert, as the fused dense tensors above (PEFT's own v4 -> v5
conversion writes them the same way): A' stacks the targeted parts' A, B' is block-diagonal,
rank_pattern / alpha_pattern `experts.gate_up_proj` n r / n alpha. With both expert tensors
adapted PEFT nests the wrappers: gate_up_proj's tensors are `mlp.experts.base_layer.lora_*`,
down_proj's `mlp.experts.lora_*`. A folder whose gate_up_proj adapter has rank r (PEFT's
shared A for gate and up) reads in exactly as gate and up adapters with equal A. gpt-oss
stores its experts [X, in, out] (PEFT's tensors are the same) with gate and up interleaved
(gate in the even rows of the output, up in the odd).
Dense MLPs and shared experts (Qwen2-MoE's `mlp.shared_expert`, DeepSeek's
`mlp.shared_experts`) of an MoE model are adapted through `target_parameters` too
("gate_proj.weight", ...: the same tensors as a Linear's adapter): PEFT rewrites
gate_proj / up_proj / down_proj in `target_modules` to the routed experts for the Qwen-MoE
and DeepSeek families and would drop them. PEFT refuses lora_dropout with `target_parameters`,
so those folders say 0 (dropout is a training setting; the adapter's outputs do not depend on it).
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
from jaxft.models.lora import (LINEAR_PROJECTIONS, MLP_PROJECTIONS, PROJECTIONS, SHARED, LoRASpec, layer_kernels, layer_projections,
                              projection_dims, target_of)
from jaxft.models.paths import get_path, set_path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


GATE_UP = ("gate_proj", "up_proj")  # the parts of transformers' fused experts.gate_up_proj, in row order


def _module(name: str) -> str:
    """The module below the layer holding kernel `name`: mlp, self_attn, or (Qwen3.5's Gated
    DeltaNet projections) linear_attn, in jaxft's state and in transformers'."""
    target = target_of(name)
    return "mlp" if target in MLP_PROJECTIONS else "linear_attn" if target in LINEAR_PROJECTIONS else "self_attn"


def _hf_module(cfg: ModelConfig, name: str) -> str:
    """The transformers module (below the layer) of kernel `name`: "self_attn.q_proj",
    "mlp.down_proj", a shared expert's "mlp.shared_expert(s).gate_proj"."""
    if name.startswith(SHARED):
        return f"mlp.{families.family(cfg.model_type).shared_experts}.{target_of(name)}"
    return f"{_module(name)}.{name}"


def _tensor_name(layer: int, module: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.{module}.lora_{which}.weight"


def _jaxft_path(cfg: ModelConfig, layer: int, name: str, which: str) -> tuple[tuple, int | None]:
    """(state path, index along the stacked layer axis or None) of one adapter matrix."""
    prefix, index = layer_path(cfg, layer)
    return prefix + (_module(name), f"{name}_lora_{which.lower()}"), index


def _targets(cfg: ModelConfig, layer: int) -> tuple[ModelConfig, list[str], list[str]]:
    """(the layer's config, its targeted kernels adapted as Linears, its targeted routed
    experts' projections): Gemma 4's layers differ, an MoE layer's gate / up / down are experts."""
    layer_cfg, names = layer_projections(cfg, layer)
    names = [n for n in names if target_of(n) in cfg.lora.targets]
    experts = [n for n in names if n in MLP_PROJECTIONS] if cfg.is_moe_layer(layer) else []
    return layer_cfg, [n for n in names if n not in experts], experts


def peft_state_dict(cfg: ModelConfig, adapters: dict) -> dict[str, np.ndarray]:
    """{PEFT tensor name: float32 array} for every adapted projection of every layer."""
    spec, out, gathered = cfg.lora, {}, {}

    def value(layer, name, which):
        path, index = _jaxft_path(cfg, layer, name, which)
        if path not in gathered:
            gathered[path] = np.asarray(host_array(get_path(adapters, path)), np.float32)
        return gathered[path] if index is None else gathered[path][index]

    r = spec.rank
    for layer in range(cfg.num_layers):
        _, linear, experts = _targets(cfg, layer)
        for name in linear:
            a, b = value(layer, name, "A"), value(layer, name, "B")
            out[_tensor_name(layer, _hf_module(cfg, name), "A")] = np.ascontiguousarray(a.reshape(-1, r).T)
            out[_tensor_name(layer, _hf_module(cfg, name), "B")] = np.ascontiguousarray(b.reshape(r, -1).T)
        pairs = {n: (value(layer, n, "A"), value(layer, n, "B")) for n in experts}
        for module, (a, b) in _expert_tensors(pairs, r, _interleaved(cfg)).items():
            out[_tensor_name(layer, module, "A")], out[_tensor_name(layer, module, "B")] = a, b
    return _fuse_adapters(cfg, out)


def _expert_modules(parts) -> dict[str, str]:
    """{"gate_up_proj" / "down_proj": its PEFT module} for the fused expert tensors adapted."""
    fused = [f for f, has in (("gate_up_proj", any(p in parts for p in GATE_UP)), ("down_proj", "down_proj" in parts))
             if has]
    if len(fused) == 2:  # PEFT nests the wrappers: gate_up_proj's is inside down_proj's
        return {"gate_up_proj": "mlp.experts.base_layer", "down_proj": "mlp.experts"}
    return {f: "mlp.experts" for f in fused}


def _interleaved(cfg: ModelConfig) -> bool:
    """Whether the family's fused experts.gate_up_proj alternates gate and up (gpt-oss)."""
    return any(fused.endswith("experts.gate_up_proj") for fused, _ in families.family(cfg.model_type).interleaved)


def _part_rows(i: int, F: int, interleaved: bool) -> slice:
    """The rows of gate_up_proj's part i (0 gate, 1 up) of F rows each."""
    return slice(i, None, 2) if interleaved else slice(i * F, (i + 1) * F)


def _expert_tensors(pairs: dict, r: int, interleaved: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{PEFT module: (lora_A [X r', in], lora_B [out, r' X])} of one layer's routed-expert
    adapters `pairs` {projection: (A [X, in, r], B [X, r, out])} (module docstring)."""
    modules, out = _expert_modules(pairs), {}
    parts = [p for p in GATE_UP if p in pairs]
    if parts:
        X, F = pairs[parts[0]][1].shape[0], pairs[parts[0]][1].shape[-1]
        a = np.concatenate([pairs[p][0].transpose(0, 2, 1) for p in parts], axis=1)  # [X, n r, E]
        b = np.zeros((2 * F, len(parts) * r, X), np.float32)  # [2F, n r, X]: rank-major columns
        for k, p in enumerate(parts):
            i = GATE_UP.index(p)
            b[_part_rows(i, F, interleaved), k * r:(k + 1) * r] = pairs[p][1].transpose(2, 1, 0)
        out[modules["gate_up_proj"]] = (a.reshape(X * len(parts) * r, -1), b.reshape(2 * F, -1))
    if "down_proj" in pairs:
        a, b = pairs["down_proj"]  # [X, F, r], [X, r, E]
        out[modules["down_proj"]] = (np.ascontiguousarray(a.transpose(0, 2, 1).reshape(-1, a.shape[1])),
                                     np.ascontiguousarray(b.transpose(2, 1, 0).reshape(b.shape[2], -1)))
    return out


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


def _exported_targets(spec: LoRASpec, cfg: ModelConfig | None) -> tuple[list[str], list[str], int]:
    """(target_modules, target_parameters, how many of gate / up the routed experts adapt):
    with `cfg`, only the projections the model has; an MoE model's MLP ones as parameters."""
    if cfg is None:
        return list(spec.targets), [], 0
    kernels = {(target_of(n), not (cfg.is_moe_layer(i) and n in MLP_PROJECTIONS))  # (target, as a Linear)
               for i in range(cfg.num_layers) for n in layer_kernels(cfg, i) if target_of(n) in spec.targets}
    targets = [t for t in spec.targets if any(k == t for k, _ in kernels)]
    if not cfg.num_experts:
        return targets, [], 0
    experts = {k for k, linear in kernels if not linear}
    parameters = [f"{k}.weight" for k in MLP_PROJECTIONS if (k, True) in kernels]
    parameters += [f"experts.{f}" for f in _expert_modules(experts)]
    return [t for t in targets if t not in MLP_PROJECTIONS], parameters, len(experts & set(GATE_UP))


def adapter_config(spec: LoRASpec, base_model: str, cfg: ModelConfig | None = None) -> dict:
    """PEFT's adapter_config.json for `spec` (LoraConfig fields; the rest take PEFT defaults);
    with `cfg`, only the projections the model has, fused projections as their block modules
    (`_fuse_adapters`), an MoE model's MLPs and experts as `target_parameters`."""
    targets, parameters, n_experts = _exported_targets(spec, cfg)
    ranks, alphas = {}, {}
    if n_experts > 1:
        ranks["experts.gate_up_proj"] = n_experts * spec.rank
        alphas["experts.gate_up_proj"] = spec.alpha * (math.sqrt(n_experts) if spec.rslora else n_experts)
    for _, fused, parts in _fused_groups(cfg) if cfg is not None else ():
        n = sum(part in targets for part, _ in parts)
        if n:
            targets = [t for t in targets if t not in {part for part, _ in parts}] + [fused]
            ranks[fused] = n * spec.rank
            alphas[fused] = spec.alpha * (math.sqrt(n) if spec.rslora else n)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0 if parameters else spec.dropout,
        "use_rslora": spec.rslora, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    if parameters:
        config["target_parameters"] = parameters
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


def check_matches(found: dict, spec: LoRASpec, source: str, cfg: ModelConfig | None = None) -> None:
    """Raises naming every lora.* key that differs from the adapter folder's config; with `cfg`
    the targets compared are what `adapter_config` writes for the model."""
    targets = found.get("target_modules") or []
    targets = sorted(targets) + sorted(found.get("target_parameters") or []) if isinstance(targets, list) else targets
    modules, parameters, _ = _exported_targets(spec, cfg)
    wanted = {"r": ("lora.rank", spec.rank), "lora_alpha": ("lora.alpha", spec.alpha),
              "use_rslora": ("lora.rslora", spec.rslora),
              "target_modules": ("lora.targets", sorted(modules) + sorted(parameters))}
    have = {"r": found.get("r"), "lora_alpha": found.get("lora_alpha"),
            "use_rslora": bool(found.get("use_rslora", False)), "target_modules": targets}
    bad = [f"--config.{key}={_flag(field, have[field])} (the run has {_flag(field, value)})"
           for field, (key, value) in wanted.items() if have[field] != value
           and not (field == "lora_alpha" and have[field] is not None and float(have[field]) == float(value))]
    if bad:
        raise ConfigError(f"{source} was trained with other LoRA settings; set " + ", ".join(bad))


def _flag(field, value):
    """A folder's value as the flag's: its targets as projection names (experts.gate_up_proj is
    gate_proj and up_proj, "down_proj.weight" down_proj)."""
    if field != "target_modules" or not isinstance(value, list):
        return value
    names = [n for v in value for n in ({"experts.gate_up_proj": GATE_UP, "experts.down_proj": ("down_proj",)}
                                        .get(v, (v.removesuffix(".weight"),)))]
    order = {n: i for i, n in enumerate(PROJECTIONS)}  # jaxft's order; other names (PEFT's) after
    return ",".join(sorted(dict.fromkeys(names), key=lambda n: order.get(n, len(order))))


def load_peft(folder: str | Path, cfg: ModelConfig, mesh) -> dict:
    """Adapters read from a PEFT LoRA folder, sharded over `mesh` like fresh ones."""
    folder = Path(folder)
    if any(part in cfg.lora.targets for _, _, parts in _fused_groups(cfg) for part, _ in parts):
        raise ConfigError(f"lora.init_from: starting {cfg.model_type} adapters on fused projections from a PEFT "
                          "folder is not supported yet; merge it into the base (jaxft export) and set model.path")
    check_matches(read_adapter_config(folder), cfg.lora, str(folder / CONFIG_FILE), cfg)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise PathError(f"lora.init_from: {weights} not found (jaxft reads safetensors adapters)")
    spec, host = cfg.lora, {}

    def put(layer, name, which, value):
        path, index = _jaxft_path(cfg, layer, name, which)
        if index is None:
            host[path] = value
        else:
            host.setdefault(path, {})[index] = value

    with safe_open(weights, framework="np") as f:
        names = set(f.keys())

        def read(layer, module, which, shape=None):
            tensor = _tensor_name(layer, module, which)
            if tensor not in names:
                raise DataError(f"{weights}: missing tensor {tensor}; is the adapter for this base model?")
            matrix = f.get_tensor(tensor).astype(np.float32)
            if shape is not None and matrix.shape != shape:
                raise DataError(f"{weights}: {tensor} has shape {matrix.shape}, the model needs {shape}")
            return matrix

        for layer in range(cfg.num_layers):
            layer_cfg, linear, experts = _targets(cfg, layer)
            for name in linear:
                in_shape, _, out_shape, _ = projection_dims(layer_cfg, name)
                n_in, n_out, r = math.prod(in_shape), math.prod(out_shape), spec.rank
                put(layer, name, "A", read(layer, _hf_module(cfg, name), "A", (r, n_in)).T.reshape(in_shape + (r,)))
                put(layer, name, "B", read(layer, _hf_module(cfg, name), "B", (n_out, r)).T.reshape((r,) + out_shape))
            modules = _expert_modules(experts)
            tensors = {fused: (read(layer, m, "A"), read(layer, m, "B")) for fused, m in modules.items()}
            where = f"{weights} layer {layer}"
            pairs = _expert_pairs(tensors, experts, layer_cfg, spec.rank, where, _interleaved(cfg))
            for name, (a, b) in pairs.items():
                put(layer, name, "A", a)
                put(layer, name, "B", b)
    shardings = adapter_shardings(cfg, mesh)
    adapters: dict = {}
    for path, value in host.items():
        value = np.stack([value[k] for k in sorted(value)]) if isinstance(value, dict) else value
        array = jax.make_array_from_callback(value.shape, get_path(shardings, path), lambda idx, v=value: v[idx])
        set_path(adapters, path, array)
    return adapters


def _expert_pairs(tensors: dict, experts: list[str], cfg: ModelConfig, r: int, where: str,
                  interleaved: bool = False) -> dict:
    """{projection: (A [X, in, r], B [X, r, out])} from one layer's fused expert tensors
    {"gate_up_proj" / "down_proj": (lora_A, lora_B)}: `_expert_tensors` inverted, or a
    gate_up_proj adapter of rank r (one A shared by gate and up) split into both."""
    X, E, F, out = cfg.num_experts, cfg.hidden_size, cfg.expert_size, {}
    parts = [p for p in GATE_UP if p in experts]
    if parts:
        a, b = tensors["gate_up_proj"]
        rank = a.shape[0] // X
        if a.shape != (X * rank, E) or b.shape != (2 * F, X * rank) or rank not in (r, len(parts) * r):
            raise DataError(f"{where}: experts.gate_up_proj's adapter has shapes {a.shape}, {b.shape}; the model "
                            f"needs ({X * len(parts) * r}, {E}) and ({2 * F}, {X * len(parts) * r}) (rank {r} a part)")
        a3, b3 = a.reshape(X, rank, E), b.reshape(2 * F, rank, X)
        shared = rank == r and len(parts) == 2
        rest = b3.copy()
        for k, p in enumerate(parts):
            rows = _part_rows(GATE_UP.index(p), F, interleaved)
            cols = slice(0, r) if shared else slice(k * r, (k + 1) * r)
            out[p] = (a3[:, cols].transpose(0, 2, 1), b3[rows, cols].transpose(2, 1, 0))
            rest[rows, cols] = 0
        if np.any(rest):
            raise DataError(f"{where}: experts.gate_up_proj's adapter also changes projections lora.targets leaves "
                            "alone (its lora_B is not zero off the targeted parts)")
    if "down_proj" in experts:
        a, b = tensors["down_proj"]
        if a.shape != (X * r, F) or b.shape != (E, X * r):
            raise DataError(f"{where}: experts.down_proj's adapter has shapes {a.shape}, {b.shape}; the model needs "
                            f"({X * r}, {F}) and ({E}, {X * r})")
        out["down_proj"] = (a.reshape(X, r, F).transpose(0, 2, 1), b.reshape(E, r, X).transpose(2, 1, 0))
    return out


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "adapter_config", "load_peft", "peft_state_dict", "save_peft"]
