"""C++ kernels for int8 / int4 weights × a few activation rows (decode), each next to its PyTorch reference.

The weights stay in the layouts dsv3.quant.int_formats stores; cpu_int.cpp reads them as they are:

    op                               operands                                                  math
    dsv3::int8_linear                x [M, K], q int8 [N, K], scale fp32 [N]                   x · (q·s)ᵀ
    dsv3::int8_expert_linear         x [P, K], q [E, N, K], scale [E, N], ids [P] sorted       per row p: expert ids[p]
    dsv3::int4_linear                x [M, K], packed uint8 [N, K/2] ("rows"),                 x̂ · Ŵᵀ
                                     scale_zero bf16 [K/G, N, 2]
    dsv3::int4_expert_linear         ... [E, N, K/2], [E, K/G, N, 2], ids [P] sorted

int8 dequantises in registers and multiplies with fp32 activations: the result is x·Wᵀ up to fp32 summation
order. int4 quantises the activations per (row, group of G inputs) to int8 (`intq.quantize_activations`,
symmetric, amax/127) and runs integer dot products (AVX512-VNNI vpdpbusd, or AVX2 vpmaddubsw): the result
is x̂·Ŵᵀ with x̂ those dequantised activations — the references below compute exactly that in PyTorch. The
activation rounding adds a relative error of at most 1/254 of the group's largest |x| per value (about
0.2 % of a product's size for Gaussian-like rows), well inside int4's own weight error (~6 %).

ISA, chosen at run time (`best_isa`, logged by `CpuKernels`): "avx512_vnni" (AVX-512 F/BW/VL + VNNI) where
the CPU has it, "avx2" (AVX2 + FMA) otherwise, None elsewhere (ARM, old x86, no compiler) — then the formats
run PyTorch's ops. Both variants are compiled into one extension with target pragmas, so tests can run
the AVX2 kernels on an AVX-512 machine.

Measured against PyTorch's own weight-only ops (`aten._weight_int8pack_mm` with bf16 scales,
`aten._weight_int4pack_mm_for_cpu` on its "cpu" packing) on this project's 2-core AMD EPYC (Zen 4, AVX-512
VNNI/BF16, no AMX), bf16 activations, N×K = 2048×2048 (int4 G = 128), one thread, weights resident in L2/L3 —
the compute ceiling of each kernel, which is what decides whether it can stream from DRAM — µs per product
(GB/s of weight bytes: bf16 2, int8 1, int4 0.5 B per value), best of 40, on a machine shared with other jobs
(load average 6-12: absolute numbers are low, ratios within a row are the point):

    rows   bf16 kernel    int8 pack op   int8 ours      int4 pack op   int4 ours AVX-512   int4 ours AVX2
    1      172 (48.9)     213 (19.7)     145 (29.0)     211 (10.0)     81 (26.0)           122 (17.2)
    4      447 (18.8)     413 (10.2)     396 (10.6)     384 (5.5)      203 (10.3)          298 (7.0)
    16     2115 (4.0)     1647 (2.5)     1963 (2.1)     1550 (1.4)     811 (2.6)           1226 (1.7)

Chosen: our int4 kernels at every row count (2-2.6× the pack op); our int8 kernel (exact fp32 FMA) up to
`CpuKernels.max_rows` rows: 1.5× the pack op at one row, level at 4, the pack op ~15 % ahead at 16 (both
compute-bound there: int8 → fp32 conversion plus one FMA per weight and row; a VNNI int8 path with rounded
activations would lift batches ≥ 4 — not done). Decode at batch 1 needs ≈ 14 GB/s per core from DRAM
(28 GB/s read with 2 threads): int8 has 2× that in compute headroom, int4 ~1.9×. The 2-thread DRAM-streaming
figures could not be measured on the loaded machine (its 1 GiB read probe gave 4-13 GB/s instead of ~28).
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsv3.kernels.ops import kernel_op, register_fakes
from dsv3.quant import intq

logger = logging.getLogger(__name__)

ISAS = {"avx2": 1, "avx512_vnni": 2}      # name -> the extension's isa code
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512vnni")


@functools.cache
def extension() -> Any | None:
    """Build (first use, a minute or two) or load the int kernels' extension; None off x86-64 or without a
    working compiler (logged)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        logger.info("int8/int4 CPU kernels are x86-64 only (this CPU: %s); using PyTorch ops", platform.machine())
        return None
    try:
        from torch.utils.cpp_extension import load

        ext = load(name="dsv3_cpu_int", sources=[str(Path(__file__).with_name("cpu_int.cpp"))],
                   extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError) as e:   # no compiler, headers, ninja ...
        logger.warning("could not build the dsv3 int8/int4 CPU kernels (%s); using PyTorch ops", e)
        return None
    register_fakes()
    return ext


