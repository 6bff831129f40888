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
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import int_kernels
from dsv3.model.weights import use_kernels

logger = logging.getLogger(__name__)

MAX_ROWS = 16          # activation rows up to which the GEMV kernel beats the stock GEMM
MAX_EXPERT_ROWS = 128  # (token, expert) pairs up to which the expert kernel is used


@functools.cache
def _extension() -> Any | None:
    """Build (first use, ~1 min) or load the C++ extension; None when no compiler or AVX-512."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        logger.info("CPU kernels need AVX-512 (this CPU: %s); using PyTorch ops",
                    torch.backends.cpu.get_cpu_capability())
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="dsv3_cpu_gemv", sources=[str(Path(__file__).with_name("cpu_gemv.cpp"))],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, headers, ...: fall back to PyTorch ops
        logger.warning("could not build the dsv3 CPU kernels (%s); using PyTorch ops", e)
        return None


def available() -> bool:
    return _extension() is not None


@torch.library.custom_op("dsv3::bf16_linear", mutates_args=())
def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) @ weight[N, K]ᵀ (bf16) -> [M, N] fp32."""
    return _extension().linear(x, weight)


@bf16_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.custom_op("dsv3::bf16_expert_linear", mutates_args=())
def bf16_expert_linear(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """y[p] = x[p] @ weight[ids[p]]ᵀ for ids sorted ascending; x [P, K], weight [E, N, K] bf16 -> [P, N] fp32."""
    return _extension().expert_linear(x, weight, ids)


@bf16_expert_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1], dtype=torch.float32)


def reference_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), weight.float())


def reference_expert_linear(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.bmm(weight[ids].float(), x.float()[:, :, None]).squeeze(-1)


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor, rows: int, limit: int) -> bool:
    return (weight.dtype == torch.bfloat16 and x.device.type == "cpu" and rows <= limit
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


class CpuKernels:
    """The `Kernels` backend (dsv3.quant.formats) of the C++ GEMV kernels: bf16 weights on the CPU (AVX-512),
    int8/int4 weights (`int_isa`: "auto" picks `int_kernels.best_isa()`, or "avx512_vnni" / "avx2", None for
    none), inference, at most `max_rows` activation rows (`max_expert_rows` (token, expert) pairs); None
    otherwise, so the format runs its stock PyTorch path. Build it only where `available()`."""

    def __init__(self, max_rows: int = MAX_ROWS, max_expert_rows: int = MAX_EXPERT_ROWS,
                 int_isa: str | None = "auto") -> None:
        self.int_isa = self._choose_int_isa(int_isa)
        self.bf16 = available() and torch.backends.cpu.get_cpu_capability() == "AVX512"
        if not self.bf16 and self.int_isa is None:
            raise RuntimeError("the dsv3 CPU kernels cannot be built here (need AVX-512 or AVX2 and a C++ compiler); "
                               "check dsv3.kernels.available() first, or run without kernels")
        self.max_rows, self.max_expert_rows = max_rows, max_expert_rows
        self.calls: Counter[str] = Counter()
        logger.info("CPU kernels: bf16 %s, int8/int4 %s", "on" if self.bf16 else "off (needs AVX-512)",
                    self.int_isa or "off (PyTorch ops)")

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        if not (self.bf16 and _kernel_ok(x, weight, x.shape[0], self.max_rows)):
            return None
        return bf16_linear(x, weight)

    def expert_linear(self, x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        if not (self.bf16 and _kernel_ok(x, weight, x.shape[0], self.max_expert_rows)):
            return None
        return bf16_expert_linear(x, weight, ids)

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
            return None
        self._count("int8_linear")
        return int_kernels.int8_linear(x, q, scale, int_kernels.ISAS[self.int_isa])

    def int8_expert_linear(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                           ids: torch.Tensor) -> torch.Tensor | None:
        """y[p] = x[p] @ W[ids[p]]ᵀ, ids sorted; q [E, N, K] int8, scale [E, N] -> [P, N] fp32."""
        if not self._int_ok(x, x.shape[0], self.max_expert_rows):
            return None
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
            return None
        self._count("int4_linear")
        return int_kernels.int4_linear(x, packed, scale_zero, group_size, self._int4_isa(group_size))

    def int4_expert_linear(self, x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                           ids: torch.Tensor) -> torch.Tensor | None:
        """y[p] = x̂[p] @ Ŵ[ids[p]]ᵀ, ids sorted; packed [E, N, K/2], scale_zero [E, K/G, N, 2] -> [P, N] fp32."""
        if not self._int4_ok(x, group_size, self.max_expert_rows):
            return None
        self._count("int4_expert_linear")
        return int_kernels.int4_expert_linear(x, packed, scale_zero, group_size, ids, self._int4_isa(group_size))

    def __repr__(self) -> str:
        return f"CpuKernels(max_rows={self.max_rows}, max_expert_rows={self.max_expert_rows}, int_isa={self.int_isa!r})"


def use_cpu_kernels(model: nn.Module) -> bool:
    """Run `model`'s plain (bf16) layers through the CPU kernels: `use_kernels(model, CpuKernels())` (the
    weight-format seam, dsv3.model.weights), weights shared. Returns False, changing nothing, when the
    kernels cannot be built on this machine (neither the bf16 nor the int8/int4 ones)."""
    if not (available() or int_kernels.best_isa() is not None):
        return False
    use_kernels(model, CpuKernels())
    return True
