"""The pure, jitted train steps and what they share.

`state.py` (TrainState and its shardings), `common.py` (micro-batches, accumulation, the
non-finite guard, jit with shardings), `sft.py` and `dpo.py` (the steps), `optimizer.py`
(the optax chain of the `optim.*` config).
"""