def cpu_features() -> dict[str, bool]:
    """The x86 extensions this CPU reports ({} where the extension is unavailable)."""
    ext = extension()
    return dict(ext.cpu_features()) if ext is not None else {}


def best_isa() -> str | None:
    """The kernel variant for this CPU: "avx512_vnni", "avx2", or None (use PyTorch's ops)."""
    f = cpu_features()
    if all(f.get(k) for k in _AVX512):
        return "avx512_vnni"
    if f.get("avx2") and f.get("fma"):
        return "avx2"
    return None


def supported_isas() -> tuple[str, ...]:
    """Every variant this CPU can run (tests run each against the references)."""
    best = best_isa()
    return () if best is None else ("avx512_vnni", "avx2") if best == "avx512_vnni" else ("avx2",)


# -- the ops (torch custom ops: a compiled decode step calls them without graph breaks) ----------------------
@kernel_op("dsv3::int8_linear", cpp=True)
def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, isa: int) -> torch.Tensor:
    """x [M, K] @ (q [N, K] int8 · scale [N])ᵀ -> [M, N] fp32."""
    return extension().int8_linear(x, q, scale, isa)


@int8_linear.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, isa: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)


@kernel_op("dsv3::int8_expert_linear", cpp=True)
def int8_expert_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor,
                       isa: int) -> torch.Tensor:
    """y[p] = x[p] @ W[ids[p]]ᵀ, ids sorted; x [P, K], q [E, N, K] int8, scale [E, N] -> [P, N] fp32."""
    return extension().int8_expert_linear(x, q, scale, ids, isa)


@int8_expert_linear.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor, isa: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[1], dtype=torch.float32)


@kernel_op("dsv3::int4_linear", cpp=True)
def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                isa: int) -> torch.Tensor:
    """x̂ [M, K] @ Ŵᵀ, packed [N, K/2] uint8 ("rows"), scale_zero [K/G, N, 2] bf16 -> [M, N] fp32."""
    return extension().int4_linear(x, packed, scale_zero, group_size, isa)


@int4_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, isa: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32)


@kernel_op("dsv3::int4_expert_linear", cpp=True)
def int4_expert_linear(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                       ids: torch.Tensor, isa: int) -> torch.Tensor:
    """y[p] = x̂[p] @ Ŵ[ids[p]]ᵀ, ids sorted; packed [E, N, K/2], scale_zero [E, K/G, N, 2] -> [P, N] fp32."""
    return extension().int4_expert_linear(x, packed, scale_zero, group_size, ids, isa)


@int4_expert_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, ids: torch.Tensor,
      isa: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[1], dtype=torch.float32)


_NO_EXPERTS = torch.empty(0, dtype=torch.long)


@kernel_op("dsv3::int8_dense", mutates_args=("out",))
def int8_dense(q: torch.Tensor, scale: torch.Tensor, experts: torch.Tensor, r0: int, r1: int,
               out: torch.Tensor) -> None:
    """out (bf16 [(U,) r1-r0, K]) = rows [r0, r1) of q·scale ([N, K], or the `experts` of a stack; AVX-512)."""
    extension().int8_dense(q, scale, experts, r0, r1, out)


@kernel_op("dsv3::int4_dense", mutates_args=("out",))
def int4_dense(packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, experts: torch.Tensor, r0: int,
               r1: int, out: torch.Tensor) -> None:
    """out (bf16 [(U,) r1-r0, K]) = rows [r0, r1) of an int4 "rows" weight (or of the `experts` of a stack)."""
    extension().int4_dense(packed, scale_zero, group_size, experts, r0, r1, out)


# -- the references (plain PyTorch, the same math) ------------------------------------------------------------
def _int4_matrix(packed: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    sz = scale_zero.transpose(-3, -2)                                      # [.., N, K/G, 2]
    return intq.dequantize_int4(intq.unpack_rows(packed), sz[..., 0], sz[..., 1], torch.float32)


def reference_int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), intq.dequantize_int8(q, scale, torch.float32))


def reference_int8_expert_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                                 ids: torch.Tensor) -> torch.Tensor:
    w = intq.dequantize_int8(q[ids], scale[ids], torch.float32)            # [P, N, K]
    return torch.bmm(w, x.float()[:, :, None]).squeeze(-1)


def reference_int4_linear(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor,
                          group_size: int) -> torch.Tensor:
    return F.linear(intq.quantize_activations(x, group_size), _int4_matrix(packed, scale_zero))


def reference_int4_expert_linear(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                                 ids: torch.Tensor) -> torch.Tensor:
    w = _int4_matrix(packed[ids], scale_zero[ids])                         # [P, N, K]
    return torch.bmm(w, intq.quantize_activations(x, group_size)[:, :, None]).squeeze(-1)
