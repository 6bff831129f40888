"""`from_pretrained(path, quantization="int8" | "int4")`: weight-only quantisation while loading.

Which tensors (decided on the meta model, before any data is read — `plan_quantization`):

    every decoder linear (MLA projections but kv_b_proj, dense MLP, shared experts), every routed-expert
    stack, MTP's eh_proj
        int8: Int8PerChannel; int4: Int4Grouped with groups of `group_size` (128) inputs, smaller (64, 32)
        where the input width needs it, int8 for a matrix no group size divides; int4 zero points are
        integers (intq.quantize_int4_integer_zero), the grid compressed-tensors stores, so a quantised model
        is saved and converted without re-quantising (dsv3.checkpoint.quantized)
    LM heads (lm_head, MTP's shared_head.head)
        Int8PerChannel in both modes by default (`head_quantization=None` or "int8"): the head decides every
        token and int8 keeps it within the quality bar; on DeepSeek-V3 it is ~2.5 % of the bytes a token reads
        (llama.cpp's Q4_K_M keeps its output matrix at 6 bits too). `head_quantization="int4"` makes it int4
        like the rest (groups of `group_size`): for shallow models, where the head is most of the bytes read
        per token (59 % of int4's on the 4-layer bench shape), at a measured cost in perplexity (README)
    kv_b_proj (W_UK, W_UV)
        as loaded: decode runs the absorbed attention, which multiplies each head's query and output by its
        slice of kv_b_proj as matrices (W_UK transposed) — not a product the int kernels compute, so a
        quantised kv_b_proj was dequantised by PyTorch ops every step (int4 on the bench shape: ~18 ms of a
        44 ms step, for 3 % of its bytes)
    embeddings, norms, the router (fp32 by the numerics policy)
        as loaded: an embedding lookup reads only the rows of the step's tokens, so quantising it saves memory
        but no time
    a weight held by two modules (tie_word_embeddings' head = embedding) stays as loaded
    with fp8="keep", weights stored as FP8 stay FP8 (read as stored by the FP8 kernels); the rule above applies
        to the others — in DeepSeek's published checkpoints the LM heads (bf16 there: on the bench shape, 530 of
        its 852 MB read per token), `quantization="int8"` makes them int8

How (`load_quantizing`, called by the loader for each quantised tensor): the final tensors are allocated in
their format, then filled chunk by chunk — LOAD_CHUNK_ELEMENTS values in whole rows (of one expert's gate and
up rows, or of a matrix) are read from the file (`pread` of those rows only; FP8 dequantised over the blocks
that hold them), quantised and written into place — peak memory is the quantised model plus one chunk.

int4 packing: "rows" (portable; what dsv3's int4 CPU kernels read) wherever those kernels run (x86-64 with AVX2 or
AVX-512 VNNI, dsv3.kernels.int_kernels.best_isa); else "cpu" (the layout of PyTorch's int4 pack op, so decode uses
`_weight_int4pack_mm_for_cpu`) where that op writes a layout dsv3 reads (intq.cpu_layout_supported) and the
matrix has a multiple of 64 rows; "rows" (dequantised per tile) otherwise. The choice is logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dsv3.checkpoint.fp8 import Fp8Spec, dequantize_checked
from dsv3.checkpoint.keys import Source
from dsv3.checkpoint.safetensors_io import CheckpointReader
from dsv3.kernels import int_kernels
from dsv3.memory import weight_empty
from dsv3.model.moe import RoutedExperts
from dsv3.model.weights import Linear
from dsv3.quant import intq
from dsv3.quant.formats import Fp8Blocks, WeightFormat
from dsv3.quant.int_formats import Int4Grouped, Int8PerChannel

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "int4")
HEAD_QUANTIZATIONS = ("int8", "int4")       # head_quantization=None: int8 (see the module docstring)
LOAD_CHUNK_ELEMENTS = intq.CHUNK_ELEMENTS   # values quantised at a time while loading (16 MiB of fp32)
ROW_ALIGN = 128                             # chunks of whole 128-row blocks: FP8 block rows, int4 64-row packing
HEADS = ("lm_head", "shared_head.head")
KEPT = ("kv_b_proj",)                       # linears held as loaded (see the module docstring)


def check_quantization(quantization: str | None, fp8: str, head_quantization: str | None = None,
                       stored: bool = False) -> None:
    """The quantisation arguments of from_pretrained; `stored`: the checkpoint is already quantised (then
    head_quantization may name what it holds without quantization=)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {QUANTIZATIONS} or None (weights as "
                         "loaded)")
    if head_quantization is not None and head_quantization not in HEAD_QUANTIZATIONS:
        raise ValueError(f"head_quantization={head_quantization!r}: expected one of {HEAD_QUANTIZATIONS} or None "
                         "(int8 when the model is quantised)")
    if head_quantization is not None and quantization is None and not stored:
        raise ValueError(f"head_quantization={head_quantization!r} applies to a quantised load: pass "
                         f"quantization='int8' or 'int4' too (with fp8='keep' that quantises only the heads)")


