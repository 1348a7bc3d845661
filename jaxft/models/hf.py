"""Hugging Face checkpoint folders <-> jaxft models, without torch.

Reads `config.json` plus `model.safetensors` or a sharded `model.safetensors.index.json`;
writes the same layout. Tensor names and layouts follow transformers' PyTorch modules:
Linear weights are [out, in]; jaxft keeps kernels as [in, ...out] with heads split out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxft.errors import DataError, PathError
from jaxft.io.folders import check_model_folder
from jaxft.models import families, mxfp4
from jaxft.models.config import ModelConfig, config_to_hf, read_hf_config
from jaxft.models.decoder import Decoder
from jaxft.models.layer_groups import layer_path
from jaxft.models.linear_attention import linear_dims
from jaxft.models.paths import set_path
from jaxft.parallel.sharding import param_shardings

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


# A rule: (hf name, jaxft state path, hf shape, hf -> jaxft, jaxft -> hf, index). Several HF
# tensors may stack at one path: `index` is the tensor's place along the leading axes there
# (the layer of a scanned model, then the expert of an MoE layer); () for a whole array.
Rule = tuple[str, tuple, tuple, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray],
             tuple[int, ...]]


def _same(x):
    return x


def _transpose(x):
    return np.ascontiguousarray(x.T)


def _tensor_rules(cfg: ModelConfig) -> list[Rule]:
    E, V = cfg.hidden_size, cfg.vocab_size
    rules: list[Rule] = [("model.embed_tokens.weight", ("embed_tokens",), (V, E), _same, _same, ())]
    specs = cfg.layer_specs()
    for i in range(cfg.num_layers):
        prefix, index = layer_path(cfg, i)
        spec = None if specs is None else specs[i]
        lead = () if index is None else (index,)
        layer_cfg = cfg if spec is None else cfg.layer_config(spec)
        rules += [(name, prefix + path, shape, to_jax, to_hf, lead + tuple(sub))
                  for name, path, shape, to_jax, to_hf, *sub in _layer_rules(layer_cfg, spec, f"model.layers.{i}.",
                                                                            cfg.is_moe_layer(i))]
    rules.append(("model.norm.weight", ("norm", "weight"), (E,), _same, _same, ()))
    if cfg.per_layer_input_size:  # Gemma 4's per-layer input table and projection
        NP, P = cfg.num_layers * cfg.per_layer_input_size, cfg.per_layer_input_size
        rules += [
            ("model.embed_tokens_per_layer.weight", ("embed_tokens_per_layer",),
             (cfg.per_layer_vocab_size or V, NP), _same, _same, ()),
            ("model.per_layer_model_projection.weight", ("per_layer_model_projection",), (NP, E),
             _transpose, _transpose, ()),
            ("model.per_layer_projection_norm.weight", ("per_layer_projection_norm", "weight"), (P,),
             _same, _same, ())]
    if not cfg.tie_word_embeddings:
        rules.append(("lm_head.weight", ("lm_head",), (V, E), _transpose, _transpose, ()))
    return rules


def _moe_rules(cfg: ModelConfig, hf: str) -> list[tuple]:
    """An MoE layer's tensors (`Family.experts` names them): the router, each expert's gate /
    up / down (stacked along the experts axis: a sixth element, the expert), the shared expert."""
    E, X, F, S = cfg.hidden_size, cfg.num_experts, cfg.expert_size, cfg.shared_expert_size
    family = families.family(cfg.model_type)
    module, router, experts, gate, up, down = family.experts
    mlp = ("mlp",)
    rules = [(f"{hf}{module}.{router}.weight", mlp + ("router",), (X, E), _transpose, _transpose)]
    if cfg.router_bias:  # DeepSeek-V3's selection bias
        rules.append((f"{hf}{module}.{router}.e_score_correction_bias", mlp + ("e_score_correction_bias",), (X,),
                      _same, _same))
    if cfg.router_logit_bias:  # gpt-oss's router bias
        rules.append((f"{hf}{module}.{router}.bias", mlp + ("router_logit_bias",), (X,), _same, _same))
    stacked = ((gate, "gate", (X, E, F)), (up, "up", (X, E, F)), (down, "down", (X, F, E)))
    for name, ours, shape in stacked if family.stacked_experts else ():  # gpt-oss: [X, in, out] as ours
        rules.append((f"{hf}{module}.{experts}.{name}", mlp + (f"{ours}_proj",), shape, _same, _same))
    for name, ours, shape in stacked if family.stacked_experts and cfg.expert_bias else ():
        rules.append((f"{hf}{module}.{experts}.{name}_bias", mlp + (f"{ours}_bias",), (X, shape[2]), _same, _same))
    for x in () if family.stacked_experts else range(X):
        for name, ours, shape in ((gate, "gate_proj", (F, E)), (up, "up_proj", (F, E)), (down, "down_proj", (E, F))):
            rules.append((f"{hf}{module}.{experts}.{x}.{name}.weight", mlp + (ours,), shape, _transpose, _transpose, x))
    if S:
        for name, shape in (("gate_proj", (S, E)), ("up_proj", (S, E)), ("down_proj", (E, S))):
            rules.append((f"{hf}{module}.{family.shared_experts}.{name}.weight", mlp + (f"shared_{name}",), shape,
                          _transpose, _transpose))
        if cfg.shared_expert_gate:
            rules.append((f"{hf}{module}.shared_expert_gate.weight", mlp + ("shared_expert_gate",), (1, E),
                          _transpose, _transpose))
    return rules


def _mla_rules(cfg: ModelConfig, hf: str) -> list[tuple]:
    """Multi-head latent attention's input projections and norms (o_proj: `_layer_rules`)."""
    E, H, R, Q = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.q_lora_rank
    Dqk, Dr, Dkv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim
    attn = ("self_attn",)

    def heads_out(rows_in, D):  # Linear [H * D, in] <-> kernel [in, H, D]
        return ((H * D, rows_in), lambda w: np.ascontiguousarray(w.T.reshape(rows_in, H, D)),
                lambda k: np.ascontiguousarray(k.reshape(rows_in, H * D).T))

    if Q:
        rules = [(f"{hf}self_attn.q_a_proj.weight", attn + ("q_a_proj",), (Q, E), _transpose, _transpose),
                 (f"{hf}self_attn.q_a_layernorm.weight", attn + ("q_a_layernorm", "weight"), (Q,), _same, _same),
                 (f"{hf}self_attn.q_b_proj.weight", attn + ("q_b_proj",), *heads_out(Q, Dqk))]
    else:
        rules = [(f"{hf}self_attn.q_proj.weight", attn + ("q_proj",), *heads_out(E, Dqk))]
    return rules + [
        (f"{hf}self_attn.kv_a_proj_with_mqa.weight", attn + ("kv_a_proj_with_mqa",), (R + Dr, E), _transpose, _transpose),
        (f"{hf}self_attn.kv_a_layernorm.weight", attn + ("kv_a_layernorm", "weight"), (R,), _same, _same),
        (f"{hf}self_attn.kv_b_proj.weight", attn + ("kv_b_proj",), *heads_out(R, Dkv))]


