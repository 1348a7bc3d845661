"""Sampling from a model: batched KV-cache generation (`generate`)."""
