"""`jaxft plan`: the memory and time of one real training step on a TPU pod, from this machine.

The run's own pieces are built abstractly (model config, mesh over the pod's devices, params
and TrainState shardings, optimizer, the jitted SFT / DPO step, a global batch of
ShapeDtypeStructs) and compiled ahead of time for the pod's topology through libtpu: no
weights are allocated and nothing executes, so an 8B model plans on a laptop CPU.
`compiled.memory_analysis()` is XLA's exact per-device account of that program; the step
time is an estimate (analytic FLOPs at an assumed MFU), and GPU targets, which cannot be
compiled here, get an analytic estimate only.

    result = plan(jaxft.config.load("configs/sft.py", {"model.preset": "llama3_8b"}), target="v5p-8")
    print(format_plan(result))
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxft.errors import ConfigError
from jaxft.perf.targets import TARGETS, Target, get_target, topology_devices  # noqa: F401  (plan's API)

GIB = 1024**3
ASSUMED_MFU = 0.4  # a well-tuned dense step; the time below is this assumption, not a measurement


@dataclasses.dataclass
class PlanResult:
    """One step's plan. Byte counts are per device (chip); `compiled` False = analytic estimate."""
    target: str
    kind: str
    model: str
    compiled: bool
    devices: int
    mesh: dict
    settings: dict  # what shapes the memory: attention, remat, layer scan, dtypes, loss chunk, accumulate
    num_params: int
    batch_rows: int  # global rows of data.max_length tokens (DPO unpacked: 2 per pair)
    seq_len: int
    tokens_per_step: int
    param_bytes: int  # trainable params (LoRA: the adapters)
    opt_state_bytes: int
    argument_bytes: int  # compiled: inputs (state + batch); analytic: params + optimizer state
    output_bytes: int
    alias_bytes: int  # outputs written into donated inputs
    temp_bytes: int  # compiled: XLA temporaries; analytic: gradients + activation estimate
    total_bytes: int  # argument + output - alias + temp
    hbm_bytes: int
    fits: bool
    flops_per_step: float
    step_seconds_estimate: float  # at `mfu_assumed` of the target's peak
    mfu_assumed: float
    peak_flops_per_chip: float
    compile_seconds: float
    compile_error: str | None  # XLA's refusal when the step does not fit in HBM (then fits is False)
    suggestions: list
    notes: list
    frozen_bytes: int = 0  # LoRA: the frozen base (among the arguments)
    # compiled: {collective: instructions of it in the program} (a scanned layer loop's body once)
    collectives: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class _PresetVocab:
    """Stands in for the tokenizer of a preset: the preset's own vocabulary and special ids, so
    the plan is of the published architecture (not resized to the bundled 512-token one)."""

    def __init__(self, cfg):
        self.size, self.bos_token_id, self.eos_token_id = cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id
        self.pad_token_id = cfg.pad_token_id

    def __len__(self):
        return self.size


def plan_model_config(config):
    """The ModelConfig the run would build (a preset at its own vocabulary, else model.path's)."""
    from jaxft.data.from_config import load_tokenizer
    from jaxft.models.from_config import model_config
    from jaxft.models.presets import get_preset

    if not config.model.path and not config.model.preset:
        raise ConfigError("config key model.path: no model; set --config.model.preset=NAME (e.g. llama3_8b) "
                         "or --config.model.path=HF_FOLDER")
    if config.model.path or config.model.tokenizer:
        return model_config(config, load_tokenizer(config))
    return model_config(config, _PresetVocab(get_preset(config.model.preset)))


