"""`AutoConfig` / `AutoModel` / `AutoModelForCausalLM` entry points with the transformers names."""

from __future__ import annotations

import os
from typing import Any

from dsv3.config import DeepseekV3Config
from dsv3.modeling import DeepseekV3ForCausalLM, DeepseekV3Model


class AutoConfig:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, **overrides: Any) -> DeepseekV3Config:
        return DeepseekV3Config.from_pretrained(path, **overrides)


class AutoModel:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> DeepseekV3Model:
        return DeepseekV3Model.from_pretrained(path, **kwargs)


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> DeepseekV3ForCausalLM:
        return DeepseekV3ForCausalLM.from_pretrained(path, **kwargs)

    @staticmethod
    def from_config(config: DeepseekV3Config) -> DeepseekV3ForCausalLM:
        return DeepseekV3ForCausalLM(config)
