"""jaxft: supervised fine-tuning and DPO for Hugging Face decoder LLMs in JAX / Flax NNX."""

__version__ = "0.1.0"