def loss_chunk_size(config, cfg) -> int:
    """train.loss_chunk_size with -1 resolved as the run resolves it."""
    from jaxft.losses import resolve_chunk_size

    return resolve_chunk_size(config.train.loss_chunk_size, cfg.vocab_size)


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (shapes) laid out by `shardings` (same structure)."""
    leaves, sh = jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return int(sum(math.prod(s.shard_shape(x.shape)) * _itemsize(x.dtype) for x, s in zip(leaves, sh)))


def _itemsize(dtype) -> float:
    """Bytes an element takes in accelerator memory (4-bit types pack two a byte)."""
    return 0.5 if jnp.dtype(dtype).name in ("int4", "uint4") else jnp.dtype(dtype).itemsize


@dataclasses.dataclass
class _Step:
    """The task's jitted step for the plan, its abstract arguments, and what the table reads off them."""
    train_step: object  # jaxft.tasks.TrainStep
    mesh: object
    state: dict
    batch: dict
    state_shardings: dict
    argument_bytes: int  # per device, from the shapes (XLA's own count when it compiles)
    note: str | None = None
    frozen_bytes: int = 0  # LoRA: the frozen base, per device (among the arguments)

    @property
    def params(self):
        return self.state["params"]

    @property
    def opt_state(self):
        return self.state["opt_state"]

    def lower(self):
        """The step lowered as a run lowers it: under the mesh (model code constrains
        activations by the ambient mesh)."""
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(self.state, self.batch)


def _sharded_bytes(tree) -> int:
    """Per-device bytes of a tree of ShapeDtypeStructs (or arrays) by their own shardings."""
    if tree is None:
        return 0
    return per_device_bytes(tree, jax.tree.map(lambda x: x.sharding, tree))


def _task(kind: str):
    """The Task class of `kind` (ValueError naming the known kinds)."""
    from jaxft.tasks import get_task

    return get_task(kind)


def build_step(config, kind, cfg, mesh, tx, schedule) -> _Step:
    """The run's train step for `kind`, from the task (`TASKS[kind].build_train_step`, as a run
    builds it) over abstract state, reference and batch: what plan compiles is what a run compiles."""
    from jaxft.steps.state import train_state_shardings
    from jaxft.steps.weights import abstract_weights
    from jaxft.tasks import StepSetup

    task = _task(kind)
    weights, params = abstract_weights(config, cfg, mesh)
    # Outside the mesh: optax's tree_map_params runs tx.init on a placeholder concretely,
    # and nothing can execute on compile-only TPU devices.
    state_sh = train_state_shardings(params, tx, mesh)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=state_sh["step"]), "params": params,
             "opt_state": jax.eval_shape(tx.init, params)}
    setup = StepSetup(config=config, model_config=cfg, mesh=mesh, weights=weights, tx=tx, schedule=schedule,
                      state_shardings=state_sh)
    reference = task.abstract_reference(setup, params)
    train_step = task.build_train_step(setup, reference)
    batch = task.abstract_batch(config, mesh)
    frozen_bytes = _sharded_bytes(weights.frozen)
    ref_bytes = _sharded_bytes(None if reference is None else reference.value)
    arg_bytes = per_device_bytes(state, state_sh) + _sharded_bytes(batch) + frozen_bytes + ref_bytes
    note = None
    if reference is not None:
        note = f"DPO reference: {reference.variant} ({ref_bytes / GIB:.3f} GiB per device, among the arguments)"
        if reference.variant == "adapters_off":
            note = "DPO reference: the frozen base with the adapters off (no second copy)"
    return _Step(train_step, mesh, state, batch, state_sh, arg_bytes, note, frozen_bytes=frozen_bytes)


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def count_collectives(hlo_text: str) -> dict:
    """{collective: how many instructions of it} in a compiled program's HLO text (async pairs
    counted once, by their start)."""
    return {c: len(re.findall(rf"= [^=]*? {c}(?:-start)?\(", hlo_text)) for c in COLLECTIVES}


def compile_memory(step: _Step, mesh) -> tuple[dict, str | None]:
    """XLA's per-device memory of the compiled step (and, under "collectives", the collectives
    it holds), and None; or, when the compiler refuses because the step does not fit, its
    estimate (temporaries from its message, arguments from the shapes) and that message."""
    try:
        compiled = step.lower().compile()
        m, collectives = compiled.memory_analysis(), count_collectives(compiled.as_text())
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        # "... required for HLO temporaries (27.78G) exceeds available HBM (15.75G)": 1024-based.
        found = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", str(err))
        temp = float(found[1]) * 1024 ** " KMGT".index(found[2] or " ") if found else 0
        state = step.argument_bytes  # outputs are the new state, written into the donated one
        return dict(argument_bytes=state, output_bytes=0, alias_bytes=0, temp_bytes=int(temp)), str(err)
    return dict(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
                alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
                collectives=collectives), None


