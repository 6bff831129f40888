"""DeepSeekMoE: sigmoid router with bias-corrected, group-limited top-k, and stacked experts.

Symbols (V3 sizes): D hidden (7168), E routed experts (256), G groups (8), kg kept groups (4),
k experts per token (8), I = moe_intermediate_size (2048), N tokens.

Router (all fp32, the correction bias is a buffer that gradients never touch):
    s      = sigmoid(x·Wᵀ)                                  [N, E]
    choice = s + b                                          b = e_score_correction_bias
    group score = sum of the top-2 `choice` in each group; keep the kg best groups
    top-k experts on `choice` within kept groups; weights = s gathered (unbiased)
    weights /= sum(weights) + 1e-20  (norm_topk_prob);  weights *= routed_scaling_factor

Experts are SwiGLU MLPs stacked as `gate_up_proj` [E, 2I, D] (gate rows first) and `down_proj`
[E, D, I] — the transformers-5 fused layout — each held in a weight format (dsv3.quant.formats: plain,
block FP8; the format multiplies, so an FP8 stack dequantises only the experts that received tokens).
Two dispatches, no Python loop over experts:
    grouped: sort the N·k (token, expert) pairs by expert and run one grouped GEMM per projection
             (torch grouped_mm over contiguous segments); each used expert's weights are read once.
    gather : index the k chosen experts' weights per token and batch-multiply; for a handful of
             tokens on an accelerator this avoids the sort and segment bookkeeping (`choose_dispatch`).
The weighted sum over a token's experts is accumulated in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import DeepseekV3Config
from dsv3.parallel.context import SINGLE, ParallelContext
from dsv3.quant.formats import PLAIN, ExpertBatch, Plain, WeightFormat, keep_fixed_dtypes

MOE_DISPATCHES = ("auto", "grouped", "gather")


def choose_dispatch(indices: torch.Tensor, device: torch.device) -> str:
    """Gather for at most two tokens on an accelerator; grouped otherwise. On the CPU grouped_mm wins at every
    size (bench shape, one token: 9.6 ms against 49-62 ms per MoE layer, as gathering copies the chosen
    experts' weights), so the CPU always groups."""
    few = indices.numel() <= 2 * indices.shape[-1]
    return "gather" if few and device.type != "cpu" else "grouped"


class SwiGLU(nn.Module):
    """Dense MLP: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts.
    Sharded: gate/up column-parallel, down row-parallel — `partial` is one rank's share of the output."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.parallel: ParallelContext = SINGLE

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        h = self._fused_gate_up(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x) if h is None else h)

    def _fused_gate_up(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate(x))·up(x) from kernels that take both plain weights in one pass (`swiglu`: prefill on AMX),
        or None: the two linears above."""
        gate, up = getattr(self.gate_proj, "format", None), getattr(self.up_proj, "format", None)
        kernels = getattr(gate, "kernels", None)
        if not (isinstance(gate, Plain) and isinstance(up, Plain) and hasattr(kernels, "swiglu")
                and self.gate_proj.bias is None and self.up_proj.bias is None):
            return None
        return kernels.swiglu(x, self.gate_proj.weight, self.up_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(self.partial(x))


@dataclass
class RouterOutput:
    weights: torch.Tensor   # [N, k] fp32, scaled
    indices: torch.Tensor   # [N, k] int64
    scores: torch.Tensor    # [N, E] fp32 sigmoid affinities (for the balance loss)


class Router(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # Numerics policy: the router weight and its correction bias stay fp32 whatever dtype the model
        # is cast to (`model.to(torch.bfloat16)` moves them between devices but never rounds them).
        weight, bias = self.weight.data, self.e_score_correction_bias
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = weight.to(device=self.weight.device, dtype=torch.float32)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(device=self.e_score_correction_bias.device,
                                                   dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> RouterOutput:
        n = x.shape[0]                                                     # x: [N, D]
        # Numerics policy: routing in fp32 even under bf16 autocast (which would run this linear in bf16
        # and send ~1 % of tokens to other experts).
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid()                                          # [N, E]
        choice = scores + self.e_score_correction_bias.float()
        grouped = choice.view(n, self.n_group, -1)                        # [N, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)              # [N, G]
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(n, -1)
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices   # [N, k]
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return RouterOutput(weights * self.routed_scaling_factor, indices, scores)


class RoutedExperts(nn.Module):
    """The E routed SwiGLU experts, stacked. Each stack is held in a weight format (dsv3.quant.formats: plain
    tensors, block FP8, ...) that allocates it under the checkpoint's names and multiplies by it; the format is
    chosen at construction/load (`set_formats`) or swapped for one with kernels after (`model.weights`)."""

    def __init__(self, config: DeepseekV3Config, gate_up: WeightFormat = PLAIN, down: WeightFormat = PLAIN) -> None:
        super().__init__()
        self.num_experts, self.intermediate = config.n_routed_experts, config.moe_intermediate_size
        self.hidden = config.hidden_size
        # Expert parallelism (dsv3/model/parallel.py): the stacks hold experts [first_expert, first_expert +
        # num_local_experts) only; the router still picks among all `num_experts`.
        self.first_expert, self.num_local_experts = 0, self.num_experts
        self.formats: dict[str, WeightFormat] = {}
        self.set_formats(gate_up, down)

    def set_formats(self, gate_up: WeightFormat, down: WeightFormat) -> None:
        """Hold the stacks in these formats. Allocates fresh (empty) tensors when the storage changes — at load
        time, on the meta device; a format of the same storage (e.g. with kernels added) keeps the tensors."""
        e, i, d = self.num_local_experts, self.intermediate, self.hidden
        for name, fmt, shape in (("gate_up_proj", gate_up, (e, 2 * i, d)), ("down_proj", down, (e, d, i))):
            old = self.formats.get(name)
            if old is None or fmt.storage() != old.storage():
                if old is not None and not getattr(self, name).is_meta:
                    raise ValueError(f"RoutedExperts.{name}: cannot convert loaded weights from {old} to {fmt}; "
                                     "choose the format when loading")
                for t in () if old is None else old.tensor_names(name):
                    delattr(self, t)
                fmt.allocate(self, name, shape)
            self.formats[name] = fmt

    def adopt_format(self, name: str, fmt: WeightFormat) -> None:
        """Hold the loaded plain stack `name` in `fmt` from now on: `fmt.adopt` quantises it and the dense
        tensor is dropped (quantisation while loading, one stack at a time)."""
        if self.formats[name].storage() != PLAIN.storage() or getattr(self, name).is_meta:
            raise ValueError(f"RoutedExperts.{name}: adopt_format needs loaded plain weights, not "
                             f"{self.formats[name]} ({'empty' if getattr(self, name).is_meta else 'loaded'})")
        fmt.adopt(self, name, getattr(self, name))
        self.formats[name] = fmt

    @property
    def gate_up_parts(self) -> int:
        """Block grids per expert's gate_up rows: 1 when one grid spans gate and up (a fused checkpoint tensor,
        which cannot be split per expert when saving), else 2 (separate grids, or no grid at all)."""
        return getattr(self.formats["gate_up_proj"], "parts", 2)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        return keep_fixed_dtypes(self, self.formats, fn, recurse)

    def stacked_weights(self, index: torch.Tensor | None = None,
                        dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (gate_up [E', 2I, D], down [E', D, I]) of every expert, or of the experts `index` lists (gather),
        for arithmetic in `dtype` (formats that are not plain tensors dequantise here)."""
        dtype = dtype or torch.bfloat16
        return (self.formats["gate_up_proj"].matrix(self, "gate_up_proj", dtype, index),
                self.formats["down_proj"].matrix(self, "down_proj", dtype, index))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                dispatch: str = "auto") -> torch.Tensor:
        """x [N, D], weights/indices [N, k] -> Σ_k w_k·E_k(x) as [N, D] in fp32 — with expert parallelism, the
        sum over the (token, expert) pairs of this rank's experts only (the other ranks add theirs)."""
        if dispatch not in MOE_DISPATCHES:
            raise ValueError(f"moe_dispatch={dispatch!r}: expected one of {MOE_DISPATCHES}")
        if dispatch == "auto":
            dispatch = choose_dispatch(indices, x.device)
        if dispatch == "gather":
            return self._gather(x, weights, indices)
        return self._grouped(x, weights, indices)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        n, k = indices.shape
        ids = indices.reshape(-1)                                          # [N*k]
        local, owned = self.num_local_experts, None
        if local != self.num_experts:
            # Expert parallelism: pairs of other ranks' experts sort last (as expert `local`), outside every
            # expert's row segment, so no format computes them; no host sync, so a compiled step traces this.
            ids = ids - self.first_expert
            owned = (ids >= 0) & (ids < local)
            ids = torch.where(owned, ids, local)
        ids, order = ids.sort(stable=True)                                 # [N*k] sorted by expert
        token = order // k                                                 # source token of each row
        if owned is None:
            batch = ExpertBatch.from_sorted(ids, self.num_experts)
        else:   # the trailing rows keep a valid id (the last expert) for formats that index by row
            counts = torch.bincount(ids, minlength=local + 1)[:local]
            batch = ExpertBatch(ids.clamp(max=local - 1), counts, counts.cumsum(0).to(torch.int32))
        if owned is None and (out := self._fused(x, weights, order, batch.ids)) is not None:
            return out
        xs = x[token]                                                      # [N*k, D] sorted by expert
        h = self.formats["gate_up_proj"].grouped(self, "gate_up_proj", xs, batch)   # [N*k, 2I]
        gate, up = h.split(self.intermediate, dim=-1)
        y = self.formats["down_proj"].grouped(self, "down_proj", F.silu(gate) * up, batch)   # [N*k, D]
        y = y.float().mul_(weights.reshape(-1)[order, None])   # in place: a copy (bf16), or a fresh fp32 output
        if owned is not None:   # rows past the owned segments hold whatever the format left there
            y = torch.where(owned[order, None], y, 0.0)
        return torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, y)

    def _fused(self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
               ids: torch.Tensor) -> torch.Tensor | None:
        """Σ_k w_k·E_k(x) [N, D] fp32 from kernels that fuse the layer (`moe_experts`: gather, SwiGLU, weights
        and the sum over each token's experts around the two products), or None: the per-weight path below."""
        gate_up, down = self.formats["gate_up_proj"], self.formats["down_proj"]
        kernels = getattr(gate_up, "kernels", None)
        if kernels is None or not hasattr(kernels, "moe_experts"):
            return None
        return kernels.moe_experts(x, weights, order, ids, gate_up.expert_operands(self, "gate_up_proj"),
                                   down.expert_operands(self, "down_proj"))

    def _gather(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        n, k = indices.shape
        flat = indices.reshape(-1)
        if self.num_local_experts != self.num_experts:   # expert parallelism: other ranks' pairs weigh 0
            flat = flat - self.first_expert
            owned = (flat >= 0) & (flat < self.num_local_experts)
            flat = flat.clamp(0, self.num_local_experts - 1)
            weights = weights.masked_fill(~owned.view(n, k), 0.0)
        xs = x.repeat_interleave(k, dim=0)[:, :, None]                     # [N*k, D, 1]
        w_gate_up, w_down = self.stacked_weights(flat, x.dtype)            # [N*k, 2I, D], [N*k, D, I]
        h = torch.bmm(w_gate_up, xs).squeeze(-1)                           # [N*k, 2I]
        gate, up = h.split(self.intermediate, dim=-1)
        y = torch.bmm(w_down, (F.silu(gate) * up)[:, :, None]).squeeze(-1)   # [N*k, D]
        return (y.float().view(n, k, -1) * weights[..., None]).sum(1)

    def extra_repr(self) -> str:
        local = "" if self.num_local_experts == self.num_experts else \
            f" (this rank: {self.first_expert}..{self.first_expert + self.num_local_experts - 1})"
        return (f"experts={self.num_experts}{local}, intermediate={self.intermediate}, "
                f"gate_up={self.formats['gate_up_proj']}, down={self.formats['down_proj']}")


class MoE(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0 else None
        )
        self.parallel: ParallelContext = SINGLE   # sharded: routed and shared partial sums, one all-reduce

    def forward(self, x: torch.Tensor, dispatch: str = "auto", router_sink: list[RouterOutput] | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """router_sink, when given, receives this layer's RouterOutput (training statistics); residual (the block's
        residual stream, shaped like x), when given, is added to the output: residual + MoE(x)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                    # [N, D]
        route = self.gate(flat)
        if router_sink is not None:
            router_sink.append(route)
        out = self.experts(flat, route.weights, route.indices, dispatch)   # fp32
        shared = self.shared_experts.partial(flat) if self.shared_experts is not None else None
        if residual is not None and not self.parallel.is_parallel and not torch.compiler.is_compiling():
            # the sum, the cast and the residual add in one pass where the kernels take it (the same bits; a
            # compiled graph fuses the ops itself)
            kernels = getattr(self.experts.formats["gate_up_proj"], "kernels", None)
            if hasattr(kernels, "moe_residual"):
                fused = kernels.moe_residual(residual.reshape(flat.shape), out, shared)
                if fused is not None:
                    return fused.view(shape)
        if shared is not None:
            out = out + shared.float()
        y = self.parallel.all_reduce(out).to(x.dtype).view(shape)   # sharded: summed over the ranks in fp32
        return y if residual is None else residual + y
