"""Optional CPU kernels for decode: bf16 weight × few-row activation products at memory speed.

`CpuKernels` is a backend object for the weight-format seam (dsv3.quant.formats.Kernels): a plain
format given it (`Plain(kernels=CpuKernels())`, or `dsv3.model.weights.use_kernels(model, CpuKernels())`
for a whole model, which `use_cpu_kernels(model)` does) calls the C++ kernels (cpu_gemv.cpp, built once
with the system compiler) only where those win — bf16 weights, inference, at most `MAX_ROWS` activation
rows — and otherwise the ordinary PyTorch op, which is also the reference the tests compare the kernels
with (`reference_linear`, `reference_expert_linear`).

The kernels are registered as torch custom ops (`dsv3::bf16_linear`, `dsv3::bf16_expert_linear`),
so a compiled decode step calls them without graph breaks.

int8 / int4 weights (Int8PerChannel, Int4Grouped "rows"): `CpuKernels` also carries the kernels of
dsv3/kernels/int_kernels.py (cpu_int.cpp; AVX-512 VNNI or AVX2, `int_isa` chosen at run time and logged),
so `use_cpu_kernels(model)` switches a quantised model's decode onto them too. `calls` counts which kernels
ran (outside compiled graphs) — how tests see the path.
Block-FP8 weights (`Fp8Blocks`, fp8="keep") have their own kernels (cpu_fp8.cpp, a separate extension
`dsv3_cpu_fp8`): `dsv3::fp8_linear` and `dsv3::fp8_expert_linear` read the e4m3 bytes and their block scales
directly (1 byte per weight, converted in registers), for at most `MAX_ROWS` rows (`MAX_EXPERT_ROWS` pairs);
`CpuKernels.fp8_linear` / `fp8_expert_linear` return None elsewhere (e5m2, more rows, autograd, no AVX-512),
and the format then dequantises per tile (`reference_fp8_linear` is the slow reference).
On a CPU with AMX, expert products with more (token, expert) rows than `MAX_EXPERT_ROWS` (prefill) run the AMX
expert GEMMs of dsv3/kernels/amx.py (cpu_amx.cpp) for bf16, int8, int4 ("rows") and FP8 weights read as stored
and the MLA decode kernel's two products run on AMX tiles (`set_attention_amx`, a process-wide switch);
`CpuKernels.moe_experts` runs a MoE layer's routed experts as two fused AMX calls (gather, SwiGLU, routing weights and
the sum over each token's experts around the products), a dense MLP's bf16 gate and up products run as one AMX
SwiGLU call (`CpuKernels.swiglu`) and quantised matrices of `AMX_DENSE_MIN`+ values take a one-expert AMX GEMM for
many rows; `CpuKernels(use_amx=False)` keeps PyTorch's grouped GEMMs and the `vdpbf16ps` MLA kernel; `calls` counts
"amx_expert_gemm (kind)", "amx_moe_experts (kinds)", "amx_swiglu" and "amx_linear (kind)".
The RMSNorms of a bf16 model (dsv3/model/norm.py, `use_norm_kernels`) run `CpuKernels.rms_norm` (cpu_gemv.cpp): two
passes over each row instead of PyTorch's eight, with the residual add before the post-attention norm fused in;
counted as "rms_norm" and "add_rms_norm".
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import amx, int_kernels
from dsv3.kernels.ops import kernel_op, register_fakes
from dsv3.memory import keep_freed_memory
from dsv3.model.attention import use_attention_kernels
from dsv3.model.norm import use_norm_kernels
from dsv3.model.weights import use_kernels
from dsv3.quant.formats import ExpertOperands, heads_as_experts

logger = logging.getLogger(__name__)

MAX_ROWS = 16          # activation rows up to which the GEMV kernel beats the stock GEMM
MAX_EXPERT_ROWS = 128  # (token, expert) pairs up to which the expert kernel is used
# weight values from which a quantised matrix's many-row product (prefill) runs on AMX rather than dequantised tiles
# + oneDNN: measured on the bench shape, 512 rows, 2-core Xeon: 10944x2048 int8/int4/FP8 13.7-13.9 vs 17.3-17.6 ms
# and 2048x10944 18.5-19.4 vs 24.5-25.2; at 2-6 M values level (2.9-4.4 ms either way); below, oneDNN's (q_b int4
# 1.7 vs 2.6 ms)
AMX_DENSE_MIN = 16 * 2**20
# rows up to which a dense MLP's gate and up products run as one AMX SwiGLU call (`CpuKernels.swiglu`): measured on
# the bench shape (2-core Xeon, weights out of cache), 10944x2048 and 2816x2048 win from 32 to 512 rows (10944: 4.1
# vs 6.1 ms at 32, 27.8 vs 30.4 at 512); at 768+ rows the 2816-wide one lost (13.0 vs 11.3 ms: the packed
# activations no longer stay in L2 across the weight rows)
AMX_SWIGLU_MAX_ROWS = 512


@functools.cache
def _extension() -> Any | None:
    """Build (first use, ~1 min) or load the C++ extension; None when no compiler or AVX-512."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        logger.info("CPU kernels need AVX-512 (this CPU: %s); using PyTorch ops",
                    torch.backends.cpu.get_cpu_capability())
        return None
    try:
        from torch.utils.cpp_extension import load

        ext = load(name="dsv3_cpu_gemv", sources=[str(Path(__file__).with_name("cpu_gemv.cpp"))],
                   extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, headers, ...: fall back to PyTorch ops
        logger.warning("could not build the dsv3 CPU kernels (%s); using PyTorch ops", e)
        return None
    register_fakes()
    return ext


def available() -> bool:
    return _extension() is not None


@functools.cache
def _fp8_extension() -> Any | None:
    """Build (first use) or load the block-FP8 extension (cpu_fp8.cpp); None when no compiler or AVX-512."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        logger.info("FP8 CPU kernels need AVX-512 (this CPU: %s); FP8 weights dequantise per tile",
                    torch.backends.cpu.get_cpu_capability())
        return None
    try:
        from torch.utils.cpp_extension import load

        ext = load(name="dsv3_cpu_fp8", sources=[str(Path(__file__).with_name("cpu_fp8.cpp"))],
                   extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, headers, ...: FP8 weights dequantise per tile
        logger.warning("could not build the dsv3 FP8 CPU kernels (%s); FP8 weights dequantise per tile", e)
        return None
    logger.info("FP8 CPU kernels (AVX-512) built: FP8 weights are read as stored for up to %d rows", MAX_ROWS)
    register_fakes()
    return ext


_FP8_OK: bool | None = None   # fp8_available()'s answer once known


def fp8_available() -> bool:
    """Whether the block-FP8 kernels run on this machine (AVX-512 and a C++ compiler; built on first call).
    The answer is kept in a module global: a compiled step reads it as a constant, where tracing the build
    check (it asks torch for the CPU's ISA) broke the graph and sent every step back to eager."""
    global _FP8_OK
    if _FP8_OK is None:
        _FP8_OK = _fp8_extension() is not None
    return _FP8_OK


@kernel_op("dsv3::bf16_linear", cpp=True)
def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) @ weight[N, K]ᵀ (bf16) -> [M, N] fp32."""
    return _extension().linear(x, weight)


@bf16_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@kernel_op("dsv3::bf16_expert_linear", cpp=True)
def bf16_expert_linear(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, row0: int = 0,
                       row1: int = -1) -> torch.Tensor:
    """y[p] = x[p] @ weight[ids[p]][row0:row1]ᵀ for ids sorted ascending; x [P, K], weight [E, N, K] bf16
    -> [P, row1-row0] fp32 (row1 -1: N). Experts absent from ids are not read, nor rows outside the range."""
    return _extension().expert_linear(x, weight, ids, row0, row1)


@bf16_expert_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, row0: int = 0, row1: int = -1) -> torch.Tensor:
    return x.new_empty(x.shape[0], (weight.shape[1] if row1 < 0 else row1) - row0, dtype=torch.float32)


@kernel_op("dsv3::bf16_expert_linear_t", cpp=True)
def bf16_expert_linear_t(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, row0: int,
                         row1: int) -> torch.Tensor:
    """y[p] = x[p] @ weight[ids[p]][row0:row1], ids sorted; x [P, row1-row0], weight [E, N, K] bf16 -> [P, K]
    fp32 (MLA's q_nope·W_UK with heads as experts)."""
    return _extension().expert_linear_t(x, weight, ids, row0, row1)


@bf16_expert_linear_t.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, row0: int, row1: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[2], dtype=torch.float32)


@kernel_op("dsv3::fp8_linear", cpp=True)
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_rows: int,
               block_cols: int) -> torch.Tensor:
    """x [M, K] @ dequant(weight [N, K] e4m3, scale_inv [ceil(N/bo), ceil(K/bi)])ᵀ -> [M, N] fp32."""
    return _fp8_extension().fp8_linear(x, weight, scale_inv, block_rows, block_cols)