def suggestions(config, cfg, mesh_shape: dict, devices: int) -> list[str]:
    """What to change when a step does not fit, most effective first; only what applies."""
    out = []
    if str(config.model.remat).lower() in ("none", "false", ""):
        value = "True" if isinstance(config.model.remat, bool) else "full"
        out.append(f"--config.model.remat={value} (recompute layer activations in the backward pass)")
    others = mesh_shape["tensor"] * mesh_shape["sequence"] * mesh_shape["expert"]
    if mesh_shape["fsdp"] < devices // others:
        out.append(f"--config.mesh.fsdp={devices // others} --config.mesh.data=1 "
                   "(shard params and optimizer state over more devices)")
    rows_per_device = config.train.batch_size // config.optim.accumulate / _batch_shards(mesh_shape)
    if rows_per_device > 1:
        out.append(f"a smaller --config.train.batch_size or --config.optim.accumulate={config.optim.accumulate * 2} "
                   "(fewer rows per device at once)")
    elif config.data.max_length >= 8192 and mesh_shape["fsdp"] % 2 == 0:
        out.append(f"--config.mesh.sequence={mesh_shape['sequence'] * 2} --config.mesh.fsdp={mesh_shape['fsdp'] // 2} "
                   "and a batch of one row per fsdp shard (context parallelism: split each row's tokens)")
    if loss_chunk_size(config, cfg) == 0:
        out.append("--config.train.loss_chunk_size=-1 (logits a chunk of trained tokens at a time, never [B, L, V])")
    return out


def _batch_shards(mesh_shape: dict) -> int:
    """Devices a batch's rows are split over (data, fsdp and expert)."""
    return mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape["expert"]


