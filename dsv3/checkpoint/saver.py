"""`save_pretrained`: config.json plus safetensors in the layout transformers reads (per-expert keys),
sharded above `max_shard_size`, every file written under a temporary name and renamed when complete.

The weights are written first (save_safetensors_sharded commits them all at once), then
generation_config.json when the model carries one, then config.json — last, so a directory with a
config.json is a complete save. A model holding FP8 weights (from_pretrained(..., fp8="keep")) is saved
as it is held: FP8 tensors with their `weight_scale_inv`, and its quantization_config kept. A model holding
int8/int4 weights (from_pretrained(..., quantization=...)) is saved in compressed-tensors' pack-quantized layout
(dsv3.checkpoint.quantized), which from_pretrained loads back as the same tensors; each shard's packed tensors
are made while it is written (peak: the model plus one shard).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dsv3.checkpoint import quantized
from dsv3.checkpoint.atomic import atomic_write_text
from dsv3.checkpoint.fp8 import FP8_DTYPES
from dsv3.checkpoint.keys import split_stacked, to_checkpoint_name
from dsv3.checkpoint.safetensors_io import save_safetensors_sharded
from dsv3.model.moe import RoutedExperts

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


def export_tensors(model: nn.Module, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under checkpoint names: experts split per expert, tied copies and `skip` skipped."""
    config = model.config  # type: ignore[attr-defined]
    # FP8 expert stacks whose scale grid spans gate and up rows together (read from a fused checkpoint)
    # cannot be split per expert; they are written fused, which dsv3 reads back.
    fused = {f"{n}." for n, m in model.named_modules() if isinstance(m, RoutedExperts) and m.gate_up_parts == 1}
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue   # transformers re-ties it from model.embed_tokens.weight
        ckpt_name = to_checkpoint_name(name, config.num_hidden_layers)
        if any(name.startswith(prefix) for prefix in fused):
            yield ckpt_name, tensor.detach()
        else:
            yield from split_stacked(ckpt_name, tensor.detach())


def _generation_config_dict(model: nn.Module) -> dict | None:
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return None
    data = gen.to_dict() if hasattr(gen, "to_dict") else gen
    if not isinstance(data, dict):
        raise TypeError(f"model.generation_config is a {type(gen).__name__}; expected a dict or an object with "
                        "to_dict()")
    return data


def save_pretrained(model: nn.Module, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                    progress: bool = False) -> list[str]:
    """Write `model` as a HF checkpoint directory; returns the safetensors files written."""
    holds_int = bool(quantized.int_modules(model))
    if holds_int:
        quantized.check_savable(model)              # before anything is written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = itertools.chain(export_tensors(model, quantized.held_names(model)), quantized.export_quantized(model))
    files = save_safetensors_sharded(tensors, directory, max_shard_bytes=parse_size(max_shard_size), progress=progress)
    generation = _generation_config_dict(model)
    if generation is not None:
        atomic_write_text(directory / "generation_config.json", json.dumps(generation, indent=2, sort_keys=True) + "\n")
    config = model.config  # type: ignore[attr-defined]
    dtypes = [p.dtype for n, p in model.named_parameters() if not n.endswith("gate.weight") and p.is_floating_point()]
    holds_fp8 = any(d in FP8_DTYPES.values() for d in dtypes)
    dtype = next(d for d in dtypes if d not in FP8_DTYPES.values())
    qcfg = quantized.config_of(model) if holds_int else config.quantization_config if holds_fp8 else None
    config.replace(torch_dtype=_DTYPE_NAMES.get(dtype, str(dtype)), quantization_config=qcfg).save_pretrained(directory)
    return files
