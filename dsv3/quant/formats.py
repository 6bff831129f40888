"""Weight formats: how a layer's weight is stored and multiplied — the one seam between the model and its weights.

A layer (`dsv3.model.weights.Linear`, `dsv3.model.moe.RoutedExperts`) holds, per weight, a `WeightFormat`
object chosen at load time (`from_pretrained(..., fp8="keep")`) or by an explicit call after it
(`dsv3.model.weights.use_kernels`). The format

  - allocates the tensors that hold the weight on the layer, under the checkpoint's names, so loading,
    `state_dict` and `save_pretrained` see the stored format (`allocate`);
  - multiplies by it: `linear(x)` for a matrix [out, in], `grouped(xs, batch)` for an expert stack
    [E, out, in] with the (token, expert) rows sorted by expert — touching only the experts that have rows;
  - hands out the dense weight where code needs the matrix itself (`matrix(dtype)`: MLA's absorbed path
    splits kv_b_proj into W_UK/W_UV; the gather dispatch indexes the chosen experts).

    format      tensors for a weight named `w` ([out, in], or stacked [E, out, in])          stored
    Plain       w                                                                         model dtype
    Fp8Blocks   w float8 [.., out, in] + w_scale_inv fp32 [.., parts·ceil(out/parts/bo), ceil(in/bi)]
                                                                                          1 byte + 4/bo·bi
    Int8PerChannel, Int4Grouped   int8 per output channel, int4 per group of inputs (dsv3.quant.int_formats)

Kernels are an explicit backend object handed to a format (`Kernels` below; `dsv3.kernels.CpuKernels`
implements it for bf16, int8 and int4 weights, and `Fp8Kernels` for block FP8), never a global or a swapped
class: `Plain()` runs stock PyTorch ops, `Plain(kernels=CpuKernels())` the C++ GEMV kernels where they apply,
`Fp8Blocks(kernels=CpuKernels())` reads the FP8 bytes in C++ where they apply (dequantises per tile elsewhere).
A format's `stats` (a `DequantStats`), when given, counts what it dequantises — how the tests see that a decode
step touches only the chosen experts, and that the kernels (which dequantise nothing) ran.

Formats are small frozen dataclasses below `dsv3.model` (they import torch and `dsv3.quant` only).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.memory import weight_empty
from dsv3.quant.fp8 import (
    CHUNK_ELEMENTS,
    FP8_DTYPES,
    TILE_ELEMENTS,
    dequantize_fp8_blocks,
    dequantize_fp8_stacked,
    fp8_block_linear,
    fp8_scale_shape,
    quantize_fp8_blocks,
)

logger = logging.getLogger(__name__)

SCALE_INV = "_scale_inv"      # `weight` -> `weight_scale_inv`, `gate_up_proj` -> `gate_up_proj_scale_inv`


class Kernels(Protocol):
    """Optional fast ops for plain weights. Each returns None when it does not apply to these operands
    (dtype, device, too many rows, autograd), and the format then runs the stock PyTorch op."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """x [M, K] @ weight[N, K]ᵀ -> [M, N] fp32."""

    def expert_linear(self, x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """y[p] = x[p] @ weight[ids[p]]ᵀ, ids sorted; x [P, K], weight [E, N, K] -> [P, N] fp32."""

    # int8 / int4 weights in the stored layouts of dsv3.quant.int_formats (Int8PerChannel, Int4Grouped "rows")
    def int8_linear(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        """x [M, K] @ (q [N, K] int8 · scale [N] fp32)ᵀ -> [M, N] fp32."""

    def int8_expert_linear(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                           ids: torch.Tensor) -> torch.Tensor | None:
        """y[p] = x[p] @ W[ids[p]]ᵀ, ids sorted; q [E, N, K] int8, scale [E, N] -> [P, N] fp32."""

    def int4_linear(self, x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor,
                    group_size: int) -> torch.Tensor | None:
        """x [M, K] @ Wᵀ, packed uint8 [N, K/2] ("rows"), scale_zero bf16 [K/G, N, 2] -> [M, N] fp32 (a kernel
        may round x to int8 per group first; its docs say so)."""

    def int4_expert_linear(self, x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                           ids: torch.Tensor) -> torch.Tensor | None:
        """y[p] = x[p] @ W[ids[p]]ᵀ, ids sorted; packed [E, N, K/2], scale_zero [E, K/G, N, 2] -> [P, N] fp32."""

    # optional (duck-typed): a MoE layer's routed experts in one go, both stacks as stored (ExpertOperands)
    def moe_experts(self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, ids: torch.Tensor,
                    gate_up: ExpertOperands | None, down: ExpertOperands | None) -> torch.Tensor | None:
        """x [N, D], routing weights [N, k]; order [P = N·k] sorts the flat (token, slot) pairs by expert, ids [P]
        their experts -> Σ_k weights[n, k] · down(silu(gate)·up)(x[n]) [N, D] fp32."""

    # dequantising for prefill's GEMMs: rows [r0, r1) (of the `experts` of a stack, None for a matrix) as `dtype`
    def int8_dense(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, experts: torch.Tensor | None,
                   rows: tuple[int, int]) -> torch.Tensor | None:
        """Equal to intq.dequantize_int8 of those rows."""

    def int4_dense(self, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, dtype: torch.dtype,
                   experts: torch.Tensor | None, rows: tuple[int, int]) -> torch.Tensor | None:
        """Equal to intq.dequantize_int4 of those rows ("rows" packing)."""


class Fp8Kernels(Protocol):
    """Optional fast ops for block-FP8 weights (`Fp8Blocks`): they read the FP8 bytes and block scales as
    stored. Each returns None when it does not apply (dtype, device, rows, autograd): the format then
    dequantises per tile / per used expert. A `Kernels` object may implement these too (duck-typed: a
    backend without them leaves FP8 weights on the dequantise path)."""

    def fp8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                   block: tuple[int, int]) -> torch.Tensor | None:
        """x [M, K] @ dequant(weight [N, K], scale_inv [ceil(N/bo), ceil(K/bi)])ᵀ -> [M, N] fp32."""

    def fp8_expert_linear(self, x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, ids: torch.Tensor,
                          block: tuple[int, int], parts: int) -> torch.Tensor | None:
        """y[p] = x[p] @ dequant(weight[ids[p]])ᵀ, ids sorted, only the experts in ids read; x [P, K],
        weight [E, N, K], scale_inv [E, parts·ceil(N/parts/bo), ceil(K/bi)] -> [P, N] fp32."""

    def fp8_dense(self, weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                  experts: torch.Tensor | None, rows: tuple[int, int], block: tuple[int, int],
                  parts: int) -> torch.Tensor | None:
        """Rows [r0, r1) of the dequantised weight (of `experts` of a stack) as `dtype` — for prefill's GEMMs."""


