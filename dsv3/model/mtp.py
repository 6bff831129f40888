"""Multi-Token Prediction (MTP): extra decoder layers that predict one more token ahead.

Symbols (V3 sizes): D hidden (7168), V vocab (129280), L = num_hidden_layers (61), K MTP modules
(num_nextn_predict_layers, 1), B batch, S positions, t_i the token at position i.

MTP module k (0-based) lives at `model.mtp[k]` and in checkpoints at layer L+k (`model.layers.61.*`):

    h^{-1}_i = the main model's final-normed hidden state at position i       [B, S, D]
    x_i      = eh_proj(cat[enorm(embed(t_{i+k+1})), hnorm(h^{k-1}_i)])        [B, S, 2D] -> [B, S, D]
    h^k_i    = Block_k(x_i)          a full MoE decoder layer; attention uses cache slot L+k
    logits_i = shared_head.head(shared_head.norm(h^k_i))  predicts t_{i+k+2}  [B, S, V]

The embedding comes first in the concatenation. Each module has `embed_tokens` and `shared_head.head`
slots: checkpoints store them as separate tensors (the published V3 one holds copies of the main ones),
and a model is built and loaded with separate copies, so a checkpoint whose copies differ keeps its
behaviour. DeepSeek-V3 trains MTP with the main model's embedding and output head: `share_main_weights`
makes the slots the main model's very Parameters (training ties them for a new model and for a
checkpoint whose copies are equal; see dsv3.training.trainer). Deeper modules chain on h^k, the block
output before `shared_head.norm`.

Training runs a module over whole sequences (losses.mtp_loss). Drafting for speculative decoding runs it
on the positions the main model has just committed, with the main model's cache: right after a main
forward over s tokens (cache length n), `mtp_forward(h[:, -s:], next_ids, cache=cache)` writes slot L+k
for the same positions n-s .. n-1, where next_ids are the tokens one step further (the last one is the
token just sampled). The MTP slot thereby stays exactly as long as the main layers (the cache's
per-row lengths are not moved: the MTP pass rewrites the slots the main pass committed), and
`cache.crop` rolls back both together. Call it after every main forward, prefill included, so no
position is skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.cache import CacheStep, LatentCache
from dsv3.config import DeepseekV3Config
from dsv3.model.attention import build_attention_mask
from dsv3.model.block import DecoderLayer, RunOptions, RunSinks, run_layer
from dsv3.model.moe import RouterOutput
from dsv3.model.norm import RMSNorm
from dsv3.parallel.context import SINGLE, ParallelContext


class SharedHead(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vocab_size = config.vocab_size
        self.parallel: ParallelContext = SINGLE   # sharded: `head` holds a vocabulary slice, logits gathered

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.parallel.gather_vocab(self.head(self.norm(h)), self.vocab_size)


class MTPLayer(DecoderLayer):
    """A decoder layer at index L+k (its `forward` is the block) plus the MTP input and output parts.
    The child names are the checkpoint's, so `mtp.k.X` <-> `model.layers.{L+k}.X` is the whole key map."""

    def __init__(self, config: DeepseekV3Config, k: int) -> None:
        super().__init__(config, config.num_hidden_layers + k)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d, config.pad_token_id)
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.shared_head = SharedHead(config)
        self.vocab_size = config.vocab_size
        self.parallel: ParallelContext = SINGLE   # sharded: embed_tokens holds a vocabulary slice

    def combine(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """eh_proj(cat[enorm(embed(next_ids)), hnorm(hidden)]): [B, S, D] and [B, S] -> [B, S, D]."""
        e = self.enorm(self.parallel.embed(self.embed_tokens, next_ids, self.vocab_size))
        return self.eh_proj(torch.cat([e, self.hnorm(hidden).to(e.dtype)], dim=-1))


def build_mtp_layers(config: DeepseekV3Config, enabled: bool | None = None) -> nn.ModuleList | None:
    """The MTP modules, or None: `enabled=None` builds them when the config has any
    (num_nextn_predict_layers > 0), False never, True requires the config to have some."""
    if enabled is True and config.num_mtp_layers == 0:
        raise ValueError("mtp=True but config.num_nextn_predict_layers=0: set num_nextn_predict_layers "
                         "(1 for DeepSeek-V3) to build MTP modules")
    if enabled is False or config.num_mtp_layers == 0:
        return None
    return nn.ModuleList(MTPLayer(config, k) for k in range(config.num_mtp_layers))


def mtp_weight_pairs(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, MTP module, main module) for every MTP embedding and output head: the pairs DeepSeek-V3 shares."""
    pairs: list[tuple[str, nn.Module, nn.Module]] = []
    for k, layer in enumerate(getattr(model, "mtp", None) or []):
        pairs.append((f"mtp.{k}.embed_tokens", layer.embed_tokens, model.model.embed_tokens))  # type: ignore[attr-defined]
        pairs.append((f"mtp.{k}.shared_head.head", layer.shared_head.head, model.lm_head))  # type: ignore[attr-defined]
    return pairs


def shares_main_weights(model: nn.Module) -> bool:
    """True when every MTP embedding and output head is the main model's Parameter (and there is MTP)."""
    pairs = mtp_weight_pairs(model)
    return bool(pairs) and all(mtp.weight is main.weight for _, mtp, main in pairs)


@torch.no_grad()
def main_weight_difference(model: nn.Module) -> float:
    """max |MTP copy - main| over the embeddings and output heads (0.0 when shared or equal)."""
    diffs = [float((mtp.weight.float() - main.weight.float()).abs().max()) for _, mtp, main in
             mtp_weight_pairs(model) if mtp.weight is not main.weight]
    return max(diffs, default=0.0)


def share_main_weights(model: nn.Module, shared: bool = True) -> None:
    """shared=True: each MTP module uses the main model's embedding and output head (the same Parameters,
    so both losses train one tensor); its own copies are dropped. shared=False: give each MTP module its own
    copy of the tensors it holds now (a tied model becomes an untied one with equal values)."""
    for _, mtp, main in mtp_weight_pairs(model):
        if shared:
            mtp.weight = main.weight
        elif mtp.weight is main.weight:
            mtp.weight = nn.Parameter(main.weight.detach().clone(), requires_grad=main.weight.requires_grad)


def mtp_forward(model: nn.Module, hidden: torch.Tensor, next_ids: torch.Tensor,
                position_ids: torch.Tensor | None = None, cache: LatentCache | None = None,
                attention_mask: torch.Tensor | None = None, k: int = 0, mla_path: str = "auto",
                moe_dispatch: str = "auto", router_sink: list[RouterOutput] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run MTP module k of a DeepseekV3ForCausalLM: (logits [B, S, V], hidden h^k [B, S, D]).

    hidden: h^{k-1} — the main model's final-normed hidden states for k=0; next_ids: t_{i+k+1} per position.
    position_ids: [B, S] or [S]; default: the positions these S tokens occupy (0.. without a cache).
    cache: a latent cache with slot L+k (see the module docstring for which positions are written).
    attention_mask: 2-D padding mask over all cached + new positions, as for the main model.
    router_sink: receives the MoE layer's RouterOutput (training statistics).
    """
    layers = getattr(model, "mtp", None)
    if layers is None or not 0 <= k < len(layers):
        have = 0 if layers is None else len(layers)
        raise ValueError(f"MTP module k={k} requested but the model has {have}; build it with "
                         "num_nextn_predict_layers > 0 (from_pretrained loads it when the checkpoint has "
                         "model.layers.{num_hidden_layers}.*)")
    layer: MTPLayer = layers[k]
    if next_ids.dim() != 2 or hidden.shape[:2] != next_ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and next_ids {tuple(next_ids.shape)}: expected "
                         "[B, S, D] and [B, S] over the same positions")
    b, s = next_ids.shape
    slot = layer.self_attn.layer_idx
    device = hidden.device
    step = CacheStep(s, 0, s)
    if cache is not None:
        if cache.num_layers <= slot:
            raise ValueError(f"the cache has {cache.num_layers} layer slots but MTP module {k} uses slot {slot}; "
                             f"create it with num_layers >= {slot + 1} (the model's own caches, and "
                             "generate.make_cache, include the MTP layers)")
        step = cache.rewrite_step(s, device)   # the slots the main model just wrote; lengths stay as they are
    if position_ids is None:
        position_ids = step.slots(b, device)
    elif position_ids.dim() == 1:
        position_ids = position_ids.view(1, s).expand(b, s)
    if attention_mask is not None and attention_mask.shape[-1] < step.span:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}: expected [batch={b}, "
                         f"cached+new >= {step.span}]")
    mask = build_attention_mask(attention_mask, step.start, s, device, step.positions, step.span)
    freqs_cis = model.model.rotary_emb(position_ids)  # type: ignore[attr-defined]
    x = layer.combine(hidden, next_ids)
    h = run_layer(layer, x, freqs_cis, mask, cache.view(step) if cache is not None else None,
                  RunOptions(mla_path, moe_dispatch, unpadded=attention_mask is None),
                  RunSinks(router_sink),
                  checkpointed=model.model.gradient_checkpointing and model.training)  # type: ignore[attr-defined]
    return layer.shared_head(h), h
