"""DeepSeek's block-wise FP8 weight format: the math, as pure functions (no files, no modules).

The published V3/R1 checkpoints store every large linear weight W [out, in] as

    weight            float8_e4m3fn  [out, in]
    weight_scale_inv  float32        [ceil(out / bo), ceil(in / bi)]      (bo, bi) = weight_block_size

and the real weight is W[r, c] = weight[r, c] * weight_scale_inv[r // bo, c // bi]. Despite its name,
`weight_scale_inv` is *multiplied* in: it is the inverse of the scale the quantiser divided by.
Shapes need not be multiples of the block: kv_a_proj_with_mqa has 576 = 4·128 + 64 rows, so its
last row block holds 64 rows and still has its own scale. (transformers 5.23 mis-handles exactly
this ragged edge, which is why this module is tested against a per-block loop.)

Dequantisation pads the weight up to whole blocks, views it as [R, bo, C, bi] and multiplies by the
scales broadcast as [R, 1, C, 1] — one vectorised op, no materialised scale map, no Python loop over
blocks — then crops the padding. It computes in fp32 and casts once at the end.

Stacked experts [E, rows, cols] (`dequantize_fp8_stacked`) carry one block grid per expert — or per
*part* of an expert: dsv3 stacks gate_proj and up_proj (each [I, D], each with its own scales) into
gate_up_proj [E, 2I, D], and when I is not a multiple of the block the two grids do not line up into
one, so the stacked scales are [E, 2·ceil(I/bo), C] and dequantisation views the rows as 2 parts.
Large stacks are processed in chunks of experts so the fp32 intermediate stays bounded.

Used at run time (`fp8_block_linear`): y = x·Wᵀ dequantises W one tile of output rows at a time (tiles
of whole row blocks), so the dequantised temporary is bounded whatever the matrix; a matrix that fits
one tile is computed exactly as dequantise-then-`F.linear`.

Quantisation (for test checkpoints and `dsv3 convert`) is the matching per-block absmax scheme:
scale_inv = amax(block) / max_fp8 (448 for e4m3fn), weight = round_fp8(W / scale_inv). An all-zero
block gets scale_inv = 1 so that nothing divides by zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsv3.errors import CheckpointError

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
CHUNK_ELEMENTS = 1 << 26     # fp32 scratch per chunk of stacked experts: 256 MiB
TILE_ELEMENTS = 1 << 24      # dequantised weight elements per tile of `fp8_block_linear` (64 MiB in fp32)


def fp8_scale_shape(shape: tuple[int, int] | torch.Size, block_size: tuple[int, int]) -> tuple[int, int]:
    """[ceil(out / bo), ceil(in / bi)]: one scale per block, partial edge blocks included."""
    return math.ceil(shape[0] / block_size[0]), math.ceil(shape[1] / block_size[1])


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
    scale = scale_inv.to(device=weight.device, dtype=torch.float32)
    # Pad to whole blocks (a no-op view when already aligned); fresh fp32 buffer, so in-place is safe.
    if out_f == R * bo and in_f == C * bi:
        w = weight.to(torch.float32, copy=True)
    else:
        w = torch.zeros(R * bo, C * bi, dtype=torch.float32, device=weight.device)
        w[:out_f, :in_f] = weight
    w.view(R, bo, C, bi).mul_(scale[:, None, :, None])       # [R, bo, C, bi] * [R, 1, C, 1]
    return w[:out_f, :in_f].to(dtype).contiguous()


def dequantize_fp8_stacked(weight: torch.Tensor, scale_inv: torch.Tensor,
                           block_size: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16,
                           parts: int = 1, name: str = "weight",
                           chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """weight [E, rows, cols] (fp8), scale_inv [E, parts·ceil(rows/parts/bo), ceil(cols/bi)] -> [E, rows, cols].

    Each expert's rows are `parts` equal groups with their own block grids (2 for a stacked gate_up_proj
    read from per-expert gate_proj/up_proj, 1 for down_proj or a fused checkpoint tensor). Same numerics
    as `dequantize_fp8_blocks` (fp32 product, one rounding to `dtype`), so both give identical bits.
    `chunk_elements` bounds the fp32 scratch (experts are processed in chunks of about that many values).
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
    w = weight.reshape(e * parts, o, cols)                                     # [E*parts, o, cols]
    s = scale_inv.reshape(e * parts, R, C).to(device=weight.device, dtype=torch.float32)
    out = torch.empty(e * parts, o, cols, dtype=dtype, device=weight.device)
    step = max(1, chunk_elements // max(1, R * bo * C * bi))
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


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                     block_size: tuple[int, int] = (128, 128), bias: torch.Tensor | None = None,
                     tile_elements: int = TILE_ELEMENTS) -> torch.Tensor:
    """y = x·dequant(weight)ᵀ + bias for x [..., in], weight fp8 [out, in] -> [..., out] in x.dtype.

    The weight is dequantised (to x.dtype, fp32 product, one rounding) one tile of whole row blocks at a time,
    each tile holding at most about `tile_elements` values, so the temporary is bounded. A weight within one
    tile runs as one `F.linear` — bit for bit dequantise-on-load.
    """
    bo, bi = _check_block_size(block_size)
    out_f, in_f = weight.shape
    rows = max(bo, tile_elements // max(1, in_f) // bo * bo)      # rows per tile, whole row blocks
    if rows >= out_f:
        return F.linear(x, dequantize_fp8_blocks(weight, scale_inv, (bo, bi), x.dtype), bias)
    y = x.new_empty(*x.shape[:-1], out_f)                            # [..., out]
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        w = dequantize_fp8_blocks(weight[r0:r1], scale_inv[r0 // bo: -(-r1 // bo)], (bo, bi), x.dtype)
        y[..., r0:r1] = F.linear(x, w, None if bias is None else bias[r0:r1])
    return y


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