def _linear_rules(cfg: ModelConfig, hf: str) -> list[tuple]:
    """A Gated DeltaNet layer's tensors (`jaxft.models.linear_attention`): Linears [out, in] as
    [in, out] kernels, the depthwise conv [C, 1, K] as [K, C], the gated norm's weight."""
    Hk, Dk, Hv, Dv, C, K = linear_dims(cfg)
    E, la = cfg.hidden_size, ("linear_attn",)
    rules = [(f"{hf}linear_attn.{name}.weight", la + (name,), (rows, E), _transpose, _transpose)
             for name, rows in (("in_proj_qkv", C), ("in_proj_z", Hv * Dv), ("in_proj_b", Hv), ("in_proj_a", Hv))]
    return rules + [
        (f"{hf}linear_attn.conv1d.weight", la + ("conv1d",), (C, 1, K),
         lambda w: np.ascontiguousarray(w[:, 0, :].T), lambda k: np.ascontiguousarray(k.T[:, None, :])),
        (f"{hf}linear_attn.dt_bias", la + ("dt_bias",), (Hv,), _same, _same),
        (f"{hf}linear_attn.A_log", la + ("A_log",), (Hv,), _same, _same),
        (f"{hf}linear_attn.norm.weight", la + ("norm_weight",), (Dv,), _same, _same),
        (f"{hf}linear_attn.out_proj.weight", la + ("out_proj",), (E, Hv * Dv), _transpose, _transpose)]


