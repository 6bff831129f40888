"""Multi-head Latent Attention (MLA) with two compute paths from the same weights.

Symbols (V3 sizes): H heads (128), dn = qk_nope_head_dim (128), dr = qk_rope_head_dim (64),
dv = v_head_dim (128), r = kv_lora_rank (512), r_q = q_lora_rank (1536 or None), B batch,
S new tokens, T cached + new tokens.

    q        = q_b(norm(q_a(x)))  or  q_proj(x)                [B,S,H,dn+dr] -> q_nope, q_pe
    c_kv,k_pe = kv_a(x)                                        [B,S,r], [B,S,dr]; c_kv normed, k_pe roped
    cache    <- [c_kv | k_pe]                                  [B,T,r+dr]  (576 values per token)
    kv_b.weight viewed [H, dn+dv, r] = [W_UK ; W_UV]

Expanded ("naive") path — compute-friendly, for prefill where S ≈ T:
    k_nope, v = split(kv_b(c_kv))                              [B,T,H,dn], [B,T,H,dv]
    o = softmax([q_nope|q_pe]·[k_nope|k_pe]ᵀ·scale + mask) v

Absorbed path — memory-friendly, for decode where S << T: W_UK is folded into the query and W_UV
into the output, so attention runs directly over the cached latent (one shared "head" of width
r+dr, like multi-query attention with S·H query rows):
    q_lat = einsum("bshd,hdc->bshc", q_nope, W_UK)            [B,S,H,r]
    o_lat = softmax([q_lat|q_pe]·[c_kv|k_pe]ᵀ·scale + mask) c_kv   [B,S,H,r]
    o     = einsum("bshc,hdc->bshd", o_lat, W_UV)              [B,S,H,dv]

Both paths are exact for any S at any start position (the mask is the same), so chunked prefill
and speculative verification can use either. Decode (S = 1, no mask) may run the absorbed attention
through `kernels.latent_decode` (an `AttentionKernels` object handed to the layers by
`use_attention_kernels`, e.g. dsv3.kernels.CpuKernels: one fused pass per cache read for all heads);
it returns None where it does not apply and the matmuls run. Per head, the expanded path costs about
T·r·(dn+dv) + S·T·(dn+dr+dv) multiply-adds and the absorbed one S·r·(dn+dv) + S·T·(2r+dr);
`choose_path` picks the cheaper.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.cache import LatentCacheView
from dsv3.config import DeepseekV3Config
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import apply_rope
from dsv3.model.weights import hand_kernels, weight_matrix
from dsv3.parallel.context import SINGLE, ParallelContext
from dsv3.quant.formats import Fp8Blocks, Plain

MLA_PATHS = ("auto", "naive", "absorbed")
KERNEL_MAX_POSITIONS = 8   # causal steps up to this many tokens run the decode kernel per position


class AttentionKernels(Protocol):
    """Optional fast single-token decode over the latent cache; None where it does not apply."""

    def latent_decode(self, query: torch.Tensor, latent: torch.Tensor, r: int, scale: float) -> torch.Tensor | None:
        """softmax(query·latentᵀ·scale)·latent[..., :r]: query [B, H, r+dr], latent [B, T, r+dr] -> [B, H, r] fp32."""

    def head_products(self, x: torch.Tensor, weight: torch.Tensor, rows: tuple[int, int],
                      transposed: bool) -> torch.Tensor | None:
        """kv_b_proj's per-head products, weight [H, dn+dv, r] as stored: x [P, H, rows] -> [P, H, r] =
        x_h·W_h[rows] when `transposed` (q_nope·W_UK), else x [P, H, r] -> [P, H, rows] = x_h·W_h[rows]ᵀ; fp32."""


def choose_path(config: DeepseekV3Config, s: int, t: int, path: str = "auto") -> str:
    if path not in MLA_PATHS:
        raise ValueError(f"mla_path={path!r}: expected one of {MLA_PATHS}")
    if path != "auto":
        return path
    r, dn, dr, dv = config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    naive = t * r * (dn + dv) + s * t * (dn + dr + dv)
    absorbed = s * r * (dn + dv) + s * t * (2 * r + dr)
    return "absorbed" if absorbed < naive else "naive"


def build_attention_mask(attention_mask: torch.Tensor | None, start: int, s: int, device: torch.device,
                         positions: torch.Tensor | None = None, span: int | None = None) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, S, T] (True = may attend) or None when plain causal attention suffices.

    Queries sit at slots start..start+S-1 of every row, or at `positions` [B, S] when rows differ (then
    T = span keys are read); a query at slot p sees key slots k <= p. attention_mask is the 2-D padding
    mask over the T slots (1 = real token). None is returned only when the queries share their slots,
    there is no padding and either S == 1 or start == 0, where SDPA's own causal flag (or no mask) is
    exact. A padding query sees no key at all: as in transformers' eager attention, its row of scores is
    filled with the dtype's minimum, so its softmax is uniform over all T keys.
    """
    t = start + s if span is None else span
    if positions is None and attention_mask is None and (s == 1 or start == 0) and t == start + s:
        return None
    k_pos = torch.arange(t, device=device)
    if positions is None:
        mask = (k_pos[None, :] <= torch.arange(start, start + s, device=device)[:, None])[None]   # [1, S, T]
    else:
        mask = k_pos[None, None, :] <= positions[:, :, None]                                   # [B, S, T]
    if attention_mask is not None:
        mask = mask & attention_mask[:, :t].to(device=device, dtype=torch.bool)[:, None, :]   # [B, S, T]
    return mask[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> 0 / dtype-min additive mask, transformers' form: a fully masked row stays finite
    (every score becomes the minimum, so the softmax is uniform) where -inf would give NaN."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def latent_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, return_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q·kᵀ·scale + mask)·v as two matmuls with the softmax in fp32; (output, probs if asked).

    For the absorbed path's shape (one shared key/value "head" of width r+dr, S·H query rows) this is
    several times faster on the CPU than scaled_dot_product_attention, whose kernels tile for many
    heads of width ≤ 256 (8192 cached tokens: 3.8 ms against 22 ms per layer, benchmarks/).
    The scores are computed as key·queryᵀ ([T, S·H]: the T cached rows as the GEMM's long side, read in
    place) and transposed once in fp32: the other orientation (S·H rows against a transposed [T, r+dr]
    operand) ran 3–8× slower on this project's CPU at T = 8192 (same products, same fp32 sums).
    Masked scores get fp32's minimum rather than -inf: transformers' numerics, finite for padding queries.
    """
    scores = torch.matmul(key, query.transpose(-1, -2)).transpose(-1, -2)         # [B, 1, S*H, T] (a view)
    scores = scores.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale)
    if mask is not None:
        scores = scores.masked_fill_(~mask, torch.finfo(torch.float32).min)
    probs = scores.softmax(-1).to(value.dtype)
    return torch.matmul(probs, value), probs if return_probs else None


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = h = config.num_attention_heads
        self.dn, self.dr, self.dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.r = config.kv_lora_rank
        d, bias = config.hidden_size, config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.r + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.r, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.r, h * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(h * self.dv, d, bias=bias)
        self.scale = config.softmax_scale
        # Sharded (dsv3/model/parallel.py): this rank's `num_heads` heads of q_b/q and kv_b, o_proj row-parallel,
        # the outputs summed over the ranks. The latent (q_a, kv_a and their norms, the cache) is whole on each.
        self.parallel: ParallelContext = SINGLE
        self.kernels: AttentionKernels | None = None     # set by use_attention_kernels

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None,
                cache: LatentCacheView | None = None, path: str = "auto",
                attention_sink: list[torch.Tensor] | None = None, unpadded: bool = False) -> torch.Tensor:
        """attention_sink: receives this layer's attention probabilities [B, H, S, T] (output_attentions);
        unpadded: no padding mask, `mask` (if any) is causal only — each query sees every slot up to its own."""
        b, s, _ = x.shape
        interleave = self.config.rope_interleave
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.num_heads, self.dn + self.dr)            # [B, S, H, dn+dr]
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q_pe = apply_rope(q_pe, freqs_cis, interleave)

        kv = self.kv_a_proj_with_mqa(x)                                  # [B, S, r+dr]
        c_kv, k_pe = kv.split([self.r, self.dr], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), apply_rope(k_pe, freqs_cis, interleave)], dim=-1)
        if cache is not None:
            latent = cache.update(self.layer_idx, latent)                # [B, T, r+dr]
        t = latent.shape[1]
        dropout = self.config.attention_dropout if self.training else 0.0
        if choose_path(self.config, s, t, path) == "absorbed":
            slots = self._kernel_slots(cache, b, s, t, mask is None or unpadded)
            o, probs = self._absorbed(q_nope, q_pe, latent, mask, dropout, attention_sink is not None, slots)
        else:
            o, probs = self._naive(q_nope, q_pe, latent, mask, dropout, attention_sink is not None)
        if attention_sink is not None:
            assert probs is not None
            attention_sink.append(self.parallel.all_gather(probs, dim=1))    # [B, H, S, T], every rank's heads
        # Sharded: each rank's partial o_proj product (its heads' input columns), summed (o_proj's bias, if
        # any, is held by the first rank only).
        return self.parallel.all_reduce(self.o_proj(o.reshape(b, s, self.num_heads * self.dv)))

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None,
               dropout: float, return_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, h, _ = q_nope.shape
        t = latent.shape[1]
        c_kv, k_pe = latent.split([self.r, self.dr], dim=-1)
        kv = self.kv_b_proj(c_kv).view(b, t, h, self.dn + self.dv)      # [B, T, H, dn+dv]
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(b, t, h, self.dr)], dim=-1)   # [B, T, H, dn+dr]
        q = torch.cat([q_nope, q_pe], dim=-1)                             # [B, S, H, dn+dr]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S|T, D]
        if return_probs:   # eager: the probabilities are an output (transformers' eager_attention_forward)
            if mask is None and s > 1:
                mask = build_attention_mask(torch.ones(b, t, dtype=torch.bool, device=q.device), t - s, s, q.device)
            scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(self.scale)    # [B, H, S, T]
            if mask is not None:
                scores = scores.masked_fill_(~mask, torch.finfo(torch.float32).min)
            probs = F.dropout(scores.softmax(-1).to(q.dtype), dropout, self.training)
            return torch.matmul(probs, v).transpose(1, 2), probs          # [B, S, H, dv]
        dv = v.shape[-1]
        if q.device.type == "cpu" and dv < q.shape[-1]:
            # PyTorch's CPU flash kernel needs v as wide as q and k; otherwise SDPA falls back to its math path
            # (bench shape, 512 tokens: 15.8 ms per layer against 2.5 ms padded, the same output).
            v = F.pad(v, (0, q.shape[-1] - dv))
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else additive_mask(mask, q.dtype),
            dropout_p=dropout, is_causal=mask is None and s > 1, scale=self.scale)[..., :dv]   # [B, H, S, dv]
        return o.transpose(1, 2), None                                     # [B, S, H, dv]

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None,
                  dropout: float, return_probs: bool,
                  slots: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, h, _ = q_nope.shape
        t = latent.shape[1]
        q_lat = self._head_products(q_nope.reshape(b * s, h, self.dn), (0, self.dn), True)   # [B*S, H, r] or None
        w_uv = None
        if q_lat is not None:
            q_lat = q_lat.reshape(b, s, h, self.r).to(q_nope.dtype)
        else:
            w = weight_matrix(self.kv_b_proj, q_nope.dtype).view(h, self.dn + self.dv, self.r)   # FP8: dequantised
            w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]                  # [H, dn, r], [H, dv, r]
            q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)          # [B, S, H, r]
        query = torch.cat([q_lat, q_pe], dim=-1).view(b, 1, s * h, self.r + self.dr)
        key = latent[:, None]                                              # [B, 1, T, r+dr]
        value = latent[:, None, :, : self.r]                               # [B, 1, T, r]
        o = None if slots is None or dropout != 0.0 or return_probs else self._decode_kernel(query, latent, slots)
        if mask is None and s > 1:   # plain causal, expressed per (position, head) row
            mask = build_attention_mask(torch.ones(b, t, dtype=torch.bool, device=latent.device), t - s, s,
                                        latent.device)
        if mask is not None:
            mask = mask[:, :, :, None, :].expand(-1, -1, -1, h, -1).reshape(mask.shape[0], 1, s * h, -1)
        probs = None
        if o is not None:   # the decode kernel ran
            pass
        elif dropout > 0.0 and not return_probs:
            o = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scale,
                                               attn_mask=None if mask is None else additive_mask(mask, query.dtype))
        else:
            o, probs = latent_attention(query, key, value, mask, self.scale, return_probs)   # [B, 1, S*H, r]
            if probs is not None:
                probs = F.dropout(probs, dropout, self.training)
                o = torch.matmul(probs, value) if dropout > 0.0 else o
                probs = probs.view(b, s, h, t).transpose(1, 2)              # [B, H, S, T]
        o = o.reshape(b, s, h, self.r)
        if w_uv is None:   # (q_lat came from the kernels)
            out = self._head_products(o.reshape(b * s, h, self.r), (self.dn, self.dn + self.dv), False)
            if out is not None:                                             # [B*S, H, dv] fp32
                return out.reshape(b, s, h, self.dv).to(o.dtype), probs
            w_uv = weight_matrix(self.kv_b_proj, o.dtype).view(h, self.dn + self.dv, self.r)[:, self.dn:]
        return torch.einsum("bshc,hdc->bshd", o, w_uv), probs            # [B, S, H, dv]

    def _kernel_slots(self, cache: LatentCacheView | None, b: int, s: int, t: int,
                      causal: bool) -> list[list[int]] | None:
        """The slot of each query (row, position) when the one-pass decode kernel can take this step's
        attention — query (b, i) then sees slots [0, slots[b][i]] — or None (the matmul path).

        The kernel runs for steps of S ≤ KERNEL_MAX_POSITIONS tokens without padding (`causal`), once per
        query over the cache up to its slot: each position then computes exactly what a one-token step there
        computes. Speculative decoding's multi-token verification must agree with plain greedy decoding bit
        for bit, and the matmul path rounds differently (a near-tie flipped a greedy token). Rows at their
        own slots (`CacheStep.positions`, speculative rows that accepted different counts) are read on the
        host, so only outside a compiled graph; longer steps (prefill) stay on the matmuls."""
        if self.kernels is None or not causal or s > KERNEL_MAX_POSITIONS:
            return None
        step = cache.step if cache is not None else None
        if step is None or step.positions is None:
            start = step.start if step is not None else t - s
            return [[start + i for i in range(s)]] * b
        if torch.compiler.is_compiling():
            return None
        return step.positions.tolist()

    def _decode_kernel(self, query: torch.Tensor, latent: torch.Tensor,
                       slots: list[list[int]]) -> torch.Tensor | None:
        """`self.kernels.latent_decode` per query over the latent up to its slot: [B, S, H, r] in the latent's
        dtype, or None (the kernel does not apply: the caller's matmuls)."""
        b, s = len(slots), len(slots[0])
        qs = query.view(b, s, -1, self.r + self.dr)
        shared = all(row == slots[0] for row in slots)      # every row at the same slots: whole batch per call
        rows = [(0, b)] if shared else [(k, k + 1) for k in range(b)]
        outs = []
        for i in range(s):
            parts = []
            for r0, r1 in rows:
                o = self.kernels.latent_decode(qs[r0:r1, i], latent[r0:r1, : slots[r0][i] + 1], self.r, self.scale)
                if o is None:
                    return None
                parts.append(o)
            outs.append(parts[0] if shared else torch.cat(parts, 0))
        return torch.stack(outs, 1).to(latent.dtype)                      # [B, S, H, r]

    def _head_products(self, x: torch.Tensor, rows: tuple[int, int], transposed: bool) -> torch.Tensor | None:
        """x [P, H, ·] times each head's rows of kv_b_proj (W_UK: `transposed`, W_UV: not) by kernels that read
        the weight as stored — FP8 blocks, or bf16 through `self.kernels` — fp32; None: the caller's matmuls."""
        fmt = getattr(self.kv_b_proj, "format", None)
        if isinstance(fmt, Fp8Blocks):
            return fmt.head_products(self.kv_b_proj, "weight", x, rows, transposed)
        if self.kernels is None or not isinstance(fmt, (Plain, type(None))):
            return None
        w = self.kv_b_proj.weight.view(x.shape[1], self.dn + self.dv, self.r)       # [H, dn+dv, r]
        return self.kernels.head_products(x, w, rows, transposed)


def use_attention_kernels(model: nn.Module, kernels: AttentionKernels | None) -> int:
    """Hand `kernels` to every MLA layer of `model` (None: the matmul path). Returns the number of layers."""
    return hand_kernels(model, MultiHeadLatentAttention, kernels, "MLA decode")
