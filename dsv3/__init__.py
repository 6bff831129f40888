"""dsv3: DeepSeek-V3 in PyTorch — real MLA, grouped experts, the original RoPE, FP8 checkpoints.

The transformers names live at the top level, so the documentation's script runs with only its import line
changed: `from dsv3 import AutoModelForCausalLM, AutoTokenizer`.
"""

from dsv3 import kernels  # optional CPU kernels: importing is cheap, they are built on first use
from dsv3.auto import AutoConfig, AutoModel, AutoModelForCausalLM
from dsv3.cache import DynamicLatentCache, LatentCache, StaticLatentCache
from dsv3.config import ConfigError, DeepseekV3Config
from dsv3.generation.generate import GenerationConfig
from dsv3.generation.streamer import TextIteratorStreamer, TextStreamer
from dsv3.model.transformer import DeepseekV3ForCausalLM, DeepseekV3Model
from dsv3.tokenizer import AutoTokenizer

__all__ = [
    "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer", "ConfigError", "DeepseekV3Config",
    "DeepseekV3ForCausalLM", "DeepseekV3Model", "DynamicLatentCache", "GenerationConfig", "LatentCache",
    "StaticLatentCache", "TextIteratorStreamer", "TextStreamer", "kernels",
]
__version__ = "0.1.0"
