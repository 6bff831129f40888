"""DeepSeek's block-wise FP8 weight format, as pure functions.

The published V3/R1 checkpoints store every large linear weight W [out, in] as

    weight            float8_e4m3fn  [out, in]
    weight_scale_inv  float32        [ceil(out / bo), ceil(in / bi)]      (bo, bi) = weight_block_size

and the real weight is W[r, c] = weight[r, c] * weight_scale_inv[r // bo, c // bi]. Despite its name,
`weight_scale_inv` is *multiplied* in: it is the inverse of the scale the quantiser divided by.
Shapes need not be multiples of the block: kv_a_proj_with_mqa has 576 = 4·128 + 64 rows, so its
last row block holds 64 rows and still has its own scale. (transformers 5.23 mis-handles exactly
this ragged edge, which is why this module exists and is tested against a per-block loop.)

Dequantisation pads the weight up to whole blocks, views it as [R, bo, C, bi] and multiplies by the
scales broadcast as [R, 1, C, 1] — one vectorised op, no materialised scale map, no Python loop over
blocks — then crops the padding. It computes in fp32 and casts once at the end.

Stacked experts [E, rows, cols] (`dequantize_fp8_stacked`) carry one block grid per expert — or per
*part* of an expert: dsv3 stacks gate_proj and up_proj (each [I, D], each with its own scales) into
gate_up_proj [E, 2I, D], and when I is not a multiple of the block the two grids do not line up into
one, so the stacked scales are [E, 2·ceil(I/bo), C] and dequantisation views the rows as 2 parts.
Large stacks are processed in chunks of experts so the fp32 intermediate stays bounded.

Quantisation (for test checkpoints and `dsv3 convert`) is the matching per-block absmax scheme:
scale_inv = amax(block) / max_fp8 (448 for e4m3fn), weight = round_fp8(W / scale_inv). An all-zero
block gets scale_inv = 1 so that nothing divides by zero.

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

SCALE_INV_SUFFIX = ".weight_scale_inv"
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
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


def fp8_scale_shape(shape: tuple[int, int] | torch.Size, block_size: tuple[int, int]) -> tuple[int, int]:
    """[ceil(out / bo), ceil(in / bi)]: one scale per block, partial edge blocks included."""
    return math.ceil(shape[0] / block_size[0]), math.ceil(shape[1] / block_size[1])


def check_scales_finite(scale_inv: torch.Tensor, name: str) -> None:
    """A weight_scale_inv holding inf or NaN would silently turn whole 128x128 blocks into inf/NaN weights
    (and every activation they touch): refuse it, naming the tensor and the first bad block."""
    bad = ~torch.isfinite(scale_inv)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = scale_inv[where].item()
        raise CheckpointError(
            f"{name}: {int(bad.sum())} of {scale_inv.numel()} FP8 block scales are not finite (e.g. {value} at "
            f"block {list(where)}); the checkpoint is corrupt or was quantised from a weight with inf/NaN — "
            "re-download the shard holding this tensor.")


def _check_block_size(block_size: tuple[int, int]) -> tuple[int, int]:
    if len(block_size) != 2 or not all(isinstance(b, int) and b > 0 for b in block_size):
        raise ValueError(f"block_size={block_size!r}: expected two positive integers such as (128, 128)")
    return int(block_size[0]), int(block_size[1])


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor,
                          block_size: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16,
                          name: str = "weight") -> torch.Tensor:
    """weight [out, in] (fp8) * scale_inv [ceil(out/bo), ceil(in/bi)] per block -> [out, in] in `dtype`."""
    bo, bi = _check_block_size(block_size)
    if weight.dim() != 2:
        raise CheckpointError(f"{name}: FP8 block dequantisation needs a 2-D weight, "
                              f"got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    R, C = fp8_scale_shape(weight.shape, (bo, bi))
    if tuple(scale_inv.shape) != (R, C):
        raise CheckpointError(
            f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)} but weight {tuple(weight.shape)} "
            f"with weight_block_size [{bo}, {bi}] needs [ceil({out_f}/{bo}), ceil({in_f}/{bi})] = [{R}, {C}]."
            " "
            "Check quantization_config.weight_block_size in config.json, or re-download the shard holding "
            "this tensor.")
    check_scales_finite(scale_inv, scale_inv_name(name))
    scale = scale_inv.to(device=weight.device, dtype=torch.float32)
    # Pad to whole blocks (a no-op view when already aligned); fresh fp32 buffer, so in-place is safe.
    if out_f == R * bo and in_f == C * bi:
        w = weight.to(torch.float32, copy=True)
    else:
        w = torch.zeros(R * bo, C * bi, dtype=torch.float32, device=weight.device)
        w[:out_f, :in_f] = weight
    w.view(R, bo, C, bi).mul_(scale[:, None, :, None])       # [R, bo, C, bi] * [R, 1, C, 1]
    return w[:out_f, :in_f].to(dtype).contiguous()


_CHUNK_ELEMENTS = 1 << 26          # fp32 scratch per chunk of stacked experts: 256 MiB


def dequantize_fp8_stacked(weight: torch.Tensor, scale_inv: torch.Tensor,
                           block_size: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16,
                           parts: int = 1, name: str = "weight") -> torch.Tensor:
    """weight [E, rows, cols] (fp8), scale_inv [E, parts·ceil(rows/parts/bo), ceil(cols/bi)] -> [E, rows, cols].

    Each expert's rows are `parts` equal groups with their own block grids (2 for a stacked gate_up_proj
    read from per-expert gate_proj/up_proj, 1 for down_proj or a fused checkpoint tensor). Same numerics
    as `dequantize_fp8_blocks` (fp32 product, one rounding to `dtype`), so both give identical bits.
    """
    bo, bi = _check_block_size(block_size)
    if weight.dim() != 3 or parts < 1 or weight.shape[1] % parts:
        raise CheckpointError(f"{name}: stacked FP8 dequantisation needs a 3-D weight [E, rows, cols] whose rows "
                              f"split into {parts} equal parts, got shape {tuple(weight.shape)}")
    e, rows, cols = weight.shape
    o = rows // parts
    R, C = fp8_scale_shape((o, cols), (bo, bi))
    if tuple(scale_inv.shape) != (e, parts * R, C):
        raise CheckpointError(
            f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)} but the stacked weight "
            f"{tuple(weight.shape)} ({parts} part(s) of {o} rows each) with weight_block_size [{bo}, {bi}] needs "
            f"[{e}, {parts}*ceil({o}/{bo}), ceil({cols}/{bi})] = [{e}, {parts * R}, {C}]. Check "
            "quantization_config.weight_block_size in config.json.")
    check_scales_finite(scale_inv, scale_inv_name(name))
    w = weight.reshape(e * parts, o, cols)                                     # [E*parts, o, cols]
    s = scale_inv.reshape(e * parts, R, C).to(device=weight.device, dtype=torch.float32)
    out = torch.empty(e * parts, o, cols, dtype=dtype, device=weight.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, R * bo * C * bi))
    aligned = o == R * bo and cols == C * bi
    for b in range(0, e * parts, step):
        wb, sb = w[b: b + step], s[b: b + step]
        if aligned:
            x = wb.to(torch.float32, copy=True)
        else:
            x = torch.zeros(wb.shape[0], R * bo, C * bi, dtype=torch.float32, device=weight.device)
            x[:, :o, :cols] = wb
        x.view(-1, R, bo, C, bi).mul_(sb[:, :, None, :, None])                # [B, R, bo, C, bi] * [B, R, 1, C, 1]
        out[b: b + step] = x[:, :o, :cols]
    return out.view(e, rows, cols)


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


def quantize_fp8_blocks(weight: torch.Tensor, block_size: tuple[int, int] = (128, 128),
                        dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (weight [out, in] in `dtype`, scale_inv fp32 [ceil(out/bo), ceil(in/bi)]), by absmax."""
    bo, bi = _check_block_size(block_size)
    if dtype not in FP8_DTYPES.values():
        raise ValueError(f"dtype={dtype}: expected torch.float8_e4m3fn or torch.float8_e5m2")
    if weight.dim() != 2:
        raise ValueError(f"quantize_fp8_blocks needs a 2-D weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    R, C = fp8_scale_shape(weight.shape, (bo, bi))
    fp8_max = torch.finfo(dtype).max
    w = torch.zeros(R * bo, C * bi, dtype=torch.float32, device=weight.device)
    w[:out_f, :in_f] = weight                                 # zero padding never raises a block's amax
    blocks = w.view(R, bo, C, bi)                             # [R, bo, C, bi]
    amax = blocks.abs().amax(dim=(1, 3))                      # [R, C]
    if not torch.isfinite(amax).all():
        raise ValueError("quantize_fp8_blocks: the weight contains inf or NaN; it cannot be scaled into FP8")
    scale_inv = torch.where(amax > 0, amax / fp8_max, torch.ones_like(amax))
    blocks.div_(scale_inv[:, None, :, None]).clamp_(-fp8_max, fp8_max)
    return w[:out_f, :in_f].to(dtype).contiguous(), scale_inv