@fp8_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_rows: int,
      block_cols: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@kernel_op("dsv3::fp8_expert_linear", cpp=True)
def fp8_expert_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, ids: torch.Tensor,
                      block_rows: int, block_cols: int, parts: int) -> torch.Tensor:
    """y[p] = x[p] @ dequant(weight[ids[p]])ᵀ, ids sorted; x [P, K], weight [E, N, K] e4m3,
    scale_inv [E, parts·ceil(N/parts/bo), ceil(K/bi)] -> [P, N] fp32. Experts absent from ids are not read."""
    return _fp8_extension().fp8_expert_linear(x, weight, scale_inv, ids, block_rows, block_cols, parts)


@fp8_expert_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, ids: torch.Tensor, block_rows: int,
      block_cols: int, parts: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1], dtype=torch.float32)


@kernel_op("dsv3::fp8_expert_linear_t", cpp=True)
def fp8_expert_linear_t(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, ids: torch.Tensor, row0: int,
                        row1: int, block_rows: int, block_cols: int) -> torch.Tensor:
    """y[p] = x[p] @ dequant(weight[ids[p]])[row0:row1], ids sorted; x [P, row1-row0], weight [E, N, K] e4m3,
    scale_inv [E, ceil(N/bo), ceil(K/bi)] -> [P, K] fp32 (MLA's q_nope·W_UK with heads as experts)."""
    return _fp8_extension().fp8_expert_linear_t(x, weight, scale_inv, ids, row0, row1, block_rows, block_cols)


