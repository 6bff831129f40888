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

import math
from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dsv3.checkpoint.errors import CheckpointError
from dsv3.quant.fp8 import (  # noqa: F401 - re-exported
    FP8_DTYPES,
    _check_block_size,
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


def scale_inv_name(weight_name: str) -> str:
    """The scale's name for messages: `X.weight` -> `X.weight_scale_inv`, anything else + ' (weight_scale_inv)'."""
    return weight_name + "_scale_inv" if weight_name.endswith(".weight") else f"{weight_name} (weight_scale_inv)"


def check_scales_finite(scale_inv: torch.Tensor, name: str) -> None:
    """A weight_scale_inv holding inf or NaN would silently turn whole 128x128 blocks into inf/NaN weights
    (and every activation they touch): refuse it, naming the tensor and the first bad block. Checked once,
    where scales enter from a file (loading, convert, slices), never per call at run time."""
    bad = ~torch.isfinite(scale_inv)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = scale_inv[where].item()
        raise CheckpointError(
            f"{name}: {int(bad.sum())} of {scale_inv.numel()} FP8 block scales are not finite (e.g. {value} at "
            f"block {list(where)}); the checkpoint is corrupt or was quantised from a weight with inf/NaN — "
            "re-download the shard holding this tensor.")


def dequantize_checked(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int],
                       dtype: torch.dtype, name: str) -> torch.Tensor:
    """Dequantise a weight read from a file ([out, in], or a fused [E, rows, cols] stack with one block grid
    per expert) after checking its scales are finite."""
    check_scales_finite(scale_inv, scale_inv_name(name))
    if weight.dim() == 2:
        return dequantize_fp8_blocks(weight, scale_inv, block_size, dtype, name=name)
    return dequantize_fp8_stacked(weight, scale_inv, block_size, dtype, 1, name=name)


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


def read_fp8_slice(reader: Any, weight_key: str, rows: tuple[int, int] | None = None,
                   cols: tuple[int, int] | None = None, block_size: tuple[int, int] = (128, 128)
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [r0, r1) / columns [c0, c1) of an FP8 weight [out, in] (or [E, out, in]) and the block rows /
    columns of its `weight_scale_inv` that cover them, each read without the rest of the tensor
    (`CheckpointReader.read_slice`): what one tensor-parallel rank loads. The range must start on a block
    boundary and end on one (or at the edge), so the slice is itself a valid block-FP8 weight:
    dequantize_fp8_blocks(*read_fp8_slice(...)) == dequantize_fp8_blocks(whole)[r0:r1, c0:c1]."""
    bo, bi = _check_block_size(block_size)
    shape = tuple(reader.shape(weight_key))
    out_f, in_f = shape[-2:]
    spans = []
    for name, bounds, size, b in (("rows", rows, out_f, bo), ("cols", cols, in_f, bi)):
        lo, hi = (0, size) if bounds is None else bounds
        if lo % b or (hi % b and hi != size):
            raise ValueError(f"read_fp8_slice({weight_key!r}): {name}=[{lo}, {hi}) must start and end on a multiple "
                             f"of the block size {b} (or end at {size}); a slice through a block would need "
                             "a scale the checkpoint does not have")
        spans.append(((lo, hi), (lo // b, math.ceil(hi / b))))
    weight = reader.read_slice(weight_key, spans[0][0], spans[1][0])
    scale = reader.read_slice(scale_inv_key(weight_key), spans[0][1], spans[1][1])
    check_scales_finite(scale, scale_inv_key(weight_key))
    return weight, scale