def _dense_rows(reader: CheckpointReader, key: str | tuple[str, int], r0: int, r1: int, scales: dict[str, str],
                spec: Fp8Spec | None) -> torch.Tensor:
    """Rows [r0, r1) of checkpoint tensor `key` (or of expert e of a fused stack, key = (name, e)) in fp32, read
    alone: cast, or FP8 dequantised over the whole blocks that hold them."""
    if isinstance(key, tuple):                       # one expert of a fused [E, rows, in] tensor, read whole
        name, e = key
        weight = reader.read(name, rows=(e, e + 1))[0]
        scale_key = scales.get(name)
        if scale_key is None:
            return weight[r0:r1].float()
        assert spec is not None
        scale = reader.read(scale_key, rows=(e, e + 1))[0]
        return dequantize_checked(weight, scale, spec.block_size, torch.float32, name)[r0:r1]
    scale_key = scales.get(key)
    if scale_key is None:
        return reader.read(key, rows=(r0, r1)).float()
    assert spec is not None
    bo = spec.block_size[0]
    a, b = r0 // bo * bo, min(-(-r1 // bo) * bo, reader.shape(key)[0])
    scale = reader.read(scale_key, rows=(a // bo, -(-b // bo)))
    return dequantize_checked(reader.read(key, rows=(a, b)), scale, spec.block_size, torch.float32,
                              key)[r0 - a: r1 - a]


def int4_format(out: int, group_size: int, device: torch.device) -> Int4Grouped:
    """The int4 format of a matrix with `out` rows (per expert for a stack) in groups of `group_size`: zero
    points on the integer grid (what compressed-tensors stores, so the model saves as it is held), packed in
    the layout of PyTorch's int4 op where it applies (see the module docstring)."""
    # "rows" wherever dsv3's int4 CPU kernels run (they read only that packing and beat the pack op:
    # dsv3/kernels/int_kernels.py); PyTorch's "cpu" packing only where its pack op is the fastest decode path
    cpu = (device.type == "cpu" and out % intq.CPU_BLOCK_ROWS == 0 and int_kernels.best_isa() is None
           and intq.cpu_layout_supported())
    return Int4Grouped(group_size=group_size, layout="cpu" if cpu else "rows", integer_zero=True)


def _int4(out: int, cols: int, group_size: int, device: torch.device) -> WeightFormat:
    g = intq.int4_group_size(cols, group_size)
    return Int8PerChannel() if g is None else int4_format(out, g, device)


def _holds_fp8(module: nn.Module) -> bool:
    formats = [module.format] if isinstance(module, Linear) else (
        list(module.formats.values()) if isinstance(module, RoutedExperts) else [])
    return any(isinstance(f, Fp8Blocks) for f in formats)


def plan_quantization(model: nn.Module, quantization: str, device: torch.device, group_size: int = 128,
                      head_quantization: str | None = None) -> dict[str, WeightFormat]:
    """{model tensor name: format} for the tensors `quantization` replaces, the LM heads in
    `head_quantization` (None: int8; see the module docstring)."""
    holders = Counter(id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)))
    plan: dict[str, WeightFormat] = {}
    for name, module in model.named_modules():
        if _holds_fp8(module):    # fp8="keep": FP8 weights stay as stored; quantization takes the others
            continue
        if isinstance(module, (nn.Linear, Linear)):
            if isinstance(module, nn.Linear) and holders[id(module.weight)] > 1:
                logger.info("%s: weight shared with another module (tied), kept as loaded", name)
                continue
            if name.endswith("." + KEPT[0]):
                continue
            head = name == HEADS[0] or name.endswith("." + HEADS[1])
            kind = (head_quantization or "int8") if head else quantization
            if kind == "int8":
                plan[f"{name}.weight"] = Int8PerChannel()
            else:
                plan[f"{name}.weight"] = _int4(module.out_features, module.in_features, group_size, device)
        elif isinstance(module, RoutedExperts):
            i, d = module.intermediate, module.hidden
            for stack, (out, cols) in (("gate_up_proj", (2 * i, d)), ("down_proj", (d, i))):
                plan[f"{name}.{stack}"] = (Int8PerChannel() if quantization == "int8"
                                           else _int4(out, cols, group_size, device))
    kinds = Counter(repr(f) for f in plan.values())
    logger.info("quantization=%r (heads %s): %d tensors quantised while loading (%s)", quantization,
                head_quantization or "int8", len(plan), ", ".join(f"{n}× {k}" for k, n in kinds.items()))
    return plan


