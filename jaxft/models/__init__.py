"""Decoder models and Hugging Face checkpoint I/O."""

from jaxft.models.config import ModelConfig, config_from_hf, config_to_hf, read_hf_config
from jaxft.models.hf import abstract_model, create_model, hf_state_dict, load_hf, load_weights, save_hf
from jaxft.models.decoder import Decoder, init_cache
from jaxft.models.presets import PRESETS, get_preset

__all__ = [
    "Decoder", "ModelConfig", "PRESETS", "abstract_model", "config_from_hf", "config_to_hf",
    "create_model", "get_preset", "hf_state_dict", "init_cache", "load_hf", "load_weights",
    "read_hf_config", "save_hf",
]
