"""Weights held in DeepSeek's block FP8 and dequantised where they are used (`from_pretrained(..., fp8="keep")`).

An FP8 weight costs 1 byte per value plus one fp32 scale per 128×128 block — half of bf16. Each forward
dequantises only what it is about to multiply by, into the activation dtype, with the numerics of
dequantise-on-load (fp32 product, one rounding; dsv3.checkpoint.fp8), so an FP8-held model computes
exactly what the dequantised one does, and the dequantised copy lives for one op:

    Fp8Linear          weight fp8 [out, in]  +  weight_scale_inv fp32 [ceil(out/bo), ceil(in/bi)]
    Fp8RoutedExperts   gate_up_proj fp8 [E, 2I, D]  +  gate_up_proj_scale_inv fp32 [E, parts·R, C]
                       down_proj    fp8 [E, D, I]   +  down_proj_scale_inv    fp32 [E, R', C']
                       grouped dispatch dequantises the layer's experts (in chunks of experts),
                       gather dispatch (decode) only the k experts each token chose.

Tensor names are the checkpoint's, so loading, `state_dict` and `save_pretrained` keep the FP8 format.
Pure PyTorch; a fused FP8 GEMM kernel would slot in behind `Fp8Linear.forward`. `model.to(dtype)`
moves these tensors between devices but never casts them (like the router's fp32 weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.checkpoint.fp8 import dequantize_fp8_blocks, dequantize_fp8_stacked, fp8_scale_shape, quantize_fp8_blocks
from dsv3.config import DeepseekV3Config
from dsv3.model.moe import RoutedExperts


class _FixedDtypes(nn.Module):
    """`_apply` (`.to`, `.half()`, ...) may move the FP8 weights and fp32 scales but never change their dtype."""

    _fixed: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        saved = {}
        for name in self._fixed:
            t = getattr(self, name)
            saved[name] = t.data if isinstance(t, nn.Parameter) else t
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                if isinstance(new, nn.Parameter):
                    new.data = old.to(device=new.device)
                else:
                    setattr(self, name, old.to(device=new.device))
        return self


class Fp8Linear(_FixedDtypes):
    """y = x·dequant(W)ᵀ + b, W held as block FP8."""

    _fixed = ("weight", "weight_scale_inv")

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 block_size: Sequence[int] = (128, 128), fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=fp8_dtype), requires_grad=False)
        self.register_buffer("weight_scale_inv", torch.empty(
            fp8_scale_shape((out_features, in_features), self.block_size), dtype=torch.float32))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: Sequence[int] = (128, 128),
                    fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> Fp8Linear:
        """An Fp8Linear in place of `linear`: empty on the meta device (the loader fills it), else quantised."""
        device = linear.weight.device
        with torch.device(device):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size, fp8_dtype)
        if device.type != "meta":
            with torch.no_grad():
                q, s = quantize_fp8_blocks(linear.weight.detach(), new.block_size, fp8_dtype)
                new.weight.data, new.weight_scale_inv = q, s
                if linear.bias is not None:
                    new.bias.data = linear.bias.detach().clone()
        return new

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8_blocks(self.weight, self.weight_scale_inv, self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.weight.dtype}, block_size={list(self.block_size)}")


def linear_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or (dequantised to `dtype`) of an Fp8Linear, for code that uses
    the matrix itself rather than calling the layer (MLA's absorbed path splits kv_b_proj into W_UK, W_UV)."""
    if isinstance(linear, Fp8Linear):
        return linear.dequantized_weight(dtype)
    return linear.weight  # type: ignore[return-value]


class Fp8RoutedExperts(_FixedDtypes, RoutedExperts):
    """Stacked routed experts in block FP8. `gate_up_parts` is 2 when the scales came from separate per-expert
    gate_proj/up_proj tensors (each with its own block grid), 1 for a fused checkpoint tensor."""

    _fixed = ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv")

    def __init__(self, config: DeepseekV3Config, block_size: Sequence[int] = (128, 128),
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn, gate_up_parts: int = 2) -> None:
        nn.Module.__init__(self)   # not RoutedExperts.__init__: its fp32 stacks are exactly what we avoid
        e, i, d = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.num_experts, self.intermediate = e, i
        self.block_size = (int(block_size[0]), int(block_size[1]))
        if gate_up_parts not in (1, 2):
            raise ValueError(f"gate_up_parts={gate_up_parts}: expected 1 (fused scales) or 2 (gate, up)")
        self.gate_up_parts = gate_up_parts
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d, dtype=fp8_dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(e, d, i, dtype=fp8_dtype), requires_grad=False)
        r, c = fp8_scale_shape((2 * i // gate_up_parts, d), self.block_size)
        self.register_buffer("gate_up_proj_scale_inv", torch.empty(e, gate_up_parts * r, c))
        self.register_buffer("down_proj_scale_inv", torch.empty(e, *fp8_scale_shape((d, i), self.block_size)))

    def stacked_weights(self, index: torch.Tensor | None = None,
                        dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = dtype or torch.bfloat16
        gu, gu_s = self.gate_up_proj, self.gate_up_proj_scale_inv
        dn, dn_s = self.down_proj, self.down_proj_scale_inv
        if index is not None:
            gu, gu_s, dn, dn_s = gu[index], gu_s[index], dn[index], dn_s[index]
        return (dequantize_fp8_stacked(gu, gu_s, self.block_size, dtype, self.gate_up_parts, "gate_up_proj"),
                dequantize_fp8_stacked(dn, dn_s, self.block_size, dtype, 1, "down_proj"))

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, intermediate={self.intermediate}, {self.gate_up_proj.dtype}, "
                f"block_size={list(self.block_size)}, gate_up_parts={self.gate_up_parts}")
