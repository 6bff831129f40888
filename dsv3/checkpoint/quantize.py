"""`from_pretrained(path, quantization="int8" | "int4")`: weight-only quantisation while loading.

Which tensors (decided on the meta model, before any data is read — `plan_quantization`):

    every decoder linear (MLA projections, dense MLP, shared experts), every routed-expert stack, MTP's eh_proj
        int8: Int8PerChannel; int4: Int4Grouped with groups of `group_size` (128) inputs, smaller (64, 32)
        where the input width needs it, int8 for a matrix no group size divides
    LM heads (lm_head, MTP's shared_head.head)
        Int8PerChannel in both modes: the head decides every token and int8 keeps it within the quality bar;
        it is one matrix, so int4 would save little (llama.cpp's Q4_K_M keeps its output matrix at 6 bits too)
    embeddings, norms, the router (fp32 by the numerics policy)
        as loaded: an embedding lookup reads only the rows of the step's tokens, so quantising it saves memory
        but no time
    a weight held by two modules (tie_word_embeddings' head = embedding) stays as loaded

How (`quantize_loaded`, called by the loader right after each tensor is read): the dense tensor, read in
fp32 (FP8 checkpoints dequantised into it), is quantised in bounded chunks of rows and dropped before the next
tensor is read — peak memory is the quantised model plus one dense tensor (in fp32) and the chunk temporaries.

int4 packing: "rows" (portable; what dsv3's int4 CPU kernels read) wherever those kernels run (x86-64 with AVX2 or
AVX-512 VNNI, dsv3.kernels.int_kernels.best_isa); else "cpu" (the layout of PyTorch's int4 pack op, so decode uses
`_weight_int4pack_mm_for_cpu`) where that op writes a layout dsv3 reads (intq.cpu_layout_supported) and the
matrix has a multiple of 64 rows; "rows" (dequantised per tile) otherwise. The choice is logged.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from dsv3.kernels import int_kernels
from dsv3.model.moe import RoutedExperts
from dsv3.model.weights import Linear
from dsv3.quant import intq
from dsv3.quant.formats import WeightFormat
from dsv3.quant.int_formats import Int4Grouped, Int8PerChannel

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "int4")
HEADS = ("lm_head", "shared_head.head")


def check_quantization(quantization: str | None, fp8: str) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {QUANTIZATIONS} or None (weights as "
                         "loaded)")
    if quantization is not None and fp8 == "keep":
        raise ValueError(f"quantization={quantization!r} with fp8='keep': choose one — FP8 weights held as stored, "
                         "or weights quantised to int8/int4 while loading (fp8='dequantize', the default)")


def _int4(out: int, cols: int, group_size: int, device: torch.device) -> WeightFormat:
    g = intq.int4_group_size(cols, group_size)
    if g is None:
        return Int8PerChannel()
    # "rows" wherever dsv3's int4 CPU kernels run (they read only that packing and beat the pack op:
    # dsv3/kernels/int_kernels.py); PyTorch's "cpu" packing only where its pack op is the fastest decode path
    cpu = (device.type == "cpu" and out % intq.CPU_BLOCK_ROWS == 0 and int_kernels.best_isa() is None
           and intq.cpu_layout_supported())
    return Int4Grouped(group_size=g, layout="cpu" if cpu else "rows")


def plan_quantization(model: nn.Module, quantization: str, device: torch.device,
                      group_size: int = 128) -> dict[str, WeightFormat]:
    """{model tensor name: format} for the tensors `quantization` replaces (see the module docstring)."""
    holders = Counter(id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)))
    plan: dict[str, WeightFormat] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Linear)):
            if isinstance(module, nn.Linear) and holders[id(module.weight)] > 1:
                logger.info("%s: weight shared with another module (tied), kept as loaded", name)
                continue
            head = name == HEADS[0] or name.endswith("." + HEADS[1])
            if quantization == "int8" or head:
                plan[f"{name}.weight"] = Int8PerChannel()
            else:
                plan[f"{name}.weight"] = _int4(module.out_features, module.in_features, group_size, device)
        elif isinstance(module, RoutedExperts):
            i, d = module.intermediate, module.hidden
            for stack, (out, cols) in (("gate_up_proj", (2 * i, d)), ("down_proj", (d, i))):
                plan[f"{name}.{stack}"] = (Int8PerChannel() if quantization == "int8"
                                           else _int4(out, cols, group_size, device))
    kinds = Counter(repr(f) for f in plan.values())
    logger.info("quantization=%r: %d tensors quantised while loading (%s)", quantization, len(plan),
                ", ".join(f"{n}× {k}" for k, n in kinds.items()))
    return plan


def quantize_loaded(model: nn.Module, tensor_name: str, fmt: WeightFormat) -> None:
    """Hold the just-loaded dense tensor `tensor_name` in `fmt`: a linear's weight becomes a `Linear` in that
    format (its bias, loaded or not yet, carries over), an expert stack adopts it."""
    module_name, _, attr = tensor_name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, RoutedExperts):
        module.adopt_format(attr, fmt)
        return
    assert isinstance(module, nn.Linear) and attr == "weight", tensor_name
    owner_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, child, Linear.from_linear(module, fmt))