def _layer_rules(cfg: ModelConfig, spec, hf: str, moe: bool = False) -> list[tuple]:
    """One layer's (hf name, path in the layer, hf shape, to jaxft, to hf[, expert]); `cfg` has
    the layer's own shape (`ModelConfig.layer_config`) where `spec` gives one (Gemma 4)."""
    E, F = cfg.hidden_size, cfg.intermediate_size
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head

    def split_out(heads, D=D):  # Linear [heads*D, E] <-> kernel [E, heads, D]
        return ((heads * D, E),
                lambda w: np.ascontiguousarray(w.T.reshape(E, heads, D)),
                lambda k: np.ascontiguousarray(k.reshape(E, heads * D).T))

    def split_bias(heads):
        return (heads * D,), lambda b: b.reshape(heads, D), lambda b: b.reshape(heads * D)

    names = ("q", "k", "v") if spec is None else spec.projections
    projections = [(name, H if name == "q" else K) for name in names]
    rules: list[tuple] = []
    attn, mlp = ("self_attn",), ("mlp",)
    if cfg.kv_lora_rank is not None:  # multi-head latent attention: its own projections
        rules += _mla_rules(cfg, hf)
        projections, names = [], ()
    linear = spec is not None and spec.linear
    if linear:  # a Gated DeltaNet layer (Qwen3.5): no attention
        rules += _linear_rules(cfg, hf)
        projections, names = [], ()
    for name, heads in projections:
        Dq = 2 * D if name == "q" and cfg.attn_output_gate else D  # Qwen3.5: each head's query, then its gate
        rules.append((f"{hf}self_attn.{name}_proj.weight", attn + (f"{name}_proj",), *split_out(heads, Dq)))
        if cfg.qkv_bias:
            rules.append((f"{hf}self_attn.{name}_proj.bias", attn + (f"{name}_bias",), *split_bias(heads)))
    Do = cfg.v_head_dim if cfg.kv_lora_rank is not None else D  # MLA: o_proj reads the values' dims
    if not linear:
        rules.append((
            f"{hf}self_attn.o_proj.weight", attn + ("o_proj",), (E, H * Do),
            lambda w: np.ascontiguousarray(w.T.reshape(H, Do, E)),
            lambda k: np.ascontiguousarray(k.reshape(H * Do, E).T),
        ))
    if cfg.o_bias and not linear:
        rules.append((f"{hf}self_attn.o_proj.bias", attn + ("o_bias",), (E,), _same, _same))
    if cfg.attention_sinks:
        rules.append((f"{hf}self_attn.sinks", attn + ("sinks",), (H,), _same, _same))
    if cfg.qk_norm and not linear:
        for name in ("q_norm", "k_norm") if "k" in names else ("q_norm",):
            rules.append((f"{hf}self_attn.{name}.weight", attn + (name, "weight"), (D,), _same, _same))
    if moe:
        rules += _moe_rules(cfg, hf)
    for name, shape in () if moe else (("gate", (F, E)), ("up", (F, E)), ("down", (E, F))):
        rules.append((f"{hf}mlp.{name}_proj.weight", mlp + (f"{name}_proj",), shape, _transpose, _transpose))
        if cfg.mlp_bias:
            rules.append((f"{hf}mlp.{name}_proj.bias", mlp + (f"{name}_bias",), shape[:1], _same, _same))
    norms = ("input_layernorm", "post_attention_layernorm")
    if cfg.sandwich_norms:
        norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    if cfg.per_layer_input_size:
        P = cfg.per_layer_input_size
        norms += ("post_per_layer_input_norm",)
        rules.append((f"{hf}per_layer_input_gate.weight", ("per_layer_input_gate",), (P, E), _transpose, _transpose))
        rules.append((f"{hf}per_layer_projection.weight", ("per_layer_projection",), (E, P), _transpose, _transpose))
    for name in norms:
        rules.append((f"{hf}{name}.weight", (name, "weight"), (E,), _same, _same))
    if cfg.layer_scalar:
        rules.append((f"{hf}layer_scalar", ("layer_scalar",), (1,), _same, _same))
    return rules


