"""Load balancing for DeepSeekMoE: the auxiliary-loss-free bias update and load statistics.

Symbols: E routed experts, n_l the tokens routed to expert l in one optimizer step (summed over the
micro-batches of that step), γ the bias update speed (0.001 in DeepSeek-V3).

    after each optimizer step, per MoE layer:   b_l <- b_l + γ · sign(mean_j n_j − n_l)

b is the router's `e_score_correction_bias`: a buffer that only steers the top-k choice (the gate
weights use the unbiased scores), so it gets no gradient and the optimizer never sees it. An
overloaded expert's bias falls, an underloaded one's rises.

Imbalance is reported as max_l n_l / mean_l n_l per layer (1 = perfectly balanced, E/k = every token
on the same k experts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dsv3.model.moe import MoE, Router, RouterOutput


def moe_routers(model: nn.Module, include_mtp: bool = True) -> list[Router]:
    """The routers of a DeepseekV3ForCausalLM in the order its forward reports RouterOutputs: the MoE
    layers of the main model, then those of the MTP modules (losses.training_losses appends them last)."""
    layers = list(model.model.layers)  # type: ignore[attr-defined]
    if include_mtp:
        layers += list(getattr(model, "mtp", None) or [])
    return [layer.mlp.gate for layer in layers if isinstance(layer.mlp, MoE)]


def expert_counts(router_outputs: Sequence[RouterOutput], num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, per layer: [num_layers, E] (fp32, no gradient)."""
    rows = [torch.bincount(r.indices.detach().reshape(-1), minlength=num_experts) for r in router_outputs]
    if not rows:
        return torch.zeros(0, num_experts)
    return torch.stack(rows).float()


def load_imbalance(counts: torch.Tensor) -> torch.Tensor:
    """max / mean expert load per layer: counts [num_layers, E] -> [num_layers]."""
    return counts.max(-1).values / counts.mean(-1).clamp_min(1e-9)


@torch.no_grad()
def update_router_bias(routers: Sequence[Router], counts: torch.Tensor, gamma: float) -> None:
    """b <- b + γ·sign(mean(load) − load), one row of `counts` [num_layers, E] per router."""
    if len(routers) != counts.shape[0]:
        raise ValueError(f"{counts.shape[0]} rows of expert counts for {len(routers)} routers: count every MoE "
                         "layer of the step, in the order moe_routers() lists them")
    for router, load in zip(routers, counts):
        bias = router.e_score_correction_bias
        load = load.to(device=bias.device, dtype=torch.float32)
        bias.add_(gamma * torch.sign(load.mean() - load))


class ExpertLoadBalancer:
    """Accumulates expert loads over an optimizer step's micro-batches, then applies the bias update.

    Observe each micro-batch's router outputs right after its forward (with gradient checkpointing the
    backward pass re-runs the layers and would report them again).
    """

    def __init__(self, model: nn.Module, gamma: float = 1e-3, include_mtp: bool = True) -> None:
        self.routers = moe_routers(model, include_mtp)
        self.num_experts = self.routers[0].num_experts if self.routers else 0
        self.gamma = gamma
        self.counts: torch.Tensor | None = None

    def observe(self, router_outputs: Sequence[RouterOutput]) -> None:
        if len(router_outputs) != len(self.routers):
            raise ValueError(f"{len(router_outputs)} router outputs for {len(self.routers)} MoE layers: run the "
                             "forward with output_router_outputs=True and include the MTP layers")
        counts = expert_counts(router_outputs, self.num_experts).cpu()
        self.counts = counts if self.counts is None else self.counts + counts

    def step(self) -> dict[str, float]:
        """Update the biases from the loads observed since the last step; returns load statistics."""
        if self.counts is None or not self.routers:
            return {}
        counts, self.counts = self.counts, None
        if self.gamma:
            update_router_bias(self.routers, counts, self.gamma)
        ratio = load_imbalance(counts)
        return {"imbalance": float(ratio.mean()), "imbalance_max": float(ratio.max())}