@dataclass
class DequantStats:
    """What a format dequantised: calls, experts touched, bytes of dense weights produced."""

    calls: int = 0
    experts: int = 0
    bytes: int = 0

    def record(self, nbytes: int, experts: int = 0) -> None:
        self.calls += 1
        self.experts += experts
        self.bytes += nbytes

    def reset(self) -> None:
        self.calls = self.experts = self.bytes = 0


@dataclass(frozen=True)
class ExpertBatch:
    """(token, expert) rows sorted by expert: ids [P] ascending, counts [E] rows per expert, offs [E] int32 ends."""

    ids: torch.Tensor
    counts: torch.Tensor
    offs: torch.Tensor

    @classmethod
    def from_sorted(cls, ids: torch.Tensor, num_experts: int) -> ExpertBatch:
        counts = torch.bincount(ids, minlength=num_experts)                    # [E]
        return cls(ids, counts, counts.cumsum(0).to(torch.int32))


@dataclass(frozen=True)
class ExpertOperands:
    """An expert stack as stored, in the terms of the AMX expert GEMM (`dsv3.kernels.amx.expert_gemm`): the weight
    tensor, its scales, the kind ("bf16", "int8", "int4", "fp8") and the kind's parameters. Kernels that fuse a
    whole MoE layer (`moe_experts`) take both stacks of a layer this way."""

    weight: torch.Tensor
    scale: torch.Tensor | None
    kind: str
    group: int = 0
    block: tuple[int, int] = (0, 0)
    parts: int = 1


