"""AMX expert GEMMs for prefill (cpu_amx.cpp): many (token, expert) rows against bf16, int8, int4 or FP8 weights.

On a CPU with AMX (Intel Xeon 4th generation on), PyTorch's grouped_mm runs one oneDNN GEMM per expert, and at
prefill's ~48 rows per expert oneDNN reaches about a third of its large-GEMM rate (it repacks each weight for its
tiles on every call); quantised weights are first dequantised to a bf16 copy on top of that. `expert_gemm` reads the
weights as stored (bf16 rows straight into the tiles; int8/int4/FP8 dequantised one 32-row panel at a time into L2,
the same bits as the formats' dequantise path) and repacks only the activations.

`available()` builds the extension on a CPU whose flags include amx_tile and amx_bf16 (Linux; ~1 min, once) and asks
Linux for the tile registers; elsewhere it is False and nothing is built. `CpuKernels` (dsv3.kernels) calls
`expert_gemm` for expert products with more rows than its GEMV kernels take, twice per MoE layer with its fusions
(gathered activations, SwiGLU, routing weights, the sum over a token's experts: `moe_experts`), and for large
quantised matrices with many rows (one expert). `reference_expert_gemm` is the slow reference the tests compare
with: the dense weights in fp32, then one matmul per row.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

KINDS = {"bf16": 0, "int8": 1, "int4": 2, "fp8": 3}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def _extension() -> Any | None:
    flags = cpu_flags()
    if not {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags:
        logger.info("AMX expert GEMMs: this CPU has no AMX-BF16; prefill keeps PyTorch's grouped GEMMs")
        return None
    try:
        from torch.utils.cpp_extension import load

        ext = load(name="dsv3_cpu_amx", sources=[str(Path(__file__).with_name("cpu_amx.cpp"))],
                   extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                   extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, headers, ...: the stock grouped GEMMs
        logger.warning("could not build the AMX expert GEMMs (%s); prefill keeps PyTorch's grouped GEMMs", e)
        return None
    if not ext.init():
        logger.warning("AMX expert GEMMs: built, but AMX is not compiled in or Linux refused the tile registers; "
                       "prefill keeps PyTorch's grouped GEMMs")
        return None
    logger.info("AMX expert GEMMs built: prefill's expert products read the weights as stored")
    return ext


def available() -> bool:
    """Whether the AMX expert GEMMs run on this machine (AMX-BF16, Linux's permission, a C++ compiler)."""
    return _extension() is not None


def applies(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether `expert_gemm` takes these operands: bf16 activations on the CPU without autograd, K % 32 == 0,
    N % 16 == 0 (every DeepSeek-V3 projection)."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2 and k % 32 == 0 and n % 16 == 0
            and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling())


def expert_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, ids: torch.Tensor, kind: str,
                group: int = 0, block: tuple[int, int] = (0, 0), parts: int = 1,
                out_dtype: torch.dtype = torch.float32, src: torch.Tensor | None = None, swiglu: bool = False,
                row_scale: torch.Tensor | None = None, dst: torch.Tensor | None = None,
                dst_rows: int = 0, up: torch.Tensor | None = None) -> torch.Tensor:
    """y[p] = x[p] @ W[ids[p]]ᵀ, ids sorted ascending; x [P, K] bf16, weight [E, N, K] (int4: [E, N, K/2]) held
    as `kind` (KINDS; `scale` per the format: int8 [E, N] fp32, int4 [E, K/G, N, 2] bf16 with `group` G, fp8
    [E, parts·ceil(N/parts/bo), ceil(K/bi)] fp32 with `block` (bo, bi)) -> [P, N] in `out_dtype` (fp32, or bf16:
    the fp32 sums rounded once, as a bf16 GEMM's output is). Fused, each optional: `src` [P] — row p reads
    x[src[p]] (x [rows, K]); `swiglu` — weight is a gate_up stack [E, 2I, K] and the result [P, I] is
    silu(gate)·up, rounded as bf16 ops round it after a bf16 GEMM; `row_scale` [P] fp32 — row p times it;
    `dst` [P] — row p added into row dst[p] of a zeroed [dst_rows, N] fp32 result (the index_add over tokens);
    `up` (bf16, with swiglu) — the up rows in a stack of their own, [E, I, K] like `weight`, which then holds the
    gate rows only (a dense MLP's gate_proj and up_proj, two tensors)."""
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype={out_dtype}: expected torch.float32 or torch.bfloat16")
    w = weight.view(torch.uint8) if kind == "fp8" else weight
    empty = torch.empty(0)
    return _extension().expert_gemm(x, w, empty if scale is None else scale, ids.to(torch.long), KINDS[kind], group,
                                    block[0], block[1], parts, out_dtype == torch.bfloat16,
                                    empty if src is None else src.to(torch.long), swiglu,
                                    empty if row_scale is None else row_scale.float(),
                                    empty if dst is None else dst.to(torch.long), dst_rows,
                                    empty if up is None else up)


def reference_expert_gemm(x: torch.Tensor, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The slow reference: dense [E, N, K] (the format's dequantised weights) in fp32, one product per row."""
    return torch.bmm(dense[ids].float(), x.float()[:, :, None]).squeeze(-1)
