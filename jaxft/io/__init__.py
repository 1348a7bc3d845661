"""What a run writes and reads: Orbax checkpoints (`checkpoint`), Hugging Face exports
(`export`), metrics.jsonl / TensorBoard / plots (`metrics`)."""
