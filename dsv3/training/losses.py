"""DeepSeek-V3's training objectives.

Symbols: T tokens per sequence, K_mtp MTP depth (1), E routed experts, k experts per token,
λ MTP weight (0.3, later 0.1), α sequence-wise balance weight (1e-4).

    L_main = CE(logits_i, t_{i+1})                                 causal_lm_loss (transformer.py)
    L_mtp  = λ/K_mtp · Σ_k CE(mtp_logits^k_i, t_{i+k+2})           module k sees h^{k-1}_i and t_{i+k+1}
    L_bal  = α · Σ_layers mean_seq Σ_e f_e·P_e                     sequence-wise balance (eq. 17-20)
        f_e = E/(k·T) · Σ_t 1[e routed for token t]                (no gradient)
        P_e = 1/T · Σ_t s'_{e,t},   s'_{e,t} = s_{e,t} / Σ_j s_{j,t}   (normalised sigmoid affinities)
    L = L_main + L_mtp + L_bal

MTP module k runs over positions 0 .. T-k-2, the ones whose input token t_{i+k+1} exists; the last of
them has no target either (t_{T} is past the end) and is ignored. The indicator in f_e counts the experts
actually chosen (bias-corrected, group-limited top-k), as training implementations do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.moe import RouterOutput
from dsv3.model.transformer import causal_lm_loss

IGNORE_INDEX = -100


def mtp_losses(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               router_sink: list[RouterOutput] | None = None, ignore_index: int = IGNORE_INDEX,
               **kwargs: object) -> list[torch.Tensor]:
    """Cross entropy of each MTP module, [L_1 .. L_K], for sequences input_ids [B, T] whose main-model
    final-normed hidden states are `hidden` [B, T, D]. labels default to input_ids (-100 = ignored)."""
    if labels is None:
        labels = input_ids
    depth = len(getattr(model, "mtp", None) or [])
    b, t = input_ids.shape
    if depth and t < depth + 2:
        raise ValueError(f"sequences of {t} tokens are too short for {depth} MTP module(s): module k predicts "
                         f"t_(i+k+2), so at least {depth + 2} tokens are needed")
    losses = []
    h = hidden
    for k in range(depth):
        n = t - k - 1                                                    # positions with an input token
        next_ids = input_ids[:, k + 1: k + 1 + n]                        # t_{i+k+1}
        target = F.pad(labels[:, k + 2:], (0, 1), value=ignore_index)   # t_{i+k+2}; none for the last
        pos = None if position_ids is None else position_ids[..., :n]
        mask = None if attention_mask is None else attention_mask[:, :n]
        logits, h = model.mtp_forward(h[:, :n], next_ids, pos, None, mask, k, router_sink=router_sink,  # type: ignore[operator]
                                      **kwargs)
        losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                      target.reshape(-1).to(logits.device), ignore_index=ignore_index))
    return losses


def sequence_balance_loss(router_outputs: Sequence[RouterOutput], batch_size: int,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over MoE layers of the per-sequence Σ_e f_e·P_e, averaged over sequences (multiply by α).

    Each RouterOutput covers batch_size·T_l tokens in [B, T_l] order (T_l is T for the main layers and
    shorter for MTP modules); attention_mask [B, T] (1 = real token) excludes padding from f and P."""
    total = None
    for route in router_outputs:
        n, e = route.scores.shape
        k = route.indices.shape[1]
        t = n // batch_size
        assert t * batch_size == n, "router outputs do not cover whole sequences"
        s = route.scores.view(batch_size, t, e)
        s_norm = s / s.sum(-1, keepdim=True)                                            # s'
        chosen = torch.zeros(n, e, device=s.device).scatter_(1, route.indices, 1.0).view(batch_size, t, e)
        if attention_mask is None:
            m = torch.ones(batch_size, t, 1, device=s.device)
        else:
            m = attention_mask[:, :t].to(device=s.device, dtype=torch.float32)[..., None]
        tokens = m.sum(1).clamp_min(1.0)                                                # [B, 1]
        f = e / (k * tokens) * (chosen * m).sum(1)                                      # [B, E]
        p = (s_norm * m).sum(1) / tokens                                                # [B, E]
        layer = (f * p).sum(-1).mean()
        total = layer if total is None else total + layer
    return total if total is not None else torch.zeros(())


@dataclass
class TrainingLosses:
    loss: torch.Tensor                        # the objective to backpropagate
    lm_loss: torch.Tensor
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    balance_loss: torch.Tensor | None = None  # already times α
    router_outputs: list[RouterOutput] = field(default_factory=list)   # main MoE layers, then MTP ones
    tokens: int = 0

    @property
    def mtp_loss(self) -> torch.Tensor | None:
        """Mean over MTP modules (before λ), or None without MTP."""
        return torch.stack(self.mtp_losses).mean() if self.mtp_losses else None


def training_losses(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    mtp_weight: float = 0.3, balance_alpha: float = 0.0, **kwargs: object) -> TrainingLosses:
    """One forward of the main model and its MTP modules: L_main + λ/K·Σ L_mtp + α·L_bal."""
    if labels is None:
        labels = input_ids
    out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels, use_cache=False,
                output_router_outputs=True, **kwargs)
    mtp_routes: list[RouterOutput] = []
    mtp = mtp_losses(model, out.last_hidden_state, input_ids, labels, position_ids, attention_mask, mtp_routes,
                     **kwargs) if mtp_weight else []
    # A snapshot: with gradient checkpointing the backward pass re-runs the layers, which report again.
    routes = list(out.router_outputs or []) + mtp_routes
    loss = out.loss
    if mtp:
        loss = loss + mtp_weight * torch.stack(mtp).mean()
    balance = None
    if balance_alpha:
        balance = balance_alpha * sequence_balance_loss(routes, input_ids.shape[0], attention_mask)
        loss = loss + balance
    return TrainingLosses(loss, out.loss, mtp, balance, routes, int(input_ids.numel()))


__all__ = ["IGNORE_INDEX", "TrainingLosses", "causal_lm_loss", "mtp_losses", "sequence_balance_loss",
           "training_losses"]
