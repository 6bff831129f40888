"""One DeepSeek-V3 decoder block, and the options object every block call carries.

    h = h + MLA(input_layernorm(h))
    h = h + FFN(post_attention_layernorm(h))     FFN = dense SwiGLU (layer < first_k_dense_replace) or DeepSeekMoE

The main model's layers and each MTP module (model/mtp.py) are such blocks. What a forward pass chooses at run
time (`mla_path`, `moe_dispatch`) and which extra outputs it collects (router statistics, attention
probabilities) travel down as one `RunOptions` and one `RunSinks` per call — never as module state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsv3.cache import LatentCacheView
from dsv3.config import DeepseekV3Config
from dsv3.model.attention import MultiHeadLatentAttention
from dsv3.model.moe import MoE, RouterOutput, SwiGLU
from dsv3.model.norm import RMSNorm


@dataclass(frozen=True)
class RunOptions:
    """The runtime choices and extra outputs of one forward pass (the documented forward keywords)."""

    mla_path: str = "auto"                 # "auto" | "naive" | "absorbed" (model/attention.py)
    moe_dispatch: str = "auto"             # "auto" | "grouped" | "gather" (model/moe.py)
    output_hidden_states: bool = False
    output_attentions: bool = False        # each layer's probabilities [B, H, S, T], computed eagerly
    output_router_outputs: bool = False    # each MoE layer's RouterOutput (training statistics)
    check_inputs: bool = True              # host reads that validate ids and detect all-ones masks
    unpadded: bool = False                 # set per forward: no padding mask (the attention is causal only)

    def sinks(self) -> RunSinks:
        return RunSinks([] if self.output_router_outputs else None, [] if self.output_attentions else None)


@dataclass
class RunSinks:
    """Per-call outputs the blocks append to (None: not collected)."""

    routers: list[RouterOutput] | None = None
    attentions: list[torch.Tensor] | None = None


DEFAULT_OPTIONS = RunOptions()


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.mlp: nn.Module = MoE(config) if config.is_moe_layer(layer_idx) else SwiGLU(
            config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None,
                cache: LatentCacheView | None = None, options: RunOptions = DEFAULT_OPTIONS,
                sinks: RunSinks | None = None) -> torch.Tensor:
        """h [B, S, D] -> [B, S, D]; the attention reads and writes this layer's slot of `cache`."""
        sinks = sinks or RunSinks()
        a = self.self_attn(self.input_layernorm(h), freqs_cis, mask, cache, options.mla_path, sinks.attentions,
                           options.unpadded)
        h, x = self.post_attention_layernorm.residual(h, a)   # h + a and its norm (one pass with norm kernels)
        if isinstance(self.mlp, MoE):
            return self.mlp(x, options.moe_dispatch, sinks.routers, residual=h)   # h + MoE(x)
        return h + self.mlp(x)


def run_layer(layer: nn.Module, h: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None,
              cache: LatentCacheView | None, options: RunOptions, sinks: RunSinks, checkpointed: bool) -> torch.Tensor:
    """One decoder block, under activation checkpointing when asked (and gradients are on)."""
    if not (checkpointed and torch.is_grad_enabled()) or sinks.attentions is not None:
        return layer(h, freqs_cis, mask, cache, options, sinks)
    # The backward pass re-runs the layer; a per-call sink keeps that re-run's router outputs out of `sinks`.
    layer_sinks = RunSinks([] if sinks.routers is not None else None)
    h = checkpoint(layer, h, freqs_cis, mask, cache, options, layer_sinks, use_reentrant=False)
    if sinks.routers is not None:
        sinks.routers.extend(layer_sinks.routers or [])
    return h