def abstract_model(cfg: ModelConfig) -> Decoder:
    """The model with ShapeDtypeStruct leaves: no memory, for shapes and shardings."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def create_model(cfg: ModelConfig, *, seed: int = 0, mesh=None) -> Decoder:
    """A randomly initialised model; with `mesh`, every param is created already sharded."""
    if mesh is None:
        return Decoder(cfg, rngs=nnx.Rngs(seed))
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    shardings = param_shardings(abstract_state, mesh)

    @jax.jit
    def init():
        state = nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)))
        return jax.lax.with_sharding_constraint(state, shardings)

    with jax.set_mesh(mesh):
        state = init()
    return nnx.merge(graphdef, state)


def _fused(cfg: ModelConfig) -> dict:
    """The family's fused tensors (Phi-3's qkv_proj / gate_up_proj): {suffix: ((part, rows), ...)}."""
    return families.fused_tensors(cfg.model_type, cfg.parts())


def _interleaved(cfg: ModelConfig) -> tuple:
    """The family's tensors whose parts alternate along the last axis (gpt-oss's gate_up_proj)."""
    return families.family(cfg.model_type).interleaved


def _fuse(tensors: dict[str, np.ndarray], fused: dict, interleaved: tuple = ()) -> dict[str, np.ndarray]:
    """HF tensors with each fused group's parts concatenated (along the output rows) under the
    fused name, in the checkpoint's order; each interleaved group's parts alternating along the
    last axis."""
    out = dict(tensors)
    for suffix, parts in fused.items():
        first = parts[0][0]
        for name in [n for n in tensors if n.endswith("." + first)]:
            prefix = name[: -len(first)]
            out[prefix + suffix] = np.concatenate([out.pop(prefix + part) for part, _ in parts], axis=0)
    for suffix, parts in interleaved:
        for name in [n for n in tensors if n.endswith("." + parts[0])]:
            prefix = name[: -len(parts[0])]
            stacked = np.stack([out.pop(prefix + part) for part in parts], axis=-1)
            out[prefix + suffix] = stacked.reshape(stacked.shape[:-2] + (-1,))
    return out


class _TensorReader:
    """Looks tensors up by name across a single file or an index of shards (memory-mapped).
    A fused tensor (`fused`: Phi-3's qkv_proj) reads as its parts: row slices under their names.
    An MXFP4 tensor (`W_blocks` and `W_scales`) reads dequantized as `W` (`jaxft.models.mxfp4`),
    or with `packed(W)` as its codes and exponents; an interleaved one (`interleaved`: gpt-oss's
    gate_up_proj) as its parts."""

    def __init__(self, folder: Path, fused: dict | None = None, interleaved: tuple = ()):
        index = folder / INDEX_FILE
        self._open: dict[Path, object] = {}
        self._views: dict[str, tuple[str, int, int]] = {}  # part name -> (fused name, rows from, to)
        self._derived: dict[str, tuple[tuple, Callable]] = {}  # name -> (shape, read it), not stored as itself
        self._hidden: set[str] = set()  # stored names read only through derived ones
        self._packed: dict[str, Callable] = {}  # MXFP4 name -> read its mxfp4.Packed
        self._last: tuple | None = None  # the last interleaved tensor read (its parts follow)
        self._stored: dict[str, str] = {}  # name -> the name it is stored under, where they differ
        if index.is_file():
            self.files = {name: folder / f for name, f in _weight_map(index).items()}
            for path in sorted(set(self.files.values())):
                if not path.is_file():
                    raise PathError(f"{path} not found: {index} lists it; the download or export "
                                            "is incomplete (copy every shard the index names)")
        elif (folder / SINGLE_FILE).is_file():
            self.files = {name: folder / SINGLE_FILE for name in self._handle_of(folder / SINGLE_FILE).keys()}
        else:
            raise PathError(
                f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; jaxft reads safetensors checkpoints "
                "(convert .bin files with transformers' save_pretrained(safe_serialization=True))"
            )
        # A multimodal checkpoint (Gemma 3 4B+): its text tensors under their text-model names;
        # the vision tower and projector are left unread.
        text, self.not_text = families.text_tensor_names(self.files)
        if text:
            self.files = {name: self.files[stored] for name, stored in text.items()}
            self._stored = text
        for suffix, parts in (fused or {}).items():
            for name in [n for n in self.files if n.endswith("." + suffix)]:
                start = 0
                for part, rows in parts:
                    self._views[name[: -len(suffix)] + part] = (name, start, start + rows)
                    start += rows
        for name, (blocks, scales) in mxfp4.packed_names(self.files).items():
            self._derived[name] = (mxfp4.dequantized_shape(self.shape(blocks)),
                                   lambda b=blocks, s=scales: mxfp4.dequantize(self.get(b), self.get(s)))
            self._packed[name] = lambda b=blocks, s=scales: mxfp4.unpack(self.get(b), self.get(s))
            self._hidden |= {blocks, scales}
        for suffix, parts in interleaved:
            for name in [n for n in self.names() if n.endswith("." + suffix)]:
                *lead, width = self.shape(name)
                k = len(parts)
                for j, part in enumerate(parts):
                    self._derived[name[: -len(suffix)] + part] = (
                        (*lead, width // k), lambda n=name, j=j, k=k: self._whole(n)[..., j::k])
                    if name in self._packed:  # the parts' codes and exponents: the same columns
                        self._packed[name[: -len(suffix)] + part] = lambda n=name, j=j, k=k: mxfp4.Packed(
                            *(a[..., j::k] for a in self._whole(n, packed=True)))
                self._hidden.add(name)

    def _whole(self, name: str, packed: bool = False):
        if self._last is None or self._last[0] != (name, packed):
            self._last = ((name, packed), self.packed(name) if packed else self.get(name))
        return self._last[1]

    def packed(self, name: str) -> mxfp4.Packed | None:
        """An MXFP4 tensor's codes and exponents in a kernel's layout; None for another tensor."""
        return self._packed[name]() if name in self._packed else None

    def names(self) -> set[str]:
        return ((set(self.files) | set(self._views) | set(self._derived))
                - {real for real, _, _ in self._views.values()} - self._hidden)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._derived:
            return tuple(self._derived[name][0])
        if name in self._views:
            real, start, stop = self._views[name]
            return (stop - start,) + self.shape(real)[1:]
        return tuple(self._handle(name).get_slice(self._stored.get(name, name)).get_shape())

    def get(self, name: str) -> np.ndarray:
        if name in self._derived:
            return self._derived[name][1]()
        if name in self._views:
            real, start, stop = self._views[name]
            return self._handle(real).get_slice(self._stored.get(real, real))[start:stop]
        try:
            return self._handle(name).get_tensor(self._stored.get(name, name))
        except SafetensorError as err:
            raise DataError(f"{self.files[name]}: cannot read tensor {name} ({err}); the file is damaged: "
                             "re-export or re-download it") from None

    def _handle(self, name):
        return self._handle_of(self.files[name])

    def _handle_of(self, path: Path):
        if path not in self._open:
            try:
                self._open[path] = safe_open(path, framework="np").__enter__()
            except SafetensorError as err:
                # A truncated download or an interrupted copy: name the file, not the parser's state.
                raise DataError(f"{path} is not a readable safetensors file ({err}): it is truncated or "
                                 "damaged; re-export or re-download it") from None
        return self._open[path]


def _weight_map(index: Path) -> dict[str, str]:
    """{tensor name: shard file name} of a model.safetensors.index.json."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise DataError(f"{index} is not a safetensors index (a JSON object with a weight_map): it is "
                         "truncated or damaged; re-export or re-download it")
    return weight_map


