"""The TrainState and its shardings.

A TrainState is a plain dict pytree, saved by Orbax as is:
  step:      int32 scalar, optimizer updates applied so far (a skipped step does not count)
  params:    nested dict of the policy's nnx.Param values (`nnx.split(model, nnx.Param)`)
  opt_state: the optax state for `params`
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxft.parallel.sharding import replicated


def init_train_state(params, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def train_state_shardings(params, tx: optax.GradientTransformation, mesh) -> dict:
    """Shardings of {step, params, opt_state}: optimizer moments take their params'."""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    everywhere = replicated(mesh)
    opt_shardings = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
        transform_non_params=lambda _: everywhere,
    )
    return {"step": everywhere, "params": param_shardings, "opt_state": opt_shardings}


def create_train_state(params, tx: optax.GradientTransformation, mesh) -> tuple[dict, dict]:
    """(state, its shardings) with the optimizer state created already sharded."""
    shardings = train_state_shardings(params, tx, mesh)
    state = jax.jit(lambda p: init_train_state(p, tx), out_shardings=shardings)(params)
    return state, shardings