def quantize_loaded(model: nn.Module, tensor_name: str, fmt: WeightFormat) -> None:
    """Hold the just-loaded dense tensor `tensor_name` in `fmt` (a sharded rank's part, read whole): a linear's
    weight becomes a `Linear` in that format (its bias, loaded or not yet, carries over), an expert stack
    adopts it."""
    module_name, _, attr = tensor_name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, RoutedExperts):
        module.adopt_format(attr, fmt)
        return
    assert isinstance(module, nn.Linear) and attr == "weight", tensor_name
    owner_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, child, Linear.from_linear(module, fmt))


def load_quantizing(model: nn.Module, name: str, fmt: WeightFormat, source: Source, reader: CheckpointReader,
                    scales: dict[str, str], spec: Fp8Spec | None, device: torch.device,
                    chunk_elements: int | None = None) -> None:
    """Load model tensor `name` (a linear's weight, or an expert stack: per-expert pieces or one fused tensor)
    from checkpoint `source` straight into `fmt`, in chunks of whole rows: only the chunk's rows are read (FP8
    ones, `scales`, dequantised over the blocks that hold them), in fp32, quantised and written into the final
    tensors — never the whole tensor in fp32, nor as stored. Quantisation is row-local, so this equals
    quantising the whole tensor."""
    pieces: list[list[Any]] = source.pieces
    stacked = source.stacked

    def shape_of(key: Any) -> Sequence[int]:
        return reader.shape(key[0])[1:] if isinstance(key, tuple) else reader.shape(key)

    def dense_rows(key: Any, r0: int, r1: int) -> torch.Tensor:
        return _dense_rows(reader, key, r0, r1, scales, spec)

    from dsv3.checkpoint.quantized import quantized_rows  # (that module imports this one)

    chunk_elements = chunk_elements or LOAD_CHUNK_ELEMENTS
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, RoutedExperts):
        with torch.device(device):                          # the final (empty) tensors, real this time
            module.set_formats(*(fmt if s == attr else module.formats[s] for s in ("gate_up_proj", "down_proj")))
        target, tname = module, attr
    else:
        assert isinstance(module, nn.Linear) and attr == "weight", name
        target = Linear.from_linear(module, fmt)            # meta tensors in `fmt`, then real ones of the same kinds
        for t in fmt.tensor_names("weight"):
            meta = getattr(target, t)
            real = weight_empty(meta.shape, meta.dtype, device)
            if isinstance(meta, nn.Parameter):
                target._parameters[t] = nn.Parameter(real, requires_grad=False)
            else:
                target._buffers[t] = real
        if module.bias is not None and not module.bias.is_meta:
            target.bias = module.bias
        tname = "weight"
    finals = [getattr(target, t) for t in fmt.tensor_names(tname)]
    if isinstance(module, RoutedExperts) and not stacked:   # one fused tensor [E, rows, in]: expert by expert,
        pieces = [[(pieces[0][0], e)] for e in range(module.num_experts)]   # keys (key, e) for the callbacks
        stacked = True
    for e, group in enumerate(pieces):
        shapes = [tuple(shape_of(key)) for key in group]     # one expert's gate and up pieces (or the matrix)
        total, cols = sum(sh[0] for sh in shapes), shapes[0][-1]
        step = max(ROW_ALIGN, chunk_elements // cols // ROW_ALIGN * ROW_ALIGN)
        for r0 in range(0, total, step):
            r1, parts, start = min(total, r0 + step), [], 0
            for key, sh in zip(group, shapes, strict=True):
                a, b = max(r0, start), min(r1, start + sh[0])
                if a < b:
                    parts.append(dense_rows(key, a - start, b - start))              # [b - a, in] fp32
                start += sh[0]
            dense = torch.cat(parts) if len(parts) > 1 else parts[0]                 # [r1 - r0, in]
            holder = nn.Module()
            fmt.adopt(holder, "weight", dense.to(device))
            del dense, parts
            for final, t in zip(quantized_rows(fmt, finals, e if stacked else None, r0, r1),
                                (getattr(holder, n) for n in fmt.tensor_names("weight")), strict=True):
                final.copy_(t)
    if not isinstance(module, RoutedExperts):
        owner_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(owner_name) if owner_name else model, child, target)