@fp8_expert_linear_t.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, ids: torch.Tensor, row0: int, row1: int,
      block_rows: int, block_cols: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[2], dtype=torch.float32)


@kernel_op("dsv3::fp8_dense", mutates_args=("out",))
def fp8_dense(weight: torch.Tensor, scale_inv: torch.Tensor, experts: torch.Tensor, r0: int, r1: int,
              block_rows: int, block_cols: int, parts: int, out: torch.Tensor) -> None:
    """out (bf16 [(U,) r1-r0, K]) = rows [r0, r1) of a block-FP8 weight (or of the `experts` of a stack)."""
    _fp8_extension().dense(weight.view(torch.uint8), scale_inv.contiguous(), experts, r0, r1, block_rows, block_cols,
                           parts, out)


def reference_fp8_expert_linear_t(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, ids: torch.Tensor,
                                  rows: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """The slow reference of `fp8_expert_linear_t`: dequantise the listed experts to fp32, then bmm."""
    from dsv3.quant.fp8 import dequantize_fp8_stacked

    dense = dequantize_fp8_stacked(weight[ids], scale_inv[ids], block, torch.float32)[:, rows[0]: rows[1]]
    return torch.bmm(x.float()[:, None, :], dense).squeeze(1)                   # [P, K]


def reference_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int]) -> torch.Tensor:
    """The slow reference of `fp8_linear`: dequantise to fp32, then F.linear (fp32 out)."""
    from dsv3.quant.fp8 import dequantize_fp8_blocks

    return F.linear(x.float(), dequantize_fp8_blocks(weight, scale_inv, block, torch.float32))


def reference_fp8_expert_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, ids: torch.Tensor,
                                block: tuple[int, int], parts: int) -> torch.Tensor:
    """The slow reference of `fp8_expert_linear`: dequantise the listed experts to fp32, then bmm."""
    from dsv3.quant.fp8 import dequantize_fp8_stacked

    dense = dequantize_fp8_stacked(weight[ids], scale_inv[ids], block, torch.float32, parts)   # [P, N, K]
    return torch.bmm(dense, x.float()[:, :, None]).squeeze(-1)


