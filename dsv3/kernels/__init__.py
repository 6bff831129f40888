"""Optional CPU kernels for decode: bf16 weight × few-row activation products at memory speed.

`CpuKernels` is a backend object for the weight-format seam (dsv3.quant.formats.Kernels): a plain
format given it (`Plain(kernels=CpuKernels())`, or `dsv3.model.weights.use_kernels(model, CpuKernels())`
for a whole model, which `use_cpu_kernels(model)` does) calls the C++ kernels (cpu_gemv.cpp, built once
with the system compiler) only where those win — bf16 weights, inference, at most `MAX_ROWS` activation
rows — and otherwise the ordinary PyTorch op, which is also the reference the tests compare the kernels
with (`reference_linear`, `reference_expert_linear`).

The kernels are registered as torch custom ops (`dsv3::bf16_linear`, `dsv3::bf16_expert_linear`),
so a compiled decode step calls them without graph breaks.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
    """The `Kernels` backend (dsv3.quant.formats) of the C++ GEMV kernels: bf16 weights on the CPU, inference,
    at most `max_rows` activation rows (`max_expert_rows` (token, expert) pairs); None otherwise, so the
    format runs the stock PyTorch op. Build it only where `available()`."""

    def __init__(self, max_rows: int = MAX_ROWS, max_expert_rows: int = MAX_EXPERT_ROWS) -> None:
        if not available():
            raise RuntimeError("the dsv3 CPU kernels cannot be built here (need AVX-512 and a C++ compiler); "
                               "check dsv3.kernels.available() first, or run without kernels")
        self.max_rows, self.max_expert_rows = max_rows, max_expert_rows

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        return bf16_linear(x, weight) if _kernel_ok(x, weight, x.shape[0], self.max_rows) else None

    def expert_linear(self, x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        if not _kernel_ok(x, weight, x.shape[0], self.max_expert_rows):
            return None
        return bf16_expert_linear(x, weight, ids)

    def __repr__(self) -> str:
        return f"CpuKernels(max_rows={self.max_rows}, max_expert_rows={self.max_expert_rows})"


def use_cpu_kernels(model: nn.Module) -> bool:
    """Run `model`'s plain (bf16) layers through the CPU kernels: `use_kernels(model, CpuKernels())` (the
    weight-format seam, dsv3.model.weights), weights shared. Returns False, changing nothing, when the
    kernels cannot be built on this machine."""
    if not available():
        return False
    use_kernels(model, CpuKernels())
    return True
