"""Integer weight quantisation, the math as pure functions: int8 per output channel, int4 per group of inputs.

    int8   W[r, c] ≈ q[r, c] · s[r]                       q int8 in [-127, 127], s = amax(|W[r, :]|) / 127
           y = x·Wᵀ = (x·qᵀ)·s                            one fp32 scale per output channel (row)
    int4   W[r, c] ≈ (q[r, c] - 8) · s[r, g] + z[r, g]    g = c // G, q in [0, 15] (asymmetric: min..max of
                                                          the group), two values per byte
           (the convention of `aten._weight_int4pack_mm_for_cpu`: its scales_and_zeros [K/G, N, 2] are (s, z))

int4 scale search (`search=True`, calibration-free): round-to-nearest over [min, max] spends levels on
outliers; per group we also try the range shrunk about its middle by α in SEARCH_SHRINK (clipping the
extremes) and keep the one with the least squared error of the group — the idea of llama.cpp's make_qkx
and HQQ's range search, without data. On the shipped model it lowers the weights' squared error but not the
held-out perplexity (bf16 68.06; int4 round-to-nearest 68.17, with the search 68.28), so formats default to
round-to-nearest and keep the search as an option (`Int4Grouped(search=True)`).

Two packings of the int4 codes, both [rows, cols/2] uint8:
    "rows"  portable: byte j of a row holds columns 2j (low nibble) and 2j+1 (high nibble)
    "cpu"   what `aten._convert_weight_to_int4pack_for_cpu` writes on an AVX-512 CPU for rows % 64 == 0:
            per block of 64 rows, [cols, 32] bytes, byte (c, i) = row i (low nibble) and row i+32 (high) of
            column c. `cpu_layout_supported()` checks that this is what the op writes on this machine.

Quantisation works on chunks of rows (CHUNK_ELEMENTS values at a time) so that its fp32 temporaries stay
bounded whatever the tensor — a V3 expert stack is 7.5 G values.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

INT8_MAX = 127
INT4_MID = 8                                  # codes 0..15, centred on 8
SEARCH_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
CHUNK_ELEMENTS = 1 << 22                      # values quantised per chunk (fp32 temporaries: ~16 MiB each)
INT4_GROUP_SIZES = (32, 64, 128, 256)         # what the int4 pack op accepts
CPU_BLOCK_ROWS = 64


def _chunk(cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(cols, 1))


def _row_chunks(rows: int, cols: int) -> range:
    return range(0, rows, _chunk(cols))


# -- int8 per output channel --------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., out, in] -> (q int8 [..., out, in], scale fp32 [..., out]); symmetric, per row."""
    flat = w.reshape(-1, w.shape[-1])                                      # [R, in]
    q = torch.empty(flat.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(flat.shape[0], dtype=torch.float32, device=w.device)
    for r0 in _row_chunks(*flat.shape):
        part = flat[r0: r0 + _chunk(flat.shape[1])].float()                  # [R', in]
        s = part.abs().amax(-1) / INT8_MAX
        s = torch.where(s > 0, s, torch.ones_like(s))                      # an all-zero row: any scale
        q[r0: r0 + part.shape[0]] = torch.round(part / s[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        scale[r0: r0 + part.shape[0]] = s
    return q.view(w.shape), scale.view(w.shape[:-1])


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., out, in] int8, scale [..., out] -> W [..., out, in] in `dtype` (fp32 math, one rounding)."""
    return (q.float() * scale.float()[..., None]).to(dtype)


# -- int4 per group of input values -------------------------------------------------------------------------
def int4_group_size(cols: int, preferred: int) -> int | None:
    """The group size for a matrix with `cols` inputs: `preferred` when it divides cols, else the largest
    smaller size of INT4_GROUP_SIZES that does; None when none does (the caller keeps such a matrix in int8)."""
    for g in sorted((g for g in INT4_GROUP_SIZES if g <= preferred), reverse=True):
        if cols % g == 0:
            return g
    return None


def _int4_codes(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """w [R, n, G] fp32, lo/hi [R, n] -> (codes [R, n, G] fp32 0..15, scale, zero, squared error [R, n])."""
    span = hi - lo
    scale = torch.where(span > 0, span / 15, torch.ones_like(span))
    codes = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15)
    zero = lo + INT4_MID * scale
    err = ((codes - INT4_MID) * scale[..., None] + zero[..., None] - w).square_().sum(-1)
    return codes, scale, zero, err


def quantize_int4(w: torch.Tensor, group_size: int, search: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [..., out, in] -> (codes uint8 [..., out, in] in 0..15, scale fp32 [..., out, in/G], zero fp32
    [..., out, in/G]) with W ≈ (codes - 8)·scale + zero; `search` tries clipped ranges per group."""
    cols = w.shape[-1]
    if cols % group_size:
        raise ValueError(f"quantize_int4: {cols} input values are not a multiple of group_size={group_size}")
    flat = w.reshape(-1, cols)                                             # [R, in]
    n = cols // group_size
    codes = torch.empty(flat.shape, dtype=torch.uint8, device=w.device)
    scale = torch.empty(flat.shape[0], n, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    for r0 in _row_chunks(*flat.shape):
        part = flat[r0: r0 + _chunk(cols)].float().view(-1, n, group_size)   # [R', n, G]
        lo, hi = part.amin(-1), part.amax(-1)                              # [R', n]
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        best = _int4_codes(part, lo, hi)
        for alpha in SEARCH_SHRINK[1:] if search else ():
            cand = _int4_codes(part, mid - alpha * half, mid + alpha * half)
            better = cand[3] < best[3]                                     # [R', n]
            best = tuple(torch.where(better[..., None] if b.dim() == 3 else better, c, b)
                         for c, b in zip(cand, best, strict=True))
        rows = part.shape[0]
        codes[r0: r0 + rows] = best[0].view(rows, cols).to(torch.uint8)
        scale[r0: r0 + rows], zero[r0: r0 + rows] = best[1], best[2]
    return codes.view(w.shape), scale.view(*w.shape[:-1], n), zero.view(*w.shape[:-1], n)


def quantize_int4_integer_zero(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [..., out, in] -> (codes uint8 [..., out, in] in 0..15, scale fp32 [..., out, in/G], zero fp32
    [..., out, in/G]), the result `quantize_int4` returns, but on the grid of an integer zero point — the
    asymmetric int4 that compressed-tensors stores (and vLLM reads): per group the range [min(lo, 0),
    max(hi, 0)], scale s = span / 15 rounded to bf16, zero point zp = round(-lo / s) in 0..15, codes
    round(W / s) + zp, so that W ≈ (codes - zp)·s = (codes - 8)·s + (8 - zp)·s: zero = (8 - zp)·s. The scale
    is bf16 from the start, so (s, zp) on disk give back the bf16 (scale, zero) held in memory exactly
    (dsv3.checkpoint.quantized)."""
    cols = w.shape[-1]
    if cols % group_size:
        raise ValueError(f"quantize_int4_integer_zero: {cols} input values are not a multiple of "
                         f"group_size={group_size}")
    flat = w.reshape(-1, cols)                                             # [R, in]
    n = cols // group_size
    codes = torch.empty(flat.shape, dtype=torch.uint8, device=w.device)
    scale = torch.empty(flat.shape[0], n, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    for r0 in _row_chunks(*flat.shape):
        part = flat[r0: r0 + _chunk(cols)].float().view(-1, n, group_size)   # [R', n, G]
        lo, hi = part.amin(-1).clamp(max=0), part.amax(-1).clamp(min=0)    # [R', n], the range holds 0
        s = ((hi - lo) / 15).to(torch.bfloat16).float()
        s = torch.where(s > 0, s, torch.ones_like(s))                      # an all-zero group: any scale
        zp = torch.round(-lo / s).clamp_(0, 15)
        q = (torch.round(part / s[..., None]) + zp[..., None]).clamp_(0, 15)
        rows = part.shape[0]
        codes[r0: r0 + rows] = q.view(rows, cols).to(torch.uint8)
        scale[r0: r0 + rows], zero[r0: r0 + rows] = s, (INT4_MID - zp) * s
    return codes.view(w.shape), scale.view(*w.shape[:-1], n), zero.view(*w.shape[:-1], n)


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """codes [..., out, in] (0..15), scale/zero [..., out, in/G] -> W [..., out, in] in `dtype` (fp32 math)."""
    *lead, rows, cols = codes.shape
    n = scale.shape[-1]
    grouped = (codes.float() - INT4_MID).view(*lead, rows, n, cols // n)
    return (grouped * scale.float()[..., None] + zero.float()[..., None]).view(codes.shape).to(dtype)


def quantize_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., K] -> x̂ [..., K] fp32: x rounded to int8 per (row, group of `group_size` values), symmetric,
    scale amax/127 — what the int4 CPU kernels multiply (dsv3/kernels/cpu_int.cpp) instead of x."""
    *lead, cols = x.shape
    xg = x.float().reshape(*lead, cols // group_size, group_size)          # [..., K/G, G]
    xs = xg.abs().amax(-1, keepdim=True) / INT8_MAX
    q = torch.round(xg / torch.where(xs > 0, xs, torch.ones_like(xs))).clamp_(-INT8_MAX, INT8_MAX)
    return (q * xs).reshape(x.shape)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., cols] (0..15) -> [..., cols/2] uint8: column 2j in the low nibble, 2j+1 in the high one."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_rows`: [..., cols/2] uint8 -> [..., cols] uint8."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def pack_cpu(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., rows, cols] (rows % 64 == 0) -> the layout of `aten._convert_weight_to_int4pack_for_cpu`
    [..., rows, cols/2] uint8, written by that op itself one matrix at a time."""
    flat = codes.reshape(-1, *codes.shape[-2:])
    out = torch.empty(*flat.shape[:-1], flat.shape[-1] // 2, dtype=torch.uint8, device=codes.device)
    for e in range(flat.shape[0]):
        out[e] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(flat[e].to(torch.int32), 1)
    return out.view(*codes.shape[:-1], codes.shape[-1] // 2)


def unpack_cpu(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_cpu` (whole 64-row blocks): [..., rows, cols/2] uint8 -> codes [..., rows, cols]."""
    *lead, rows, half = packed.shape
    cols = 2 * half
    blocks = packed.reshape(-1, cols, CPU_BLOCK_ROWS // 2)                 # [blocks, cols, 32]
    codes = torch.cat((blocks & 0xF, blocks >> 4), dim=-1)                  # [blocks, cols, 64]: rows i, i+32
    return codes.transpose(1, 2).reshape(*lead, rows, cols)


@functools.cache
def cpu_layout_supported() -> bool:
    """True when this PyTorch's CPU int4 pack op exists and writes the layout `unpack_cpu` reads (probed once
    on a random 128×64 matrix, multiplied through `_weight_int4pack_mm_for_cpu`)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.uint8)
    try:
        packed = pack_cpu(codes)
        sz = torch.stack((torch.ones(1, 128), torch.zeros(1, 128)), dim=-1)      # scale 1, zero 0 -> codes - 8
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(64), packed, 64, sz)   # [64, 128] = Wᵀ
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        logger.info("int4 pack op unavailable (%s): int4 weights use the dequantise-per-tile path", e)
        return False
    ok = torch.equal(unpack_cpu(packed), codes) and torch.equal(y.t(), codes.float() - INT4_MID)
    if not ok:
        logger.info("int4 pack op writes an unknown layout here: int4 weights use the dequantise-per-tile path")
    return ok