# -- single-query MLA decode over the latent cache (cpu_attention.cpp) -----------------------------------------
@functools.cache
def _attention_extension() -> Any | None:
    """Build (first use) or load the MLA decode extension; None without AVX512-BF16 or a compiler."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        logger.info("the MLA decode kernel needs AVX-512 (this CPU: %s); using matmuls",
                    torch.backends.cpu.get_cpu_capability())
        return None
    try:
        from torch.utils.cpp_extension import load

        ext = load(name="dsv3_cpu_attention", sources=[str(Path(__file__).with_name("cpu_attention.cpp"))],
                   extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, headers, ...: the matmul path
        logger.warning("could not build the dsv3 MLA decode kernel (%s); using matmuls", e)
        return None
    if not ext.fast_path():
        logger.info("the MLA decode kernel needs AVX512-BF16 (not compiled in on this CPU); using matmuls")
        return None
    register_fakes()
    return ext


def attention_available() -> bool:
    """Whether the single-query MLA decode kernel runs here (AVX512-BF16 and a C++ compiler)."""
    return _attention_extension() is not None


def set_attention_amx(on: bool) -> bool:
    """Run the MLA decode kernel's products on AMX tiles (on a CPU with AMX-BF16) or on `vdpbf16ps` — a process-wide
    switch of the extension (the compiled steps call the same op); returns the new state (False where AMX is absent).
    Same rounding either way (cpu_attention.cpp); the tile path needs r and D multiples of 32 (DeepSeek-V3: 512, 576)
    and otherwise runs the `vdpbf16ps` one."""
    global _ATTENTION_AMX
    ext = _attention_extension()
    _ATTENTION_AMX = bool(ext is not None and ext.set_amx(bool(on and amx.available())))
    logger.info("MLA decode kernel: %s", "AMX tiles" if _ATTENTION_AMX else "AVX512-BF16 (vdpbf16ps)")
    return _ATTENTION_AMX


_ATTENTION_AMX = False   # the MLA decode kernel's switch, as set_attention_amx left it


def attention_amx() -> bool:
    """Whether the MLA decode kernel runs its products on AMX tiles now (set_attention_amx)."""
    return _ATTENTION_AMX


@kernel_op("dsv3::mla_decode", cpp=True)
def mla_decode(query: torch.Tensor, latent: torch.Tensor, r: int, scale: float) -> torch.Tensor:
    """softmax(query·latentᵀ·scale)·latent[..., :r] for one new token: query [B, H, D], latent [B, T, D] (bf16)
    -> [B, H, r] fp32: scores and softmax in fp32, the probabilities rounded to bf16 for the sum over values
    (cpu_attention.cpp: |error| ≤ 2⁻⁸·max|value| beside the fp32 reference)."""
    return _attention_extension().mla_decode(query, latent, r, scale)   # [B, H, r]


@mla_decode.register_fake
def _(query: torch.Tensor, latent: torch.Tensor, r: int, scale: float) -> torch.Tensor:
    return query.new_empty(query.shape[0], query.shape[1], r, dtype=torch.float32)


def reference_mla_decode(query: torch.Tensor, latent: torch.Tensor, r: int, scale: float) -> torch.Tensor:
    """The slow reference of `mla_decode`, all in fp32."""
    probs = (torch.matmul(query.float(), latent.float().transpose(1, 2)) * scale).softmax(-1)   # [B, H, T]
    return torch.matmul(probs, latent[..., :r].float())


def reference_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), weight.float())


def reference_expert_linear(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.bmm(weight[ids].float(), x.float()[:, :, None]).squeeze(-1)


def reference_expert_linear_t(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                              rows: tuple[int, int]) -> torch.Tensor:
    """The slow reference of `bf16_expert_linear_t` (fp32)."""
    return torch.bmm(x.float()[:, None, :], weight[ids, rows[0]: rows[1]].float()).squeeze(1)


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor, rows: int, limit: int) -> bool:
    return (weight.dtype == torch.bfloat16 and x.device.type == "cpu" and rows <= limit
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _fp8_kernel_ok(x: torch.Tensor, weight: torch.Tensor, rows: int, limit: int) -> bool:
    return (weight.dtype == torch.float8_e4m3fn and x.device.type == "cpu" and rows <= limit
            and weight.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad)
            and fp8_available())


def _experts(experts: torch.Tensor | None) -> torch.Tensor:
    return int_kernels._NO_EXPERTS if experts is None else experts.to(torch.long)


class CpuKernels:
    """The `Kernels` backend (dsv3.quant.formats) of the C++ GEMV kernels: bf16 weights on the CPU (AVX-512),
    int8/int4 weights (`int_isa`: "auto" picks `int_kernels.best_isa()`, or "avx512_vnni" / "avx2", None for
    none), inference, at most `max_rows` activation rows (`max_expert_rows` (token, expert) pairs); None
    otherwise, so the format runs its stock PyTorch path. Build it only where `available()`."""

    def __init__(self, max_rows: int = MAX_ROWS, max_expert_rows: int = MAX_EXPERT_ROWS,
                 int_isa: str | None = "auto", use_amx: bool = True, amx_dense_min: int = AMX_DENSE_MIN) -> None:
        self.int_isa = self._choose_int_isa(int_isa)
        self.bf16 = available() and torch.backends.cpu.get_cpu_capability() == "AVX512"
        if not self.bf16 and self.int_isa is None:
            raise RuntimeError("the dsv3 CPU kernels cannot be built here (need AVX-512 or AVX2 and a C++ compiler); "
                               "check dsv3.kernels.available() first, or run without kernels")
        self.max_rows, self.max_expert_rows, self.amx_dense_min = max_rows, max_expert_rows, amx_dense_min
        self.calls: Counter[str] = Counter()
        self._scratch = torch.empty(0, dtype=torch.bfloat16)   # reused by the *_dense methods
        # decided here, not per call: a compiled step cannot trace the check (it asks torch for the CPU's ISA)
        self.attention = attention_available()
        self.amx = amx.available() if use_amx else False
        if self.attention:
            set_attention_amx(self.amx)
        logger.info("CPU kernels: bf16 %s, int8/int4 %s, AMX expert GEMMs %s",
                    "on" if self.bf16 else "off (needs AVX-512)", self.int_isa or "off (PyTorch ops)",
                    "on" if self.amx else "off")

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        if not (self.bf16 and _kernel_ok(x, weight, x.shape[0], self.max_rows)):
            return None
        return bf16_linear(x, weight)

    def expert_linear(self, x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        if not (self.bf16 and _kernel_ok(x, weight, x.shape[0], self.max_expert_rows)):
            return self._amx(x, weight, None, ids, "bf16") if weight.dtype == torch.bfloat16 else None
        return bf16_expert_linear(x, weight, ids)

    def _amx(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, ids: torch.Tensor, kind: str,
             op: str = "expert_gemm", min_rows: int | None = None, **kw: Any) -> torch.Tensor | None:
        """Expert products beyond the GEMV kernels' rows (prefill) on AMX (dsv3.kernels.amx), None where it does
        not apply. The output is bf16, as the stock path's bf16 GEMM gives (and half the bytes to write: prefill's
        [rows, 2·intermediate] fp32 output would exceed malloc's reuse threshold and take fresh pages, ~6 ms per
        call on the bench shape); fp32 activations are rounded to bf16 first."""
        if not (self.amx and x.dim() == 2 and x.shape[0] > (self.max_expert_rows if min_rows is None else min_rows)
                and weight.is_contiguous() and x.dtype in (torch.bfloat16, torch.float32)):
            return None
        xb = x.to(torch.bfloat16)
        if not amx.applies(xb, weight.shape[1], x.shape[1]):
            return None
        self._count(f"amx_{op} ({kind})")
        return amx.expert_gemm(xb, weight, scale, ids, kind, out_dtype=torch.bfloat16, **kw)

    def _amx_dense(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, kind: str,
                   **kw: Any) -> torch.Tensor | None:
        """A quantised matrix [N, K] times many rows (prefill) as a one-expert AMX GEMM (its panels dequantised in
        L2, reused by every row), for bf16 activations and matrices of at least `amx_dense_min` values; None
        otherwise (the format dequantises tiles for oneDNN, in the activations' dtype)."""
        if not (self.amx and x.dtype == torch.bfloat16
                and weight.numel() * (2 if kind == "int4" else 1) >= self.amx_dense_min):
            return None
        ids = torch.zeros(x.shape[0], dtype=torch.long)
        return self._amx(x, weight[None], None if scale is None else scale[None], ids, kind, op="linear",
                         min_rows=self.max_rows, **kw)

    def moe_experts(self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, ids: torch.Tensor,
                    gate_up: ExpertOperands | None, down: ExpertOperands | None) -> torch.Tensor | None:
        """A MoE layer's routed experts for prefill on AMX, in two fused calls: the activations gathered (x[token])
        while they are repacked and silu(gate)·up computed on the gate_up sums, then the down products times the
        routing weights on their fp32 sums, each added into its token's row -> [N, D] fp32, the sum
        over each token's experts. This spares the stock path's gathered copy of x, its [P, 2I] output, the silu,
        mul, cast and scaling passes and the index_add. The down sums are not rounded to bf16 before the weights
        (the stock path's bf16 GEMM rounds them): as the decode kernels compute it. None where it does not apply
        (no AMX, ≤ max_expert_rows pairs, autograd, compile, a stack the kernel does not read, shapes): the caller
        runs the per-weight path. weights [N, k] are the routing weights; order [P] sorts the flat (token, slot)
        pairs by expert (ids [P], the sorted experts)."""
        if not (self.amx and gate_up is not None and down is not None and x.dim() == 2
                and ids.shape[0] > self.max_expert_rows and x.dtype in (torch.bfloat16, torch.float32)
                and gate_up.weight.is_contiguous() and down.weight.is_contiguous()):
            return None
        xb = x.to(torch.bfloat16)
        inter = gate_up.weight.shape[1] // 2
        if not (inter % 32 == 0 and amx.applies(xb, gate_up.weight.shape[1], x.shape[1])
                and amx.applies(xb, down.weight.shape[1], inter)):
            return None
        self._count(f"amx_moe_experts ({gate_up.kind}, {down.kind})")
        token, row_weight = order // weights.shape[1], weights.reshape(-1)[order]
        h = amx.expert_gemm(xb, gate_up.weight, gate_up.scale, ids, gate_up.kind, gate_up.group, gate_up.block,
                            gate_up.parts, out_dtype=torch.bfloat16, src=token, swiglu=True)     # [P, I]
        return amx.expert_gemm(h, down.weight, down.scale, ids, down.kind, down.group, down.block, down.parts,
                               row_scale=row_weight, dst=token, dst_rows=x.shape[0])             # [N, D] fp32

    def swiglu(self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
        """silu(x·gateᵀ)·(x·upᵀ) for a dense MLP's bf16 gate_proj and up_proj weights [I, K] and `max_rows` <
        rows ≤ AMX_SWIGLU_MAX_ROWS of bf16 x (prefill, MTP verification, wide batches), in one AMX call: both
        products and the SwiGLU, rounded as PyTorch's bf16 ops round it after a bf16 GEMM, with neither product's
        output written -> [..., I] bf16. The down projection stays oneDNN's (at 512 rows 13.6 vs 17.1 ms for
        2048×10944). None where it does not apply: the caller's ops."""
        rows = math.prod(x.shape[:-1])
        if not (self.amx and self.max_rows < rows <= AMX_SWIGLU_MAX_ROWS and x.dtype == torch.bfloat16
                and gate.dtype == up.dtype == torch.bfloat16 and gate.dim() == 2 and gate.shape == up.shape
                and gate.shape[0] % 16 == 0 and gate.is_contiguous() and up.is_contiguous()):
            return None
        x2 = x.reshape(rows, x.shape[-1])
        if not amx.applies(x2, 2 * gate.shape[0], gate.shape[1]):
            return None
        self._count("amx_swiglu")
        ids = torch.zeros(rows, dtype=torch.long)
        y = amx.expert_gemm(x2, gate[None], None, ids, "bf16", out_dtype=torch.bfloat16, swiglu=True, up=up[None])
        return y.view(*x.shape[:-1], gate.shape[0])

    # -- int8 / int4 weights (int_kernels.py, cpu_int.cpp) --------------------------------------------------
    @staticmethod
    def _choose_int_isa(int_isa: str | None) -> str | None:
        if int_isa is None:
            return None
        if int_isa == "auto":
            return int_kernels.best_isa()
        if int_isa not in int_kernels.ISAS:
            raise ValueError(f"int_isa={int_isa!r}: expected 'auto', None or one of {tuple(int_kernels.ISAS)}")
        if int_isa not in int_kernels.supported_isas():
            raise ValueError(f"int_isa={int_isa!r}: this CPU (or build) supports only {int_kernels.supported_isas()}; "
                             "use int_isa='auto'")
        return int_isa

    def _int_ok(self, x: torch.Tensor, rows: int, limit: int) -> bool:
        return (self.int_isa is not None and x.device.type == "cpu" and rows <= limit
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and not (torch.is_grad_enabled() and x.requires_grad))

    def _count(self, op: str) -> None:
        if not torch.compiler.is_compiling():
            self.calls[op] += 1

    def int8_linear(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        """x [M, K] @ (q [N, K] int8 · scale [N])ᵀ -> [M, N] fp32 (None: not applicable)."""
        if not self._int_ok(x, x.shape[0], self.max_rows):
            return self._amx_dense(x, q, scale, "int8")
        self._count("int8_linear")
        return int_kernels.int8_linear(x, q, scale, int_kernels.ISAS[self.int_isa])

    def int8_expert_linear(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                           ids: torch.Tensor) -> torch.Tensor | None:
        """y[p] = x[p] @ W[ids[p]]ᵀ, ids sorted; q [E, N, K] int8, scale [E, N] -> [P, N] fp32."""
        if not self._int_ok(x, x.shape[0], self.max_expert_rows):
            return self._amx(x, q, scale, ids, "int8")
        self._count("int8_expert_linear")
        return int_kernels.int8_expert_linear(x, q, scale, ids, int_kernels.ISAS[self.int_isa])

    def _int4_ok(self, x: torch.Tensor, group_size: int, limit: int) -> bool:
        # the AVX-512 kernel takes whole 64-value groups; group 32 runs the AVX2 kernel (present on such CPUs)
        return self._int_ok(x, x.shape[0], limit) and group_size % 32 == 0 and x.shape[1] % group_size == 0

    def _int4_isa(self, group_size: int) -> int:
        return int_kernels.ISAS["avx2" if group_size % 64 else self.int_isa]

    def int4_linear(self, x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor,
                    group_size: int) -> torch.Tensor | None:
        """x̂ [M, K] @ Ŵᵀ for int4 "rows" packed [N, K/2], scale_zero bf16 [K/G, N, 2] -> [M, N] fp32."""
        if not self._int4_ok(x, group_size, self.max_rows):
            return self._amx_dense(x, packed, scale_zero, "int4", group=group_size) if group_size % 32 == 0 else None
        self._count("int4_linear")
        return int_kernels.int4_linear(x, packed, scale_zero, group_size, self._int4_isa(group_size))

    def int4_expert_linear(self, x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                           ids: torch.Tensor) -> torch.Tensor | None:
        """y[p] = x̂[p] @ Ŵ[ids[p]]ᵀ, ids sorted; packed [E, N, K/2], scale_zero [E, K/G, N, 2] -> [P, N] fp32."""
        if not self._int4_ok(x, group_size, self.max_expert_rows):
            return self._amx(x, packed, scale_zero, ids, "int4", group=group_size) if group_size % 32 == 0 else None
        self._count("int4_expert_linear")
        return int_kernels.int4_expert_linear(x, packed, scale_zero, group_size, ids, self._int4_isa(group_size))
    # -- block FP8 (Fp8Blocks): e4m3 bytes read as stored ------------------------------------------------------
    def fp8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                   block: tuple[int, int]) -> torch.Tensor | None:
        if not _fp8_kernel_ok(x, weight, x.shape[0], self.max_rows):
            if weight.dtype != torch.float8_e4m3fn or block[1] % 16:
                return None
            return self._amx_dense(x, weight, scale_inv.contiguous(), "fp8", block=block)
        return fp8_linear(x, weight, scale_inv, block[0], block[1])

    def fp8_expert_linear(self, x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, ids: torch.Tensor,
                          block: tuple[int, int], parts: int) -> torch.Tensor | None:
        if not _fp8_kernel_ok(x, weight, x.shape[0], self.max_expert_rows):
            if weight.dtype != torch.float8_e4m3fn or block[1] % 16:
                return None
            return self._amx(x, weight, scale_inv.contiguous(), ids, "fp8", block=block, parts=parts)
        return fp8_expert_linear(x, weight, scale_inv, ids, block[0], block[1], parts)

    def fp8_expert_linear_t(self, x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, ids: torch.Tensor,
                            rows: tuple[int, int], block: tuple[int, int]) -> torch.Tensor | None:
        if not _fp8_kernel_ok(x, weight, x.shape[0], self.max_expert_rows):
            return None
        return fp8_expert_linear_t(x, weight, scale_inv, ids, rows[0], rows[1], block[0], block[1])

    # -- dequantising to bf16 for prefill's GEMMs (many rows): int8 / int4 / FP8 ------------------------------------
    # Without autograd the result is a view of one buffer this object reuses (fresh memory would cost a page
    # fault per 4 KB written — measured: dequantising the bench shape's weights for one prefill took 1.3 s
    # instead of ~0.3): valid until the next *_dense call, which is how the formats use it (one tile or chunk
    # of experts, multiplied at once). Under autograd (the result saved for backward) or inside a compiled graph
    # each call gets its own tensor.
    def _dense_out(self, weight: torch.Tensor, experts: torch.Tensor | None, rows: tuple[int, int],
                   cols: int) -> torch.Tensor:
        shape = (rows[1] - rows[0], cols) if weight.dim() == 2 else (len(experts), rows[1] - rows[0], cols)
        n = math.prod(shape)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch.empty(shape, dtype=torch.bfloat16)
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.bfloat16)
        return self._scratch[:n].view(shape)

    def _dense_ok(self, weight: torch.Tensor, dtype: torch.dtype) -> bool:
        return (self.int_isa == "avx512_vnni" and dtype == torch.bfloat16 and weight.device.type == "cpu"
                and weight.is_contiguous())

    def int8_dense(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, experts: torch.Tensor | None,
                   rows: tuple[int, int]) -> torch.Tensor | None:
        """rows [r0, r1) of q·scale (of `experts` of a stack) in `dtype`; None: not applicable."""
        if not self._dense_ok(q, dtype):
            return None
        self._count("int8_dense")
        out = self._dense_out(q, experts, rows, q.shape[-1])
        int_kernels.int8_dense(q, scale, _experts(experts), *rows, out)
        return out

    def int4_dense(self, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, dtype: torch.dtype,
                   experts: torch.Tensor | None, rows: tuple[int, int]) -> torch.Tensor | None:
        """rows [r0, r1) of an int4 "rows" weight (of `experts` of a stack) in `dtype`; None: not applicable."""
        if not (self._dense_ok(packed, dtype) and group_size % 32 == 0):
            return None
        self._count("int4_dense")
        out = self._dense_out(packed, experts, rows, 2 * packed.shape[-1])
        int_kernels.int4_dense(packed, scale_zero, group_size, _experts(experts), *rows, out)
        return out

    def fp8_dense(self, weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                  experts: torch.Tensor | None, rows: tuple[int, int], block: tuple[int, int],
                  parts: int) -> torch.Tensor | None:
        """rows [r0, r1) of a block-FP8 weight (of `experts` of a stack) in `dtype`; None: not applicable."""
        if not (weight.dtype == torch.float8_e4m3fn and dtype == torch.bfloat16 and weight.device.type == "cpu"
                and weight.is_contiguous() and fp8_available()):
            return None
        self._count("fp8_dense")
        out = self._dense_out(weight, experts, rows, weight.shape[-1])
        fp8_dense(weight, scale_inv, _experts(experts), *rows, *block, parts, out)
        return out

    # -- MLA decode (dsv3.model.attention.AttentionKernels) -------------------------------------------------------
    def head_products(self, x: torch.Tensor, weight: torch.Tensor, rows: tuple[int, int],
                      transposed: bool) -> torch.Tensor | None:
        """MLA's per-head products with a bf16 kv_b_proj as stored, heads as experts (`heads_as_experts`):
        weight [H, dn+dv, r]; x [P, H, rows] -> [P, H, r] = x_h·W_h[rows] when `transposed` (q_nope·W_UK),
        else x [P, H, r] -> [P, H, rows] = x_h·W_h[rows]ᵀ (o·W_UVᵀ); fp32. None where the kernels do not apply."""
        p, h = x.shape[:2]
        if not (self.bf16 and _kernel_ok(x, weight, p * h, self.max_expert_rows) and weight.is_contiguous()):
            return None
        xs, ids = heads_as_experts(x)
        if transposed:
            self._count("bf16_expert_linear_t")
            y = bf16_expert_linear_t(xs, weight, ids, rows[0], rows[1])              # [H*P, r]
        else:
            self._count("bf16_expert_linear (heads)")
            y = bf16_expert_linear(xs, weight, ids, rows[0], rows[1])                # [H*P, rows]
        return y.view(h, p, -1).transpose(0, 1)

    def latent_decode(self, query: torch.Tensor, latent: torch.Tensor, r: int, scale: float) -> torch.Tensor | None:
        if (query.dtype != torch.bfloat16 or latent.dtype != torch.bfloat16 or latent.device.type != "cpu"
                or latent.stride(-1) != 1 or (torch.is_grad_enabled() and query.requires_grad)
                or not self.attention):
            return None
        return mla_decode(query, latent, r, scale)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None:
        """dsv3.model.norm's RMSNorm of bf16 rows in two passes (cpu_gemv.cpp), with delta the residual add before
        it ((h, norm(h)) for h = x + delta); None (the norm's PyTorch ops) for other dtypes, autograd, shapes."""
        if (not self.bf16 or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu"
                or x.dim() < 1 or x.shape[-1] != weight.shape[0] or x.stride(-1) != 1
                or (delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype or delta.stride(-1) != 1))
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                 or (delta is not None and delta.requires_grad)))):
            return None
        d = x.shape[-1]
        empty = x.new_empty(0)
        if delta is None:
            self._count("rms_norm")
            return _extension().rms_norm(x.reshape(-1, d), weight.contiguous(), eps, empty)[0].view(x.shape)
        self._count("add_rms_norm")
        h, y = _extension().rms_norm(x.reshape(-1, d), weight.contiguous(), eps, delta.reshape(-1, d))
        return h.view(x.shape), y.view(x.shape)

    def moe_residual(self, h: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor | None:
        """h + (routed + shared).to(bf16) for a MoE layer's fp32 routed sum and bf16 shared-expert output [N, D]
        with the bf16 residual stream h [N, D], in one pass (cpu_gemv.cpp) where PyTorch's ops take four — the same
        bits. None (the caller's ops) for other dtypes, autograd, non-contiguous tensors, compiled graphs."""
        if (not self.bf16 or torch.compiler.is_compiling() or h.dtype != torch.bfloat16
                or routed.dtype != torch.float32 or h.dim() != 2 or routed.shape != h.shape
                or not (h.is_contiguous() and routed.is_contiguous())
                or (shared is not None and (shared.dtype != torch.bfloat16 or shared.shape != h.shape
                                            or not shared.is_contiguous()))
                or (torch.is_grad_enabled() and (h.requires_grad or routed.requires_grad
                                                 or (shared is not None and shared.requires_grad)))):
            return None
        self._count("moe_residual")
        return _extension().moe_residual(h, routed, h.new_empty(0) if shared is None else shared)

    def __repr__(self) -> str:
        return (f"CpuKernels(max_rows={self.max_rows}, max_expert_rows={self.max_expert_rows}, "
                f"int_isa={self.int_isa!r}, amx={self.amx})")


def use_cpu_kernels(model: nn.Module) -> bool:
    """Run `model`'s plain (bf16) layers through the CPU kernels: `use_kernels(model, CpuKernels())` (the
    weight-format seam, dsv3.model.weights), weights shared. Returns False, changing nothing, when the
    kernels cannot be built on this machine (neither the bf16 nor the int8/int4 ones)."""
    if not (available() or int_kernels.best_isa() is not None):
        return False
    kernels = CpuKernels()
    use_kernels(model, kernels)
    use_attention_kernels(model, kernels)
    use_norm_kernels(model, kernels)
    return True


# -- the default for library users: from_pretrained(..., kernels="auto") -------------------------------------
KERNEL_CHOICES = ("auto", "on", "off")
# Below this width "auto" keeps a bf16/FP8 model on the stock ops so that it runs without building anything (the
# extensions take ~1 min each to compile on first use) — not for speed: with kernels="on" the shipped model
# (hidden 256) decodes 1.9× faster (bf16, 161 vs 83 tok/s, generate calls interleaved). int8/int4 models take the
# kernels at any width: PyTorch's int paths are the slow ones there (shipped model: int8 1.3×, int4 3.9× faster
# with the kernels), and quantising is already a choice for speed.
KERNELS_MIN_HIDDEN = 1024


def check_kernels_choice(choice: str) -> str:
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels={choice!r}: expected 'auto' (the CPU kernels where they help), 'on' (require "
                         "them) or 'off' (stock PyTorch ops)")
    return choice


def _holds(model: nn.Module, *formats: type) -> bool:
    """Whether any linear or expert stack of `model` holds its weights in one of `formats`."""
    return any(isinstance(f, formats) for m in model.modules()
               for f in ([getattr(m, "format", None)] + list(getattr(m, "formats", {}).values())))


def _holds_fp8(model: nn.Module) -> bool:
    from dsv3.quant.formats import Fp8Blocks

    return _holds(model, Fp8Blocks)


def _holds_int(model: nn.Module) -> bool:
    from dsv3.quant.int_formats import Int4Grouped, Int8PerChannel

    return _holds(model, Int8PerChannel, Int4Grouped)


def select_kernels(model: nn.Module, choice: str = "auto") -> CpuKernels | None:
    """Run `model` through the CPU kernels or not, per `choice` (KERNEL_CHOICES), and return the kernels chosen
    (None: stock PyTorch ops). The choice is logged and recorded as `model.kernels`.

    "auto" picks the kernels for a model on the CPU, in bf16 (FP8-kept and int8/int4 weights included), on a
    CPU where they build (AVX-512 and a C++ compiler; built once, ~1 min each, then cached by
    torch.utils.cpp_extension) — for an unquantised model only from width KERNELS_MIN_HIDDEN on: small bf16
    models (the shipped one, the test presets) run without building anything. GPUs keep the stock ops. "on"
    requires the kernels (ValueError where they cannot run); "off" never uses them.
    """
    check_kernels_choice(choice)
    kernels: CpuKernels | None = None
    if choice == "off":
        reason = "kernels='off'"
    elif model.device.type != "cpu" and choice == "auto":
        reason = f"the model is on {model.device.type}"
    elif model.dtype != torch.bfloat16 and choice == "auto":
        reason = f"the model is in {model.dtype} (the kernels read bf16 or FP8 weights)"
    elif model.config.hidden_size < KERNELS_MIN_HIDDEN and choice == "auto" and not _holds_int(model):
        reason = (f"hidden_size {model.config.hidden_size} < {KERNELS_MIN_HIDDEN}: a small bf16 model runs without "
                  "building them (kernels='on' builds and uses them)")
    elif not available():
        if choice == "on":
            raise ValueError("kernels='on', but the dsv3 CPU kernels cannot be built here (they need AVX-512 and a "
                             "C++ compiler); pass kernels='auto' or 'off'")
        reason = "they cannot be built on this machine"
    else:
        kernels = CpuKernels()
        use_kernels(model, kernels)
        use_attention_kernels(model, kernels)
        use_norm_kernels(model, kernels)
        keep_freed_memory()   # CPU inference: prefill's temporaries reuse freed memory instead of fresh pages
        reason = f"kernels={choice!r}"
        if _holds_fp8(model):   # build the FP8 extension now (logged), not inside the first forward pass
            reason += ", FP8 weights read as stored" if fp8_available() else ", FP8 weights dequantised per tile"
    logger.info("kernels: %s (%s)", kernels or "stock PyTorch ops", reason)
    model.kernels = kernels
    return kernels