def _analytic(config, kind, cfg, target, mesh_shape) -> dict:
    """A GPU estimate: FSDP-sharded params, AdamW moments and grads, plus activations."""
    from jaxft.models.lora import num_adapter_params

    n, dev = cfg.num_params(), target.chips
    p_bytes, c_bytes = jnp.dtype(cfg.param_dtype).itemsize, jnp.dtype(cfg.compute_dtype).itemsize
    params = grads = n * p_bytes // dev
    frozen = 0
    if cfg.lora is not None:  # a frozen base; float32 adapters train (grads and moments of them only)
        frozen, params = params, num_adapter_params(cfg) * 4 // dev
        grads = params
    opt = 2 * params  # AdamW mu and nu, in the param dtype
    length = config.data.max_length
    rows_dev = max(_task(kind).batch_rows(config) // config.optim.accumulate // _batch_shards(mesh_shape), 1)
    tokens = rows_dev * length // mesh_shape["sequence"]  # context parallelism splits each row
    E, F, H, K, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    # What one layer keeps for the backward pass per token: norms, q/k/v, attention out, the
    # MLP's gate/up/product, and the einsum attention's f32 probabilities over L keys.
    layer = c_bytes * (6 * E + 2 * K * D + 3 * F) + 4 * H * length
    if str(cfg.remat) not in ("none", "False"):  # only each layer's input, plus one layer live
        acts = tokens * (cfg.num_layers * c_bytes * E + 2 * layer)
    else:
        acts = tokens * cfg.num_layers * layer
    # f32 logits and their gradient: one chunk of tokens per device, or every row's whole.
    chunk = loss_chunk_size(config, cfg) or rows_dev * length // mesh_shape["sequence"]
    logits = chunk * cfg.vocab_size * 4 * 2
    return dict(param_bytes=params, opt_state_bytes=opt, argument_bytes=params + opt + frozen, output_bytes=0,
                alias_bytes=0, temp_bytes=grads + acts + logits, frozen_bytes=frozen)


def plan(config, *, target: str, kind: str = "sft") -> PlanResult:
    """Plans one optimizer step of `config` (a run config; data.train may be empty) on `target`.

    kind: "sft" or "dpo" (DPO's reference as the config has it: dpo.precompute_reference =
    a [N, 2] table, else a frozen params copy, or none). TPU targets are compiled ahead of
    time through libtpu (RuntimeError if it is missing); GPU targets are analytic.
    """
    from jaxft.io.metrics import train_flops_per_token
    from jaxft.models import grouped_matmul
    from jaxft.models.attention import resolve as resolve_attention
    from jaxft.parallel.sharding import MESH_AXES, axis_size, check_batch_divisibility, check_expert_divisibility
    from jaxft.parallel.sharding import make_mesh

    task = _task(kind)  # an unknown kind fails here, naming the known ones
    spec = get_target(target)
    cfg = plan_model_config(config)
    # model.attention "auto" picks by the local backend (this CPU): pick for the target instead.
    # So do the experts' grouped matmuls (model.moe_matmul "auto": the Pallas kernel on TPU).
    platform = "tpu" if spec.topology else "gpu"
    cfg = cfg.replace(attention=resolve_attention(cfg.attention, platform),
                      moe_matmul=grouped_matmul.resolve(cfg.moe_matmul, platform))
    devices = topology_devices(spec) if spec.topology else list(range(spec.chips))
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices,
                     sequence=config.mesh.sequence, expert=config.mesh.expert)
    mesh_shape = {a: axis_size(mesh, a) for a in MESH_AXES}  # expert 1 included (the mesh omits it)
    check_expert_divisibility(cfg.num_experts, mesh)
    rows = task.batch_rows(config)
    check_batch_divisibility(config, mesh, rows_per_example=task.rows_per_example(config))
    length = config.data.max_length
    tokens = rows * length
    flops = train_flops_per_token(cfg, length) * tokens
    settings = dict(attention=cfg.attention, remat=cfg.remat, scan_layers=cfg.scan_layers,
                    param_dtype=jnp.dtype(cfg.param_dtype).name, compute_dtype=jnp.dtype(cfg.compute_dtype).name,
                    loss_chunk_size=loss_chunk_size(config, cfg), accumulate=config.optim.accumulate)
    if cfg.num_experts:
        settings.update(moe_matmul=cfg.moe_matmul)
    if cfg.lora is not None:
        from jaxft.models.from_config import base_quantization

        settings.update(lora_rank=cfg.lora.rank, base_quantization=base_quantization(config))
    if spec.topology is None:
        mem, compile_error, seconds = _analytic(config, kind, cfg, spec, mesh_shape), None, 0.0
        notes = ["analytic, not compiled: GPU programs cannot be compiled here; memory is an estimate"]
    else:
        mem, compile_error, seconds, notes = _compiled(config, kind, cfg, mesh)
    total = mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
    hbm = int(spec.hbm_gib * GIB)
    fits = total <= hbm and compile_error is None
    return PlanResult(
        target=target, kind=kind, model=config.model.path or config.model.preset, compiled=spec.topology is not None,
        devices=spec.chips, mesh=mesh_shape, settings=settings, num_params=int(cfg.num_params()), batch_rows=rows,
        seq_len=length,
        tokens_per_step=tokens, **mem, total_bytes=int(total), hbm_bytes=hbm, fits=fits, flops_per_step=flops,
        step_seconds_estimate=flops / (spec.chips * spec.peak_flops * ASSUMED_MFU), mfu_assumed=ASSUMED_MFU,
        peak_flops_per_chip=spec.peak_flops, compile_seconds=round(seconds, 1),
        compile_error=compile_error,
        suggestions=[] if fits else suggestions(config, cfg, mesh_shape, spec.chips), notes=notes)


def _compiled(config, kind, cfg, mesh) -> tuple[dict, str | None, float, list[str]]:
    """(per-device memory, the compiler's refusal or None, compile seconds, notes) of the task's
    step compiled for the TPU mesh."""
    from jaxft.steps.optimizer import optimizer_from_config

    total_steps = max(config.train.steps, config.optim.warmup_steps, 1)  # the schedule's length: no memory
    tx, schedule = optimizer_from_config(config.optim, total_steps)
    start = time.perf_counter()
    step = build_step(config, kind, cfg, mesh, tx, schedule)
    mem, compile_error = compile_memory(step, mesh)
    seconds = time.perf_counter() - start
    mem = dict(param_bytes=per_device_bytes(step.params, step.state_shardings["params"]),
               opt_state_bytes=per_device_bytes(step.opt_state, step.state_shardings["opt_state"]),
               frozen_bytes=step.frozen_bytes, **mem)
    notes = _lora_notes(cfg, step.params, dict(mesh.shape)) if cfg.lora is not None else []
    notes += [step.note] if step.note else []
    if compile_error:
        notes.append("the compiler's message gives the temporaries; arguments are from the shapes")
    return mem, compile_error, seconds, notes


