"""Evaluation: pure metrics (`metrics`), greedy answers scored (`generation`), likelihood
metrics by the train steps' own functions (`likelihood`), the passes over eval batches they
share with training (`passes`), and `jaxft eval` on a model folder (`folder`)."""
