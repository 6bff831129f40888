"""The public model classes: dsv3.model's nn.Modules with transformers' `from_pretrained`, `save_pretrained`
and `generate` attached.

This is the one place where the model meets the layers built on it (checkpoint I/O, generation), so that
nothing under dsv3/model imports upward:

    config <- model <- checkpoint, generation <- modeling (here) <- training, cli

`DeepseekV3Model` / `DeepseekV3ForCausalLM` here subclass the classes of dsv3.model.transformer without
changing their modules, parameters or forward; `dsv3.DeepseekV3ForCausalLM` is this one.
"""

from __future__ import annotations

import os
from typing import Any

from dsv3.checkpoint.loader import load_pretrained
from dsv3.checkpoint.saver import save_pretrained
from dsv3.config import DeepseekV3Config
from dsv3.generation.generate import GenerationConfig, generate
from dsv3.model import transformer


class PreTrainedModel:
    """`from_pretrained` / `save_pretrained` for the model classes below."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a checkpoint directory (see dsv3.checkpoint.loader.load_pretrained for the keywords); a
        `generation_config.json` beside it becomes `model.generation_config`."""
        model = load_pretrained(cls, path, **kwargs)
        if hasattr(model, "generation_config"):
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """config.json, generation_config.json and safetensors shards (see dsv3.checkpoint.saver).
        A sharded model (from_pretrained under torchrun) is refused: each rank holds only its part."""
        parallel = getattr(self, "parallel", None)
        if parallel is not None and parallel.is_parallel:
            raise ValueError(f"save_pretrained: this model is sharded (rank {parallel.rank} of "
                             f"{parallel.world_size}) and holds only its part of the weights; load the checkpoint "
                             "in one process (no torchrun, parallel=None) to save it, or copy the checkpoint "
                             "directory as it is")
        save_pretrained(self, directory, **kwargs)


class DeepseekV3Model(PreTrainedModel, transformer.DeepseekV3Model):
    pass


class DeepseekV3ForCausalLM(PreTrainedModel, transformer.DeepseekV3ForCausalLM):
    def __init__(self, config: DeepseekV3Config, mtp: bool | None = None) -> None:
        super().__init__(config, mtp)
        self.generation_config: GenerationConfig | None = None   # from generation_config.json, if any

    def generate(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
        """transformers-style generation; see dsv3.generation.generate.generate for the arguments."""
        return generate(self, input_ids, attention_mask, **kwargs)
