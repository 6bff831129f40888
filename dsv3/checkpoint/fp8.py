"""DeepSeek's block-wise FP8 format at the checkpoint boundary: `quantization_config` and tensor-name pairing.

The math (block scale shapes, dequantisation, quantisation, the tiled FP8 linear) lives in `dsv3.quant.fp8`
and is re-exported here for the loader, `dsv3 convert` and older imports.

Every quantised `X.weight` (float8, [out, in]) comes with `X.weight_scale_inv` (fp32,
[ceil(out / bo), ceil(in / bi)]); the real weight is weight · scale_inv per block.

`quantization_config` is parsed into a small frozen `Fp8Spec`; anything other than weight-only
block FP8 fails loudly rather than loading garbage. e5m2 is accepted as well: dequantising it is the
same multiply, only the stored dtype differs.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dsv3.checkpoint.errors import CheckpointError
from dsv3.quant.fp8 import (  # noqa: F401 - re-exported
    FP8_DTYPES,
    dequantize_fp8_blocks,
    dequantize_fp8_stacked,
    fp8_block_linear,
    fp8_scale_shape,
    quantize_fp8_blocks,
)

SCALE_INV_SUFFIX = ".weight_scale_inv"
_FMT_ALIASES = {"e4m3": "e4m3", "e4m3fn": "e4m3", "float8_e4m3fn": "e4m3",
                "e5m2": "e5m2", "float8_e5m2": "e5m2"}


@dataclass(frozen=True)
class Fp8Spec:
    """What `quantization_config` says about the stored weights."""

    fmt: str = "e4m3"                              # "e4m3" (float8_e4m3fn) or "e5m2"
    block_size: tuple[int, int] = (128, 128)       # (rows, cols) per scale
    activation_scheme: str = "dynamic"
    modules_to_not_convert: tuple[str, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        return FP8_DTYPES[self.fmt]


def parse_quantization_config(cfg: dict[str, Any] | None) -> Fp8Spec | None:
    """`config.json`'s `quantization_config` -> `Fp8Spec`, or None for an unquantised checkpoint.

    Missing `fmt`, `activation_scheme` and `weight_block_size` take DeepSeek's values (e4m3, dynamic,
    [128, 128]), as transformers' fine-grained FP8 config does.
    """
    if cfg is None or (isinstance(cfg, dict) and not cfg):
        return None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config.json: quantization_config must be an object, got {cfg!r}")
    method = cfg.get("quant_method")
    if not isinstance(method, str) or method.lower() != "fp8":
        raise CheckpointError(
            f"config.json: quantization_config.quant_method={method!r} is not supported; dsv3 reads "
            "DeepSeek's block-FP8 checkpoints (quant_method 'fp8') and unquantised bf16/fp16/fp32 ones. "
            "Dequantise the checkpoint to bf16 first, or remove quantization_config if the weights are not "
            "quantised.")
    fmt_raw = cfg.get("fmt", "e4m3")
    fmt = _FMT_ALIASES.get(fmt_raw.lower()) if isinstance(fmt_raw, str) else None
    if fmt is None:
        raise CheckpointError(f"config.json: quantization_config.fmt={fmt_raw!r} is not supported; "
                              "expected 'e4m3' (DeepSeek's published format) or 'e5m2'")
    scheme = cfg.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise CheckpointError(
            f"config.json: quantization_config.activation_scheme={scheme!r} is not supported; only 'dynamic' "
            "(no stored activation scales) is. dsv3 dequantises weights at load time and never reads "
            "static activation scales.")
    block = cfg.get("weight_block_size", [128, 128])
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(
            f"config.json: quantization_config.weight_block_size={block!r} is not supported; expected two "
            "positive integers such as [128, 128] (per-tensor FP8 scales are not supported)")
    skip = cfg.get("modules_to_not_convert") or ()
    skip = (skip,) if isinstance(skip, str) else skip
    return Fp8Spec(fmt=fmt, block_size=(block[0], block[1]), activation_scheme=scheme,
                   modules_to_not_convert=tuple(skip))


def scale_inv_key(weight_key: str) -> str:
    """`X.weight` -> `X.weight_scale_inv`."""
    if not weight_key.endswith(".weight"):
        raise ValueError(f"{weight_key!r} is not a weight key (expected a name ending in '.weight')")
    return weight_key + "_scale_inv"


def is_scale_inv_key(key: str) -> bool:
    return key.endswith(SCALE_INV_SUFFIX)


def is_quantized_weight_key(key: str, keys: Container[str]) -> bool:
    """True when `key` is an `X.weight` whose `X.weight_scale_inv` is among `keys` (pass a set)."""
    return key.endswith(".weight") and scale_inv_key(key) in keys


def fp8_weight_pairs(keys: Iterable[str]) -> dict[str, str]:
    """{`X.weight`: `X.weight_scale_inv`} for every quantised weight; a scale without its weight fails."""
    key_set = set(keys)
    pairs: dict[str, str] = {}
    orphans = []
    for key in sorted(key_set):
        if is_scale_inv_key(key):
            weight = key[: -len("_scale_inv")]
            if weight in key_set:
                pairs[weight] = key
            else:
                orphans.append(key)
    if orphans:
        raise CheckpointError(f"{len(orphans)} FP8 scale tensors have no matching weight: {orphans[:8]}; "
                              "the checkpoint is incomplete (re-download the missing shard)")
    return pairs
