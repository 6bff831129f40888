"""Integer weight formats for the seam of dsv3.quant.formats: int8 per output channel, int4 per group of inputs.

    format          tensors for a weight named `w` ([out, in], or stacked [E, out, in])           bytes/value
    Int8PerChannel  w int8 [.., out, in] + w_scale fp32 [.., out]                                  1 + 4/in
    Int4Grouped     w_packed uint8 [.., out, in/2] + w_scale_zero bf16 [.., in/G, out, 2]          0.5 + 4/G

Stored layout (stable: what `state_dict`, `save_pretrained` and `dsv3 convert --quantize` write, and what the C++
kernels of dsv3.kernels read as is — no repacking at load):

    Int8PerChannel  `w`            int8  [.., out, in]      row-major, q in [-127, 127]
                    `w_scale`      fp32  [.., out]          W[r, c] = q[r, c] · s[r]
    Int4Grouped     `w_packed`     uint8 [.., out, in/2]    layout "rows": byte j of a row = column 2j (low
                                                            nibble) | column 2j+1 (high nibble), codes 0..15
                    `w_scale_zero` bf16  [.., in/G, out, 2] (scale, zero): W[r, c] = (code - 8)·scale + zero,
                                                            G = group_size (64 or 128; 32 only where needed)
    The int4 "cpu" packing (PyTorch's pack op, machine-dependent) is a load-time choice for the stock pack op
    only: never a file format, and the dsv3 kernels do not read it.

The math is in dsv3.quant.intq. With `kernels` (a `Kernels` backend, e.g. dsv3.kernels.CpuKernels, handed over by
`use_kernels(model, kernels)`) a product first asks the backend (`int8_linear`, `int8_expert_linear`, `int4_linear`,
`int4_expert_linear`: dsv3's C++ kernels, few rows, int4 "rows" packing only); where it returns None, or without
kernels, it picks one of two stock-PyTorch paths by the number of activation rows (`max_pack_rows`), decided per
call and logged at debug level; `stats`, when given, counts the dequantise path (the pack path and the kernels
dequantise nothing), which is how tests see which path ran:

    pack        few rows (decode): PyTorch's weight-only ops read the integer bytes directly —
                `aten._weight_int8pack_mm(x, q, s)` and `aten._weight_int4pack_mm_for_cpu(x, packed, G, sz)`
                (int4 only in the "cpu" packing, see intq.py: chosen at load where the op exists and
                out % 64 == 0; the "rows" packing always dequantises)
    dequantise  many rows (prefill): dequantise a tile of output rows (or a chunk of the used experts) to
                x.dtype and run the dense GEMM (grouped_mm for experts)

Measured on this project's 2-core AMD EPYC (Zen 4, AVX-512 VNNI/BF16, no AMX), one thread, CPU time (min of
15 runs of 5 calls), N×K = 2048×2048 bf16: rows 1 — bf16 GEMM 0.36 ms, int8 pack 0.21, int8 dequantise
1.25, int4 pack 0.24, int4 dequantise 3.55; rows 16 — 1.27 / 2.09 / 2.22 / 1.76 / 5.14; rows 128 — 5.68 /
14.6 / 6.56 / 12.8 / 8.74; rows 512 — 20.8 / 55.5 / 21.8 / 50.4 / 23.5. Hence the pack ops up to 8 rows
(int8) and 32 rows (int4), the dequantise path above.

Expert stacks: `grouped` touches only the experts that received rows — the pack op once per used expert when
no expert has more than `max_pack_rows` rows, else chunks of used experts dequantised into one grouped GEMM.
Inside a compiled graph (no host reads of the counts) each row's expert is gathered and dequantised instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.memory import weight_empty
from dsv3.quant import intq
from dsv3.quant.formats import DequantStats, ExpertBatch, ExpertOperands, Kernels, WeightFormat
from dsv3.quant.fp8 import CHUNK_ELEMENTS, TILE_ELEMENTS

logger = logging.getLogger(__name__)

INT4_LAYOUTS = ("rows", "cpu")


def _drop(module: nn.Module, name: str) -> None:
    """Remove parameter or buffer `name` from `module` if present (before registering a new kind of tensor)."""
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)


def _log_path(fmt: WeightFormat, rows: int, path: str) -> None:
    if not torch.compiler.is_compiling():                      # (a compiled graph cannot call the logger)
        logger.debug("%s: %d rows, %s", type(fmt).__name__, rows, path)


def _row_range(rows: slice | None, out: int) -> tuple[int, int]:
    return (0, out) if rows is None else (rows.start or 0, out if rows.stop is None else min(out, rows.stop))


def _pack_ok(x: torch.Tensor, rows: int, limit: int) -> bool:
    return rows <= limit and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


class _IntFormat(WeightFormat):
    """What int8 and int4 share: the tiled dequantise path, grouped dispatch over used experts, stats."""

    fixed_dtype: ClassVar[bool] = True
    max_pack_rows: int
    tile_elements: int
    chunk_elements: int
    stats: DequantStats | None
    kernels: Kernels | None

    # the backend's kernels for one matrix (expert is None) or a sorted expert stack; None: not applicable
    def _kernel_mm(self, module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def _kernel_grouped(self, module: nn.Module, name: str, xs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    # per format: dense of rows [r0, r1) (or of `experts`), and the pack op on one matrix
    def _dense(self, module: nn.Module, name: str, dtype: torch.dtype, experts: torch.Tensor | None = None,
               rows: slice | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _pack_mm(self, module: nn.Module, name: str, x: torch.Tensor, expert: int | None) -> torch.Tensor | None:
        raise NotImplementedError

    def _tile_rows(self, out: int, cols: int) -> int:
        return max(1, self.tile_elements // cols)

    def matrix(self, module: nn.Module, name: str, dtype: torch.dtype,
               experts: torch.Tensor | None = None) -> torch.Tensor:
        dense = self._dense(module, name, dtype, experts)
        if self.stats is not None:
            self.stats.record(dense.numel() * dense.element_size(), experts=dense.shape[0] if dense.dim() == 3 else 0)
        return dense

    def linear(self, module: nn.Module, name: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        cols = x.shape[-1]
        x2 = x.reshape(-1, cols)                                               # [M, in]
        y = self._kernel_mm(module, name, x2) if self.kernels is not None else None   # [M, out] fp32
        if y is not None:
            _log_path(self, x2.shape[0], "kernel")
            if bias is not None:
                y = y + bias                                                   # in fp32, one rounding
            return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
        if _pack_ok(x2, x2.shape[0], self.max_pack_rows) and (y := self._pack_mm(module, name, x2, None)) is not None:
            _log_path(self, x2.shape[0], "pack op")
        else:
            _log_path(self, x2.shape[0], "dequantise per tile")
            out = self.out_features(module, name)
            y = x2.new_empty(x2.shape[0], out)                                 # [M, out]
            step = self._tile_rows(out, cols)
            for r0 in range(0, out, step):
                w = self._dense(module, name, x.dtype, rows=slice(r0, min(out, r0 + step)))   # [tile, in]
                if self.stats is not None:
                    self.stats.record(w.numel() * w.element_size())
                y[:, r0: r0 + w.shape[0]] = F.linear(x2, w)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    def grouped(self, module: nn.Module, name: str, xs: torch.Tensor, batch: ExpertBatch) -> torch.Tensor:
        """xs [P, in] sorted by expert -> [P, out]; only the experts with rows are read."""
        if self.kernels is not None:
            y = self._kernel_grouped(module, name, xs, batch.ids)              # [P, out] fp32, or None
            if y is not None:
                _log_path(self, xs.shape[0], "expert kernel")
                return y
        if torch.compiler.is_compiling():
            # a compiled step cannot read the counts on the host: each row's expert, gathered and dequantised
            dense = self.matrix(module, name, xs.dtype, batch.ids)             # [P, out, in]
            return torch.bmm(dense, xs[:, :, None]).squeeze(-1)
        out = self.out_features(module, name)
        used = batch.counts.nonzero().flatten()                                # [U]
        counts = batch.counts[used].tolist()
        ends = batch.offs[used].tolist()
        y = xs.new_empty(xs.shape[0], out)                                     # [P, out]
        if _pack_ok(xs, max(counts, default=0), self.max_pack_rows):
            for e, n, end in zip(used.tolist(), counts, ends, strict=True):
                r = self._pack_mm(module, name, xs[end - n: end], e)
                if r is None:
                    break
                y[end - n: end] = r
            else:
                _log_path(self, xs.shape[0], f"pack op on {len(counts)} experts")
                return y
        _log_path(self, xs.shape[0], "dequantise per chunk of experts")
        step = max(1, self.chunk_elements // (out * xs.shape[1]))
        for c0 in range(0, len(ends), step):
            chunk = used[c0: c0 + step]                                        # [U']
            r0, r1 = ends[c0] - counts[c0], ends[c0 + len(chunk) - 1]
            dense = self.matrix(module, name, xs.dtype, chunk)                 # [U', out, in]
            offs = batch.counts[chunk].cumsum(0).to(torch.int32)
            y[r0:r1] = F.grouped_mm(xs[r0:r1], dense.transpose(1, 2), offs=offs)
        return y

    def out_features(self, module: nn.Module, name: str) -> int:
        raise NotImplementedError

    def with_stats(self, stats: DequantStats | None) -> WeightFormat:
        return replace(self, stats=stats)  # type: ignore[type-var]

    def with_kernels(self, kernels: Kernels | None) -> WeightFormat:
        return self if kernels is self.kernels else replace(self, kernels=kernels)  # type: ignore[type-var]


@dataclass(frozen=True)
class Int8PerChannel(_IntFormat):
    """Symmetric int8 with one fp32 scale per output channel: W ≈ q·s[:, None], y = (x·qᵀ)·s."""

    max_pack_rows: int = 8
    tile_elements: int = TILE_ELEMENTS
    chunk_elements: int = CHUNK_ELEMENTS
    stats: DequantStats | None = field(default=None, compare=False)
    kernels: Kernels | None = field(default=None, compare=False)

    def tensor_names(self, name: str) -> tuple[str, ...]:
        return name, name + "_scale"

    def allocate(self, module: nn.Module, name: str, shape: tuple[int, ...]) -> None:
        _drop(module, name)
        module.register_parameter(name, nn.Parameter(weight_empty(shape, torch.int8), requires_grad=False))
        module.register_buffer(name + "_scale", torch.empty(shape[:-1], dtype=torch.float32))

    def adopt(self, module: nn.Module, name: str, dense: torch.Tensor) -> None:
        q, s = intq.quantize_int8(dense.detach())
        _drop(module, name)
        module.register_parameter(name, nn.Parameter(q, requires_grad=False))
        module.register_buffer(name + "_scale", s)

    def out_features(self, module: nn.Module, name: str) -> int:
        return getattr(module, name).shape[-2]

    def _dense(self, module: nn.Module, name: str, dtype: torch.dtype, experts: torch.Tensor | None = None,
               rows: slice | None = None) -> torch.Tensor:
        q, s = getattr(module, name), getattr(module, name + "_scale")
        if self.kernels is not None:
            dense = self.kernels.int8_dense(q, s, dtype, experts, _row_range(rows, q.shape[-2]))
            if dense is not None:
                return dense
        if experts is not None:
            q, s = q[experts], s[experts]
        if rows is not None:
            q, s = q[rows], s[rows]
        return intq.dequantize_int8(q, s, dtype)

    def _kernel_mm(self, module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor | None:
        return self.kernels.int8_linear(x, getattr(module, name), getattr(module, name + "_scale"))

    def _kernel_grouped(self, module: nn.Module, name: str, xs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        return self.kernels.int8_expert_linear(xs, getattr(module, name), getattr(module, name + "_scale"), ids)

    def expert_operands(self, module: nn.Module, name: str) -> ExpertOperands | None:
        q = getattr(module, name)
        return ExpertOperands(q, getattr(module, name + "_scale"), "int8") if q.dim() == 3 else None

    def _pack_mm(self, module: nn.Module, name: str, x: torch.Tensor, expert: int | None) -> torch.Tensor | None:
        q, s = getattr(module, name), getattr(module, name + "_scale")
        if expert is not None:
            q, s = q[expert], s[expert]
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return None
        if (torch.compiler.is_compiling() and s.dtype != x.dtype) or (x.dtype != torch.float32 and x.shape[1] % 16):
            # inductor lowers this op only with its scale as stored (a cast scale fails); and its bf16 kernel
            # (torch 2.13, CPU) returns garbage when in_features % 16 != 0 (tests/test_int_formats.py): fp32
            return torch.ops.aten._weight_int8pack_mm(x.float().contiguous(), q, s).to(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, s.to(x.dtype))


@dataclass(frozen=True)
class Int4Grouped(_IntFormat):
    """Asymmetric int4 per group of `group_size` input values: W ≈ (codes - 8)·scale + zero (intq.py), packed
    two per byte in `layout` "rows" (portable) or "cpu" (the int4 pack op's, this machine only)."""

    group_size: int = 128
    layout: str = "rows"
    search: bool = False        # round-to-nearest meets the bar (shipped model: +0.16 % ppl; search +0.32 %)
    integer_zero: bool = False  # zero points on compressed-tensors' integer grid (intq.quantize_int4_integer_zero)
    max_pack_rows: int = 32
    tile_elements: int = TILE_ELEMENTS
    chunk_elements: int = CHUNK_ELEMENTS
    stats: DequantStats | None = field(default=None, compare=False)
    kernels: Kernels | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.group_size not in intq.INT4_GROUP_SIZES:
            raise ValueError(f"Int4Grouped group_size={self.group_size}: expected one of {intq.INT4_GROUP_SIZES}")
        if self.layout not in INT4_LAYOUTS:
            raise ValueError(f"Int4Grouped layout={self.layout!r}: expected one of {INT4_LAYOUTS}")

    def storage(self) -> tuple:
        return type(self).__name__, self.group_size, self.layout

    def tensor_names(self, name: str) -> tuple[str, ...]:
        return name + "_packed", name + "_scale_zero"

    def allocate(self, module: nn.Module, name: str, shape: tuple[int, ...]) -> None:
        *lead, out, cols = shape
        _drop(module, name)
        module.register_parameter(name + "_packed", nn.Parameter(
            weight_empty((*lead, out, cols // 2), torch.uint8), requires_grad=False))
        module.register_buffer(name + "_scale_zero", torch.empty(*lead, cols // self.group_size, out, 2,
                                                                  dtype=torch.bfloat16))

    def adopt(self, module: nn.Module, name: str, dense: torch.Tensor) -> None:
        if self.layout == "cpu" and dense.shape[-2] % intq.CPU_BLOCK_ROWS:
            raise ValueError(f"{name}: Int4Grouped layout='cpu' needs a multiple of 64 rows, got "
                             f"{tuple(dense.shape)}; use layout='rows'")
        codes, scale, zero = (intq.quantize_int4_integer_zero(dense.detach(), self.group_size) if self.integer_zero
                              else intq.quantize_int4(dense.detach(), self.group_size, self.search))
        packed = intq.pack_cpu(codes) if self.layout == "cpu" else intq.pack_rows(codes)
        del codes
        sz = torch.stack((scale, zero), dim=-1).transpose(-3, -2).to(torch.bfloat16).contiguous()  # [.., in/G, out, 2]
        _drop(module, name)
        module.register_parameter(name + "_packed", nn.Parameter(packed, requires_grad=False))
        module.register_buffer(name + "_scale_zero", sz)

    def out_features(self, module: nn.Module, name: str) -> int:
        return getattr(module, name + "_packed").shape[-2]

    def _tile_rows(self, out: int, cols: int) -> int:
        step = super()._tile_rows(out, cols)
        return max(intq.CPU_BLOCK_ROWS, step - step % intq.CPU_BLOCK_ROWS) if self.layout == "cpu" else step

    def _dense(self, module: nn.Module, name: str, dtype: torch.dtype, experts: torch.Tensor | None = None,
               rows: slice | None = None) -> torch.Tensor:
        packed, sz = getattr(module, name + "_packed"), getattr(module, name + "_scale_zero")
        if self.kernels is not None and self.layout == "rows":
            dense = self.kernels.int4_dense(packed, sz, self.group_size, dtype, experts,
                                            _row_range(rows, packed.shape[-2]))
            if dense is not None:
                return dense
        if experts is not None:
            packed, sz = packed[experts], sz[experts]
        if rows is not None:
            packed, sz = packed[..., rows, :], sz[..., rows, :]
        codes = intq.unpack_cpu(packed) if self.layout == "cpu" else intq.unpack_rows(packed)
        sz = sz.transpose(-3, -2)                                              # [.., out, in/G, 2]
        return intq.dequantize_int4(codes, sz[..., 0], sz[..., 1], dtype)

    def _kernel_mm(self, module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if self.layout != "rows":
            return None
        return self.kernels.int4_linear(x, getattr(module, name + "_packed"), getattr(module, name + "_scale_zero"),
                                        self.group_size)

    def _kernel_grouped(self, module: nn.Module, name: str, xs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        if self.layout != "rows":
            return None
        return self.kernels.int4_expert_linear(xs, getattr(module, name + "_packed"),
                                               getattr(module, name + "_scale_zero"), self.group_size, ids)

    def expert_operands(self, module: nn.Module, name: str) -> ExpertOperands | None:
        packed = getattr(module, name + "_packed")
        if self.layout != "rows" or packed.dim() != 3 or self.group_size % 32:
            return None
        return ExpertOperands(packed, getattr(module, name + "_scale_zero"), "int4", group=self.group_size)

    def _pack_mm(self, module: nn.Module, name: str, x: torch.Tensor, expert: int | None) -> torch.Tensor | None:
        if self.layout != "cpu" or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return None
        packed, sz = getattr(module, name + "_packed"), getattr(module, name + "_scale_zero")
        if expert is not None:
            packed, sz = packed[expert], sz[expert]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, self.group_size, sz.to(x.dtype))
