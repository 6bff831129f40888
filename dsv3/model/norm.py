"""RMSNorm with DeepSeek's numerics: normalise in fp32, cast back, then scale by the weight.

A norm may be handed `NormKernels` (`use_norm_kernels`, e.g. dsv3.kernels.CpuKernels: two passes over each row
where PyTorch's ops take eight, and the residual add before the norm fused in); the kernels decline (None) what
they do not take, and the PyTorch ops below run — also inside a compiled graph, whose compiler fuses them itself.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from dsv3.model.weights import hand_kernels


class NormKernels(Protocol):
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None:
        """norm(x), or with delta (h, norm(h)) for h = x + delta; None: the caller's PyTorch ops."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels: NormKernels | None = None   # set by use_norm_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and not torch.compiler.is_compiling():
            y = self.kernels.rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y
        return self._norm(x)

    def residual(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm(h)) for h = x + delta (the residual stream and the next sublayer's input), in one pass where
        the kernels take it."""
        if self.kernels is not None and not torch.compiler.is_compiling():
            out = self.kernels.rms_norm(x, self.weight, self.eps, delta)
            if out is not None:
                return out
        h = x + delta
        return h, self._norm(h)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def use_norm_kernels(model: nn.Module, kernels: NormKernels | None) -> int:
    """Hand `kernels` to every RMSNorm of `model` (None: PyTorch's ops). Returns the number of norms."""
    return hand_kernels(model, RMSNorm, kernels, "RMSNorm")
