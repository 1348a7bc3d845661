"""`Weights`: the model's weights as a step sees them, one object for the trainable/frozen split.

Full fine-tuning trains every param: the train state's params are the model. With LoRA the
state's params are the adapters and the base is frozen: a separate argument of every step,
never donated, never differentiated (stored quantized for QLoRA). `Weights` owns that split:
what `nnx.merge` takes (`merge_args`), the shardings of both halves, and the trailing step
argument (`step_args`). The base is concrete arrays in a run and ShapeDtypeStructs when
`jaxft plan` compiles for a pod it does not have (`abstract_weights`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from jaxft.steps.common import with_frozen


@dataclasses.dataclass(frozen=True)
class Weights:
    graphdef: Any  # nnx.GraphDef of the policy (with LoRA: of adapters + base)
    trainable_shardings: Any  # the train state's params' shardings
    frozen: Any = None  # LoRA: the frozen base (arrays, or ShapeDtypeStructs when planning)
    frozen_shardings: Any = None

    @classmethod
    def of(cls, graphdef, trainable_shardings, frozen=None) -> "Weights":
        """Weights whose frozen base (or None) keeps the shardings its arrays have."""
        frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
        return cls(graphdef, trainable_shardings, frozen, frozen_shardings)

    @property
    def lora(self) -> bool:
        return self.frozen is not None

    def merge_args(self, params):
        """What the model is merged from: `params`, or (adapters, frozen base) with LoRA."""
        return with_frozen(params, self.frozen)

    def shardings(self):
        """The shardings of `merge_args(params)`."""
        return with_frozen(self.trainable_shardings, self.frozen_shardings)

    def step_args(self) -> tuple:
        """The trailing arguments of a jitted train step: (frozen base,) with LoRA, else ()."""
        return () if self.frozen is None else (self.frozen,)

    def step_arg_shardings(self) -> tuple:
        return () if self.frozen is None else (self.frozen_shardings,)


def abstract_weights(config, cfg, mesh) -> tuple[Weights, dict]:
    """(Weights, abstract trainable params) of the run `config` would build for ModelConfig
    `cfg` on `mesh`, as ShapeDtypeStructs with their shardings: nothing is allocated, so a
    pod-sized model is planned on a laptop. Mirrors `jaxft.models.from_config.load_trainable`:
    with LoRA the trainable params are the adapters and the frozen base is stored as the run
    stores it (codes and scales for QLoRA)."""
    from jaxft.models import abstract_model
    from jaxft.models.adapters import lora_graphdef
    from jaxft.models.from_config import base_quantization
    from jaxft.models.quantize import quantize_base, quantized_shardings
    from jaxft.parallel.sharding import param_shardings

    frozen = frozen_sh = None
    with jax.set_mesh(mesh):  # Flax builds annotated params only under a mesh
        if cfg.lora is None:
            graphdef, abstract_state = nnx.split(abstract_model(cfg), nnx.Param)
        else:
            graphdef, abstract_state, abstract_base = lora_graphdef(cfg)
            frozen_sh = nnx.to_pure_dict(param_shardings(abstract_base, mesh))
            base = nnx.to_pure_dict(abstract_base)
            quantization = base_quantization(config)
            if quantization != "none":
                frozen_sh = quantized_shardings(cfg, base, frozen_sh, quantization, mesh)
                base = jax.eval_shape(lambda b: quantize_base(cfg, b, quantization), base)
            frozen = _placed(base, frozen_sh)
        shardings = nnx.to_pure_dict(param_shardings(abstract_state, mesh))
    params = _placed(nnx.to_pure_dict(abstract_state), shardings)
    return Weights(graphdef, shardings, frozen, frozen_sh), params


def _placed(tree, shardings):
    """ShapeDtypeStructs of `tree`'s shapes with `shardings` (same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
