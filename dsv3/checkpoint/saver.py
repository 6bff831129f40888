"""`save_pretrained`: config.json plus safetensors in the layout transformers reads (per-expert keys),
sharded above `max_shard_size`, every file written under a temporary name and renamed when complete."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dsv3.checkpoint.keys import split_stacked, to_checkpoint_name
from dsv3.checkpoint.safetensors_io import save_safetensors_sharded

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_size(size: int | str) -> int:
    """5_000_000, "5GB", "500MiB" -> bytes."""
    if isinstance(size, int):
        return size
    m = _SIZE_RE.match(size)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes as an int or a string like '5GB' or '500MB'")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def export_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under checkpoint names: experts split per expert, tied copies skipped."""
    config = model.config  # type: ignore[attr-defined]
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue   # transformers re-ties it from model.embed_tokens.weight
        yield from split_stacked(to_checkpoint_name(name, config.num_hidden_layers), tensor.detach())


def save_pretrained(model: nn.Module, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                    progress: bool = False) -> list[str]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = save_safetensors_sharded(export_tensors(model), directory, max_shard_bytes=parse_size(max_shard_size),
                                     progress=progress)
    config = model.config  # type: ignore[attr-defined]
    dtype = next(p.dtype for n, p in model.named_parameters() if not n.endswith("gate.weight"))
    config.replace(torch_dtype=_DTYPE_NAMES.get(dtype, str(dtype)), quantization_config=None).save_pretrained(
        directory)
    return files