class WeightFormat:
    """Base of the formats. `fixed_dtype`: `module.to(dtype)` moves this format's tensors but never casts them."""

    fixed_dtype: ClassVar[bool] = False

    def storage(self) -> tuple:
        """What decides the tensors this format allocates; formats with equal storage share loaded tensors."""
        return (type(self).__name__,)

    def tensor_names(self, name: str) -> tuple[str, ...]:
        return (name,)

    def allocate(self, module: nn.Module, name: str, shape: tuple[int, ...]) -> None:
        """Register empty tensors for weight `name` of logical `shape` on `module` (default device: meta works)."""
        raise NotImplementedError

    def adopt(self, module: nn.Module, name: str, dense: torch.Tensor) -> None:
        """Hold the loaded dense weight `dense` in this format (quantise it, or keep the very tensor)."""
        raise NotImplementedError

    def matrix(self, module: nn.Module, name: str, dtype: torch.dtype,
               experts: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight ([out, in], or [E', out, in] of the listed experts) for arithmetic in `dtype`."""
        raise NotImplementedError

    def linear(self, module: nn.Module, name: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] -> x·Wᵀ + bias [..., out] in x.dtype."""
        raise NotImplementedError

    def grouped(self, module: nn.Module, name: str, xs: torch.Tensor, batch: ExpertBatch) -> torch.Tensor:
        """xs [P, in] sorted by expert -> [P, out], row p times expert batch.ids[p] (x.dtype, or fp32 from kernels)."""
        raise NotImplementedError

    def expert_operands(self, module: nn.Module, name: str) -> ExpertOperands | None:
        """Expert stack `name` as stored, for kernels that read it directly (None: not a stack they read)."""
        return None

    def with_kernels(self, kernels: Kernels | None) -> WeightFormat:
        return self

    def with_stats(self, stats: DequantStats | None) -> WeightFormat:
        return self


@dataclass(frozen=True)
class Plain(WeightFormat):
    """Weights as ordinary tensors in the model's dtype; `kernels` (optional) for few-row products."""

    kernels: Kernels | None = field(default=None, compare=False)

    def allocate(self, module: nn.Module, name: str, shape: tuple[int, ...]) -> None:
        module.register_parameter(name, nn.Parameter(weight_empty(shape, torch.get_default_dtype())))

    def adopt(self, module: nn.Module, name: str, dense: torch.Tensor) -> None:
        # The very Parameter (ties, e.g. lm_head = embed_tokens, survive).
        module.register_parameter(name, dense if isinstance(dense, nn.Parameter) else nn.Parameter(dense))

    def matrix(self, module: nn.Module, name: str, dtype: torch.dtype,
               experts: torch.Tensor | None = None) -> torch.Tensor:
        w = getattr(module, name)
        return w if experts is None else w[experts]

    def linear(self, module: nn.Module, name: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = getattr(module, name)
        if self.kernels is not None:
            rows = math.prod(x.shape[:-1])
            y = self.kernels.linear(x.reshape(rows, x.shape[-1]), w)        # [rows, out] fp32, or None
            if y is not None:
                if bias is not None:
                    y = y + bias
                return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, bias)

    def grouped(self, module: nn.Module, name: str, xs: torch.Tensor, batch: ExpertBatch) -> torch.Tensor:
        w = getattr(module, name)                                              # [E, out, in]
        if self.kernels is not None:
            y = self.kernels.expert_linear(xs, w, batch.ids)
            if y is not None:
                return y
        return F.grouped_mm(xs, w.transpose(1, 2), offs=batch.offs)

    def expert_operands(self, module: nn.Module, name: str) -> ExpertOperands | None:
        w = getattr(module, name)
        return ExpertOperands(w, None, "bf16") if w.dim() == 3 and w.dtype == torch.bfloat16 else None

    def with_kernels(self, kernels: Kernels | None) -> Plain:
        return self if kernels is self.kernels else replace(self, kernels=kernels)


PLAIN = Plain()


@dataclass(frozen=True)
class Fp8Blocks(WeightFormat):
    """DeepSeek's block FP8: `w` float8 + `w_scale_inv` fp32 per (bo, bi) block (dsv3.quant.fp8).

    parts: row groups with their own block grids in each expert (2 for a gate_up stack read from separate
    gate_proj/up_proj tensors, 1 otherwise). tile_elements / chunk_elements bound the dequantised temporaries
    of `linear` (per tile of row blocks) and `grouped` (per chunk of the experts that have rows).
    """

    fixed_dtype: ClassVar[bool] = True
    block_size: tuple[int, int] = (128, 128)
    dtype: torch.dtype = torch.float8_e4m3fn
    parts: int = 1
    tile_elements: int = TILE_ELEMENTS
    chunk_elements: int = CHUNK_ELEMENTS
    stats: DequantStats | None = field(default=None, compare=False)
    kernels: Fp8Kernels | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in FP8_DTYPES.values():
            raise ValueError(f"Fp8Blocks dtype={self.dtype}: expected torch.float8_e4m3fn or torch.float8_e5m2")
        if self.parts not in (1, 2):
            raise ValueError(f"Fp8Blocks parts={self.parts}: expected 1 (one grid) or 2 (gate and up grids)")

    def storage(self) -> tuple:
        return type(self).__name__, self.block_size, self.dtype, self.parts

    def tensor_names(self, name: str) -> tuple[str, ...]:
        return name, name + SCALE_INV

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, rows, cols = shape
        r, c = fp8_scale_shape((rows // self.parts, cols), self.block_size)
        return (*lead, self.parts * r, c)

    def allocate(self, module: nn.Module, name: str, shape: tuple[int, ...]) -> None:
        module.register_parameter(name, nn.Parameter(weight_empty(shape, self.dtype), requires_grad=False))
        module.register_buffer(name + SCALE_INV, torch.empty(self.scale_shape(shape), dtype=torch.float32))

    def adopt(self, module: nn.Module, name: str, dense: torch.Tensor) -> None:
        if dense.dim() != 2:
            raise ValueError(f"{name}: Fp8Blocks quantises a loaded [out, in] matrix; got shape {tuple(dense.shape)} "
                             "(load expert stacks as FP8 with from_pretrained(..., fp8='keep'))")
        q, s = quantize_fp8_blocks(dense.detach(), self.block_size, self.dtype)
        module.register_parameter(name, nn.Parameter(q, requires_grad=False))
        module.register_buffer(name + SCALE_INV, s)

    def _kernel_dense(self, module: nn.Module, name: str, dtype: torch.dtype, experts: torch.Tensor | None,
                      rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        if self.kernels is None or not hasattr(self.kernels, "fp8_dense"):
            return None
        w, s = getattr(module, name), getattr(module, name + SCALE_INV)
        return self.kernels.fp8_dense(w, s, dtype, experts if w.dim() == 3 else None, rows or (0, w.shape[-2]),
                                      self.block_size, self.parts if w.dim() == 3 else 1)

    def _dequantize(self, module: nn.Module, name: str, dtype: torch.dtype,
                    experts: torch.Tensor | None) -> torch.Tensor:
        if (dense := self._kernel_dense(module, name, dtype, experts)) is not None:
            return dense
        w, s = getattr(module, name), getattr(module, name + SCALE_INV)
        if w.dim() == 2:
            return dequantize_fp8_blocks(w, s, self.block_size, dtype, name=name)
        if experts is not None:
            w, s = w[experts], s[experts]
        return dequantize_fp8_stacked(w, s, self.block_size, dtype, self.parts, name, self.chunk_elements)

    def matrix(self, module: nn.Module, name: str, dtype: torch.dtype,
               experts: torch.Tensor | None = None) -> torch.Tensor:
        dense = self._dequantize(module, name, dtype, experts)
        if self.stats is not None:
            self.stats.record(dense.numel() * dense.element_size(), experts=dense.shape[0] if dense.dim() == 3 else 0)
        return dense

    def linear(self, module: nn.Module, name: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w, s = getattr(module, name), getattr(module, name + SCALE_INV)
        if self.kernels is not None and hasattr(self.kernels, "fp8_linear"):
            rows = math.prod(x.shape[:-1])
            y = self.kernels.fp8_linear(x.reshape(rows, x.shape[-1]), w, s, self.block_size)   # [rows, out] fp32
            if y is not None:
                _log_path(self, rows, "kernel")
                if bias is not None:
                    y = y + bias
                return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])
        _log_path(self, math.prod(x.shape[:-1]), "dequantise")
        if self.stats is not None:
            self.stats.record(w.numel() * x.element_size())
        out, step = w.shape[0], max(1, self.tile_elements // max(1, w.shape[1]))   # (a rank may hold 0 inputs)
        tile = self._kernel_dense(module, name, x.dtype, None, (0, min(out, step)))
        if tile is None:
            return fp8_block_linear(x, w, s, self.block_size, bias, self.tile_elements)
        x2 = x.reshape(-1, x.shape[-1])
        y = x2.new_empty(x2.shape[0], out)
        for r0 in range(0, out, step):   # a tile of rows dequantised by the kernel, then the GEMM
            if r0:
                tile = self._kernel_dense(module, name, x.dtype, None, (r0, min(out, r0 + step)))
            y[:, r0: r0 + tile.shape[0]] = F.linear(x2, tile)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.view(*x.shape[:-1], w.shape[0])

    def grouped(self, module: nn.Module, name: str, xs: torch.Tensor, batch: ExpertBatch) -> torch.Tensor:
        """Kernels (when given and they apply) read the FP8 bytes of the experts that have rows; otherwise
        dequantise only those experts, a chunk of them at a time, each chunk one grouped GEMM."""
        w = getattr(module, name)                                              # [E, out, in] fp8
        if self.kernels is not None and hasattr(self.kernels, "fp8_expert_linear"):
            y = self.kernels.fp8_expert_linear(xs, w, getattr(module, name + SCALE_INV), batch.ids,
                                               self.block_size, self.parts)   # [P, out] fp32, or None
            if y is not None:
                _log_path(self, xs.shape[0], "kernel")
                return y
        _log_path(self, xs.shape[0], "dequantise")
        if torch.compiler.is_compiling():
            # a compiled step cannot read the counts on the host: each row's expert, gathered and dequantised
            dense = self.matrix(module, name, xs.dtype, batch.ids)             # [P, out, in]
            return torch.bmm(dense, xs[:, :, None]).squeeze(-1)
        used = batch.counts.nonzero().flatten()                                # [U] experts with rows
        ends = batch.offs[used].tolist()                                       # row end of each used expert
        starts = (batch.offs[used] - batch.counts[used]).tolist()
        y = xs.new_empty(xs.shape[0], w.shape[1])                              # [P, out]
        step = max(1, self.chunk_elements // (w.shape[1] * w.shape[2]))
        for c0 in range(0, len(ends), step):
            chunk = used[c0: c0 + step]                                        # [U']
            r0, r1 = starts[c0], ends[c0 + len(chunk) - 1]
            dense = self.matrix(module, name, xs.dtype, chunk)                 # [U', out, in]
            offs = batch.counts[chunk].cumsum(0).to(torch.int32)
            y[r0:r1] = F.grouped_mm(xs[r0:r1], dense.transpose(1, 2), offs=offs)
        return y

    def head_products(self, module: nn.Module, name: str, x: torch.Tensor, rows: tuple[int, int],
                      transposed: bool) -> torch.Tensor | None:
        """Per-head products with a weight whose rows are H equal groups (MLA's kv_b_proj viewed [H, dn+dv, r]),
        the FP8 bytes read by the kernels, heads as experts: x [P, H, rows] -> [P, H, in] = x_h·W_h[rows] when
        `transposed` (q_nope·W_UK), else x [P, H, in] -> [P, H, rows] = x_h·W_h[rows]ᵀ (o·W_UVᵀ); fp32.
        None where no kernels apply or a head's rows are not whole row blocks: the caller dequantises."""
        w, s = getattr(module, name), getattr(module, name + SCALE_INV)
        p, h = x.shape[:2]
        bo = self.block_size[0]
        if self.kernels is None or not hasattr(self.kernels, "fp8_expert_linear_t") or w.shape[0] % (h * bo):
            return None
        per_head = w.shape[0] // h
        w3, s3 = w.view(h, per_head, w.shape[1]), s.view(h, per_head // bo, s.shape[1])   # [H, R, in], [H, R/bo, C]
        xs, ids = heads_as_experts(x)
        if transposed:
            y = self.kernels.fp8_expert_linear_t(xs, w3, s3, ids, rows, self.block_size)   # [H*P, in]
        else:
            y = self.kernels.fp8_expert_linear(xs, w3, s3, ids, self.block_size, 1)      # [H*P, R]
            y = None if y is None else y[:, rows[0]: rows[1]]
        if y is None:
            return None
        _log_path(self, h * p, "kernel (heads)")
        return y.view(h, p, -1).transpose(0, 1)                                        # [P, H, ...]

    def expert_operands(self, module: nn.Module, name: str) -> ExpertOperands | None:
        w = getattr(module, name)
        if w.dim() != 3 or w.dtype != torch.float8_e4m3fn or self.block_size[1] % 16:
            return None
        return ExpertOperands(w, getattr(module, name + SCALE_INV), "fp8", block=self.block_size, parts=self.parts)

    def with_stats(self, stats: DequantStats | None) -> Fp8Blocks:
        return replace(self, stats=stats)

    def with_kernels(self, kernels: Fp8Kernels | None) -> Fp8Blocks:
        return self if kernels is self.kernels else replace(self, kernels=kernels)


def heads_as_experts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [P, H, D] as expert-kernel rows: ([H*P, D] ordered by head, the head of each row [H*P], sorted)."""
    p, h = x.shape[:2]
    ids = torch.arange(h, device=x.device)
    return x.transpose(0, 1).reshape(h * p, x.shape[2]), ids if p == 1 else ids.repeat_interleave(p)


def _log_path(fmt: WeightFormat, rows: int, path: str) -> None:
    if not torch.compiler.is_compiling():                      # (a compiled graph cannot call the logger)
        logger.debug("%s: %d rows, %s", type(fmt).__name__, rows, path)


def keep_fixed_dtypes(module: nn.Module, formats: dict[str, WeightFormat], fn, recurse: bool):  # noqa: ANN001, ANN201
    """`nn.Module._apply` for a layer holding `formats`: tensors of fixed-dtype formats keep their dtype
    (`.to(device)` moves them, `.to(torch.bfloat16)` or `.half()` leaves FP8 bytes and fp32 scales alone)."""
    saved = {}
    for name, fmt in formats.items():
        if fmt.fixed_dtype:
            for t_name in fmt.tensor_names(name):
                t = getattr(module, t_name)
                saved[t_name] = t.data if isinstance(t, nn.Parameter) else t
    nn.Module._apply(module, fn, recurse)
    for t_name, old in saved.items():
        new = getattr(module, t_name)
        if new.dtype != old.dtype:
            if isinstance(new, nn.Parameter):
                new.data = old.to(device=new.device)
            else:
                setattr(module, t_name, old.to(device=new.device))
    return module
