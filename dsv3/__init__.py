"""dsv3: DeepSeek-V3 in PyTorch — real MLA, grouped experts, the original RoPE, FP8 checkpoints."""

from dsv3 import kernels  # optional CPU kernels: importing is cheap, they are built on first use
from dsv3.auto import AutoConfig, AutoModel, AutoModelForCausalLM
from dsv3.cache import DynamicLatentCache, LatentCache, StaticLatentCache
from dsv3.config import ConfigError, DeepseekV3Config
from dsv3.model.transformer import DeepseekV3ForCausalLM, DeepseekV3Model

__all__ = [
    "AutoConfig", "AutoModel", "AutoModelForCausalLM", "ConfigError", "DeepseekV3Config",
    "DeepseekV3ForCausalLM", "DeepseekV3Model", "DynamicLatentCache", "LatentCache", "StaticLatentCache", "kernels",
]
__version__ = "0.1.0"
