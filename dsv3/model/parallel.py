"""The tensor- and expert-parallel plan of DeepSeek-V3 as data, and `shard_model`, which applies it to a model.

World size W, rank r. Which tensor is split how (names are suffixes of the model's tensor names; every other
tensor — q_a_proj, kv_a_proj_with_mqa, all norms, the router and its bias, eh_proj — is replicated):

    tensor                                            split along          what the rank holds
    self_attn.{q_proj,q_b_proj}.weight  [H·(dn+dr), ·] dim 0, by heads     heads [r·H/W, (r+1)·H/W)
    self_attn.kv_b_proj.weight          [H·(dn+dv), r] dim 0, by heads     the same heads
    self_attn.o_proj.weight             [D, H·dv]      dim 1, by heads     their input columns (row-parallel)
    self_attn.o_proj.bias               [D]            first rank only     the others hold zeros
    mlp.{gate,up}_proj.weight           [I, D]         dim 0, ffn          a slice of the intermediate channels
    mlp.down_proj.weight                [D, I]         dim 1, ffn          the same channels (row-parallel)
      (dense MLPs and shared experts: mlp.shared_experts.*)
    mlp.experts.{gate_up_proj,down_proj} [E, ·, ·]     dim 0, experts      experts [r·E/W, (r+1)·E/W)
    embed_tokens.weight                 [V, D]         dim 0, vocabulary   rows split(V) (may be uneven)
    lm_head.weight, shared_head.head.weight [V, D]     dim 0, vocabulary   the same rows
    X_scale_inv (FP8 held as stored)                   as X, in blocks     the block rows/columns covering it

How the partial results meet (each layer holds the `ParallelContext` it was handed, never a global):
attention sums the ranks' o_proj products (one all-reduce); a dense MLP sums its down_proj products (one
all-reduce); an MoE layer runs the router in full on every rank (tokens are replicated), computes only the
(token, expert) pairs of its own experts, adds its share of the shared expert and sums both in ONE all-reduce
(fp32); the embedding looks up its vocabulary slice and zeros the rest, then all-reduces; the LM heads
all-gather their vocabulary slices, so `forward` returns full-vocabulary logits on every rank. Every rank keeps
the whole latent cache (576 values per token in V3): the latent is shared by all heads.

Split points: heads and experts must divide by W (a ValueError names the numbers and the world sizes that
work); the vocabulary splits as evenly as possible; the intermediate channels split in whole units of `ffn_unit`
(the FP8 block size when the checkpoint is block-FP8, so every rank's slice starts on a block boundary).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from dsv3.config import DeepseekV3Config
from dsv3.model.attention import MultiHeadLatentAttention
from dsv3.model.moe import RoutedExperts
from dsv3.model.weights import Linear
from dsv3.parallel.context import SINGLE, ParallelContext
from dsv3.quant.formats import SCALE_INV, Fp8Blocks, Plain


@dataclass(frozen=True)
class Split:
    """How one tensor is divided: along `dim`, by `axis` ("heads" | "experts" | "ffn" | "vocab"), or held by
    the first rank only (`axis="first"`: a bias added once to a sum over the ranks)."""

    axis: str
    dim: int = 0


PLAN: tuple[tuple[re.Pattern[str], Split], ...] = tuple((re.compile(pattern), split) for pattern, split in (
    (r"self_attn\.(q_proj|q_b_proj|kv_b_proj)\.weight$", Split("heads", 0)),
    (r"self_attn\.o_proj\.weight$", Split("heads", 1)),
    (r"self_attn\.o_proj\.bias$", Split("first")),
    (r"mlp\.(shared_experts\.)?(gate_proj|up_proj)\.weight$", Split("ffn", 0)),
    (r"mlp\.(shared_experts\.)?down_proj\.weight$", Split("ffn", 1)),
    (r"mlp\.experts\.(gate_up_proj|down_proj)$", Split("experts", 0)),
    (r"(^|\.)embed_tokens\.weight$", Split("vocab", 0)),
    (r"(^|\.)(lm_head|shared_head\.head)\.weight$", Split("vocab", 0)),
))


def plan_of(name: str) -> Split | None:
    """The split of tensor `name` (an FP8 `X_scale_inv` follows X), or None: replicated."""
    base = name.removesuffix(SCALE_INV)
    for pattern, split in PLAN:
        if pattern.search(base):
            return split
    return None


@dataclass(frozen=True)
class Region:
    """This rank's part of a full tensor: [start, stop) of `full` along `dim`; `zero`: the rank holds zeros."""

    dim: int
    start: int
    stop: int
    full: int
    zero: bool = False

    def narrow(self, t: torch.Tensor) -> torch.Tensor:
        if self.zero:
            return torch.zeros_like(t)
        return t.narrow(self.dim, self.start, self.stop - self.start)


def check_world_size(config: DeepseekV3Config, world_size: int) -> None:
    """Heads and routed experts must divide by the world size; a ValueError names both and what would work."""
    heads = config.num_attention_heads
    experts = config.n_routed_experts if any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)) else 0
    counts = {"num_attention_heads": heads, **({"n_routed_experts": experts} if experts else {})}
    bad = {k: v for k, v in counts.items() if v % world_size}
    if bad or config.vocab_size < world_size:
        common = math.gcd(*counts.values())
        working = [w for w in range(1, common + 1) if common % w == 0 and w <= config.vocab_size]
        what = ", ".join(f"{k}={v}" for k, v in bad.items()) or f"vocab_size={config.vocab_size}"
        raise ValueError(
            f"cannot shard this model over {world_size} processes: {what} is not divisible by the world size "
            f"{world_size} (" + ", ".join(f"{k}={v}" for k, v in counts.items()) + " must both divide). World "
            f"sizes that work: {working}; start that many processes (torchrun --nproc_per_node=...).")


