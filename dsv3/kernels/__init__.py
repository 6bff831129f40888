"""Optional CPU kernels for decode: bf16 weight × few-row activation products at memory speed.

`use_cpu_kernels(model)` edits a loaded model in place (as gpt-fast edits modules after load):
every `nn.Linear` becomes a `KernelLinear` and every `RoutedExperts` a `KernelRoutedExperts`,
sharing the same weight tensors. They call the C++ kernels (cpu_gemv.cpp, built once with the
system compiler) only where those win — bf16 weights, inference, at most `MAX_ROWS` activation
rows — and otherwise run the ordinary PyTorch code, which is also the reference the tests compare
the kernels with (`reference_linear`, `reference_expert_linear`).

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

from dsv3.model.moe import RoutedExperts

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


class KernelLinear(nn.Linear):
    """nn.Linear that uses the bf16 GEMV kernel for a few rows at inference, F.linear otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not _kernel_ok(x, self.weight, rows, MAX_ROWS):
            return super().forward(x)
        y = bf16_linear(x.reshape(rows, x.shape[-1]), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class KernelRoutedExperts(RoutedExperts):
    """Routed experts whose decode-sized dispatch reads each selected expert's weights once."""

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                dispatch: str = "auto") -> torch.Tensor:
        if dispatch != "auto" or not _kernel_ok(x, self.gate_up_proj, indices.numel(), MAX_EXPERT_ROWS):
            return super().forward(x, weights, indices, dispatch)
        n, k = indices.shape
        flat = indices.reshape(-1)
        ids, order = flat.sort(stable=True)
        token = order // k
        h = bf16_expert_linear(x[token], self.gate_up_proj, ids)             # [N*k, 2I] fp32
        gate, up = h.split(self.intermediate, dim=-1)
        y = bf16_expert_linear(F.silu(gate) * up, self.down_proj, ids)       # [N*k, D] fp32
        y = y * weights.reshape(-1)[order, None]
        return torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, y)


def use_cpu_kernels(model: nn.Module) -> bool:
    """Swap in the kernel-backed modules (weights shared). Returns False, changing nothing, when the
    kernels cannot be built on this machine."""
    if not available():
        return False
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = KernelLinear
        elif type(module) is RoutedExperts:
            module.__class__ = KernelRoutedExperts
    return True
