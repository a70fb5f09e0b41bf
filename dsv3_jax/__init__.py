"""dsv3-jax: DeepSeek-V3 in JAX/Flax — model, training, sharding, FP8, checkpoints and serving."""

from dsv3_jax.config import Config, ConfigError, ModelConfig, load_config, model_config_from_hf
from dsv3_jax.model import ModelOutput, Transformer, init_cache, init_variables

__all__ = ["Config", "ConfigError", "ModelConfig", "ModelOutput", "Transformer", "init_cache", "init_variables",
           "load_config", "model_config_from_hf"]