def _region(name: str, split: Split, t: torch.Tensor, config: DeepseekV3Config, parallel: ParallelContext,
            ffn_unit: int) -> Region:
    size = t.shape[split.dim]
    if split.axis == "first":
        return Region(split.dim, 0, size, size, zero=parallel.rank != 0)
    if split.axis == "ffn":
        start, stop = parallel.split(size, ffn_unit)
        return Region(split.dim, start, stop, size)
    items = {"heads": config.num_attention_heads, "experts": config.n_routed_experts,
             "vocab": config.vocab_size}[split.axis]
    assert size % items == 0, (name, size, items)
    per = size // items
    first, last = parallel.split(items)
    return Region(split.dim, first * per, last * per, size)


def _scale_region(name: str, weight: Region, block: tuple[int, int], stacked: bool) -> Region:
    """The block rows/columns of `name` (an FP8 scale grid) that hold the scales of the weight's `weight` part."""
    if stacked and weight.dim == 0:          # experts: whole grids
        return weight
    b = block[weight.dim - (1 if stacked else 0)]
    blocks = -(-weight.full // b)
    if weight.start == weight.stop:          # a rank past the last unit of a small dim: nothing, no scales
        return Region(weight.dim, blocks, blocks, blocks)
    if weight.start % b or (weight.stop % b and weight.stop != weight.full):
        raise ValueError(
            f"{name}: this rank's part [{weight.start}, {weight.stop}) of dim {weight.dim} (size {weight.full}) "
            f"does not start and end on the FP8 block size {b}, so it cannot be held as FP8 blocks; load with "
            "fp8='dequantize' (the default), or use a world size whose split falls on block boundaries")
    return Region(weight.dim, weight.start // b, -(-weight.stop // b), blocks)


def shard_regions(model: nn.Module, config: DeepseekV3Config, parallel: ParallelContext,
                  ffn_unit: int = 1) -> dict[str, Region]:
    """{tensor name: this rank's Region} for every split tensor of `model` (full-size, meta or not)."""
    regions: dict[str, Region] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        tensors = {**module._parameters, **module._buffers}
        for attr, t in tensors.items():
            name = f"{mod_name}.{attr}" if mod_name else attr
            split = plan_of(name)
            if t is None or split is None or attr.endswith(SCALE_INV):
                continue
            regions[name] = _region(name, split, t, config, parallel, ffn_unit)
            scale = tensors.get(attr + SCALE_INV)
            if scale is not None:
                fmt = module.formats[attr] if isinstance(module, RoutedExperts) else module.format
                assert isinstance(fmt, Fp8Blocks), (name, fmt)
                regions[name + SCALE_INV] = _scale_region(name, regions[name], fmt.block_size, t.dim() == 3)
    return regions


def shard_model(model: nn.Module, parallel: ParallelContext, ffn_unit: int = 1) -> dict[str, Region]:
    """Shard `model` in place for rank `parallel.rank` of `parallel.world_size` according to PLAN and hand every
    layer the context; returns {tensor name: Region} of the split tensors (what the loader reads).

    On the meta device (how from_pretrained uses it) only shapes change; a loaded model's tensors are sliced
    (each rank keeps a copy of its part). Plain and FP8-block weights can be sharded; int8/int4 ones cannot
    (quantise after sharding: from_pretrained(..., quantization=..., parallel=...)). ffn_unit: split the
    intermediate channels in whole units of this many (the FP8 block size for block-FP8 weights).
    """
    config: DeepseekV3Config = model.config  # type: ignore[assignment]
    if getattr(model, "parallel", SINGLE).is_parallel:
        raise ValueError(f"the model is already sharded ({model.parallel}); build or load it again to re-shard")
    check_world_size(config, parallel.world_size)
    for name, module in model.named_modules():
        formats = module.formats.values() if isinstance(module, RoutedExperts) else \
            [module.format] if isinstance(module, Linear) else []
        odd = [f for f in formats if not isinstance(f, (Plain, Fp8Blocks))]
        if odd:
            raise ValueError(f"{name}: weights held as {odd[0]} cannot be sharded; shard first, then quantise "
                             "(from_pretrained(..., quantization=..., parallel=...))")
    regions = shard_regions(model, config, parallel, ffn_unit)
    if not parallel.is_parallel:
        return regions
    done: dict[int, torch.Tensor] = {}   # tied tensors (lm_head = embed_tokens, MTP sharing the main ones): once
    with torch.no_grad():
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for store in (module._parameters, module._buffers):
                for attr, t in list(store.items()):
                    name = f"{mod_name}.{attr}" if mod_name else attr
                    if t is None or name not in regions:
                        continue
                    if id(t) not in done:
                        part = regions[name].narrow(t).clone()
                        done[id(t)] = nn.Parameter(part, requires_grad=t.requires_grad) \
                            if isinstance(t, nn.Parameter) else part
                    store[attr] = done[id(t)]
    for module in model.modules():
        if isinstance(module, (nn.Linear, Linear)):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, MultiHeadLatentAttention):
            module.num_heads = config.num_attention_heads // parallel.world_size
        elif isinstance(module, RoutedExperts):
            module.first_expert, stop = parallel.split(module.num_experts)
            module.num_local_experts = stop - module.first_expert
        if "parallel" in vars(module):   # every layer that combines partial results declares its context
            module.parallel = parallel
    return regions