def _lora_notes(cfg, adapters, mesh_shape: dict) -> list[str]:
    """What a LoRA plan trains, and what full fine-tuning the same model would hold."""
    from jaxft.models.lora import model_targets

    num_params = cfg.num_params()
    trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
    shards = mesh_shape["fsdp"] * mesh_shape.get("expert", 1) * mesh_shape["tensor"]
    # Params, mu and nu in float32, as the full fine-tuning recipes keep them (not the LoRA
    # base's dtype: a bf16 base would halve the figure).
    full = 3 * num_params * 4 / shards
    return [f"LoRA rank {cfg.lora.rank} on {', '.join(model_targets(cfg))}: {trainable:,} trainable "
            f"params ({100 * trainable / num_params:.2f}% of the model); the base is frozen",
            f"full fine-tuning of this model would hold {full / GIB:.2f} GiB per device of params "
            f"and AdamW moments alone (float32, as the full recipes keep them, over {shards} shards), "
            "gradients and activations on top; plan it without lora.rank to compile it"]


def format_plan(r: PlanResult) -> str:
    """The plan as a small table (GiB per device) with fit, time estimate and suggestions."""
    unit, size = ("GiB", GIB) if r.total_bytes >= GIB else ("MiB", 1024**2)
    how = f"compiled for the TPU topology in {r.compile_seconds:.0f} s" if r.compiled else "analytic, not compiled"
    if r.compile_error:
        how = f"XLA refused to compile it for the TPU topology ({r.compile_seconds:.0f} s): {r.compile_error}"
    mesh = " x ".join(f"{k} {v}" for k, v in r.mesh.items())
    lines = [f"jaxft plan: {r.kind} step of {r.model} ({r.num_params:,} params) on {r.target} "
             f"({r.devices} chips; mesh {mesh}); {how}",
             "settings: " + ", ".join(f"{k} {v}" for k, v in r.settings.items()),
             f"batch: {r.batch_rows} rows x {r.seq_len} tokens = {r.tokens_per_step:,} tokens per step",
             "", f"per device {unit:>30}"]
    rows = [("params" if not r.frozen_bytes else "adapters (trainable)", r.param_bytes),
            *([("frozen base", r.frozen_bytes)] if r.frozen_bytes else []), ("optimizer state", r.opt_state_bytes),
            ("arguments (state + batch)" if r.compiled else "params + optimizer state", r.argument_bytes),
            ("outputs", r.output_bytes), ("aliased (donated) outputs", -r.alias_bytes),
            ("temporaries" if r.compiled else "grads + activations (estimate)", r.temp_bytes),
            ("total", r.total_bytes), ("HBM", r.hbm_bytes)]
    lines += [f"  {name:<30}{b / size:>9.2f}" for name, b in rows]
    if r.collectives:
        lines += ["collectives in the compiled program (a scanned layer loop's body counted once): "
                  + ", ".join(f"{k} {v}" for k, v in r.collectives.items())]
    verdict = "fits" if r.fits else "DOES NOT FIT"
    t = r.step_seconds_estimate
    step_time = f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.3g} ms"
    lines += ["", f"{verdict}: {r.total_bytes / size:.2f} {unit} of {r.hbm_bytes / GIB:.0f} GiB per device "
                  f"({100 * r.total_bytes / r.hbm_bytes:.1f}%)",
              f"FLOPs per step (analytic): {r.flops_per_step:.3g}; step time estimate at {r.mfu_assumed:.0%} MFU "
              f"of {r.peak_flops_per_chip / 1e12:.0f} TFLOP/s per chip: {step_time} "
              f"({r.tokens_per_step / t / r.devices:,.0f} tokens/s per chip)"]
    lines += [f"note: {n}" for n in r.notes]
    if r.suggestions:
        lines += ["to fit, try (in this order):"] + [f"  {s}" for s in r.suggestions]
    return "\n".join(lines)
