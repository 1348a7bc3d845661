"""Iterative DPO and rejection sampling from the model's own samples: pairs built from rewards."""