def load_hf(path: str | Path, *, dtype=None, mesh=None) -> Decoder:
    """Loads a Hugging Face model folder into a jaxft model.

    path: folder with config.json and model.safetensors or model.safetensors.index.json.
    dtype: param dtype (default: the checkpoint's `dtype` / `torch_dtype`); compute dtype
      follows it (set `model.compute_dtype` in configs to differ).
    mesh: if given, each tensor is placed straight into its shards over the mesh.
    Raises ValueError listing missing, unexpected or mis-shaped tensors.
    """
    folder = Path(path)
    check_model_folder(folder, flag="model folder")
    cfg = read_hf_config(folder, dtype=dtype)
    return load_weights(folder, cfg, mesh=mesh)


def load_weights(folder: str | Path, cfg: ModelConfig, *, mesh=None, transform: Callable | None = None,
                 keep_mxfp4: bool = False, ignore: frozenset[str] | set[str] = frozenset()) -> Decoder:
    """Reads the safetensors weights of `folder` into a model of architecture `cfg`.
    transform: `fn(state path, device array) -> value`, applied to each weight as it lands on
    the devices (QLoRA quantizes there, so the full-precision model never exists whole).
    keep_mxfp4: the checkpoint's MXFP4 tensors (gpt-oss's experts) reach `transform` as host
    `mxfp4.Packed` codes and exponents, never dequantized (`lora.base_quantization=mxfp4`).
    ignore: tensor names the folder may hold besides the model's (a reward model's score.weight)."""
    folder = Path(folder)
    if keep_mxfp4 and transform is None:
        raise ValueError("keep_mxfp4 needs a transform to place the packed tensors (jaxft.models.quantize.quantizer)")
    reader = _TensorReader(folder, _fused(cfg), _interleaved(cfg))
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    shardings = param_shardings(abstract_state, mesh) if mesh is not None else None
    rules = _tensor_rules(cfg)

    expected = {rule[0] for rule in rules}
    missing = sorted(expected - reader.names())
    # A tied model may still carry an lm_head copy (some exporters write it): ignore it.
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(reader.names() - expected - ignorable - set(ignore) - _ROTARY_BUFFERS(reader.names())
                        - _next_token_layers(reader.names(), cfg))
    bad_shapes = [
        f"{name}: checkpoint {reader.shape(name)}, config.json implies {shape}"
        for name, _, shape, _, _, _ in rules
        if name not in missing and reader.shape(name) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if bad_shapes:
        problems.append("tensors with wrong shapes: " + "; ".join(bad_shapes))
    if problems:
        raise DataError(f"{folder} does not match its config.json ({cfg.model_type}): " + ". ".join(problems))

    # Host values per state path; a scanned model's layers (and experts) stack along leading axes.
    # Each in its param's dtype: the param dtype, but float32 for DeepSeek's router and selection
    # bias (transformers keeps them float32 too).
    dtypes = {path: v.get_value().dtype for path, v in nnx.to_flat_state(abstract_state)}
    host: dict[tuple, object] = {}
    for name, jpath, _, to_jax, _, index in rules:
        packed = reader.packed(name) if keep_mxfp4 else None  # stacked experts: [X, in, out] as ours
        value = packed if packed is not None else to_jax(reader.get(name)).astype(dtypes[jpath])
        if not index:
            host[jpath] = value
        else:
            host.setdefault(jpath, {})[index] = value
    state: dict = {}
    shard_flat = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    for jpath, value in host.items():
        value = _stack(value) if isinstance(value, dict) else value
        if isinstance(value, mxfp4.Packed):  # `transform` places the codes and exponents
            set_path(state, jpath, transform(jpath, value))
            continue
        if mesh is not None:
            value = jax.make_array_from_callback(value.shape, shard_flat[jpath], lambda idx, v=value: v[idx])
        else:
            value = jnp.asarray(value)
        set_path(state, jpath, transform(jpath, value) if transform is not None else value)
    model = nnx.merge(graphdef, abstract_state)
    nnx.update(model, nnx.State(state))
    return model


def _stack(parts: dict[tuple[int, ...], np.ndarray]) -> np.ndarray:
    """{(i, j, ...): array} -> one array with leading axes (I, J, ...) (per field for mxfp4.Packed)."""
    keys = sorted(parts)
    if isinstance(parts[keys[0]], mxfp4.Packed):
        return mxfp4.Packed(*(_stack({k: v[f] for k, v in parts.items()}) for f in range(2)))
    grid = tuple(max(k[d] for k in keys) + 1 for d in range(len(keys[0])))
    return np.stack([parts[k] for k in keys]).reshape(grid + parts[keys[0]].shape)


def _next_token_layers(names, cfg: ModelConfig) -> set[str]:
    """DeepSeek-V3's multi-token-prediction layers (`num_nextn_predict_layers`, stored as layers
    past num_hidden_layers) and Qwen3.5's (`mtp.*`): not part of the causal LM, unread as
    transformers leaves them."""
    extra = int(cfg.extra_hf_config.get("num_nextn_predict_layers") or 0)
    prefixes = tuple(f"model.layers.{cfg.num_layers + i}." for i in range(extra))
    prefixes += ("mtp.",) if cfg.has_linear_layers else ()  # Qwen3.5's multi-token prediction head, unread
    return {n for n in names if prefixes and n.startswith(prefixes)}


def _ROTARY_BUFFERS(names):
    # Old Llama checkpoints saved rotary inv_freq buffers; they are derived, not weights.
    return {n for n in names if n.endswith("rotary_emb.inv_freq")}


def host_array(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly sharded, possibly multi-host) array on this host."""
    if not x.is_fully_addressable:
        x = jax.experimental.multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def hf_state_dict(model: Decoder, dtype=None) -> dict[str, np.ndarray]:
    """{hf tensor name: numpy array} in HF layout (and `dtype`, default the param dtype)."""
    cfg = model.cfg
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    gathered: dict[tuple, np.ndarray] = {}  # each (stacked) array gathered once
    out = {}
    for name, jpath, _, _, to_hf, index in _tensor_rules(cfg):
        if jpath not in gathered:
            gathered[jpath] = host_array(flat[jpath][...])
        value = gathered[jpath][index] if index else gathered[jpath]
        # a param kept in its own dtype (DeepSeek's float32 router and bias) is saved in it
        keep = value.dtype != np.dtype(cfg.param_dtype)
        out[name] = np.ascontiguousarray(to_hf(value).astype(value.dtype if keep else dtype or cfg.param_dtype))
    return _fuse(out, _fused(cfg), _interleaved(cfg))


def save_hf(model: Decoder, path: str | Path, *, tokenizer=None, dtype=None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Writes `model` as a Hugging Face folder: config.json, safetensors, tokenizer files.

    Above `max_shard_bytes` the weights are split into `model-0000k-of-0000n.safetensors`
    with a `model.safetensors.index.json`, as transformers does. In a multi-host run every
    process must call this (arrays are gathered); only process 0 writes.
    """
    folder = Path(path)
    cfg = model.cfg if dtype is None else model.cfg.replace(param_dtype=dtype)
    tensors = hf_state_dict(model, dtype=cfg.param_dtype)
    if jax.process_index() != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    generation = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                                     ("pad_token_id", cfg.pad_token_id)) if v is not None}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    shards = _split_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers refuses safetensors without it
    for stale in list(folder.glob("model*.safetensors")) + [folder / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # never leave an old shard that the index doesn't list
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata=metadata)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / fname, metadata=metadata)
            weight_map.update({name: fname for name in shard})
        total = sum(t.nbytes for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _split_shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    return shards + [current]
