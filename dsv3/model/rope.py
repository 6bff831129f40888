"""Rotary position embedding in DeepSeek's original form: complex multiplication, with YaRN, linear and
dynamic-NTK scaling (the numerics of transformers 5.23's modeling_rope_utils).

Symbols (V3 sizes): dr = qk_rope_head_dim (64), θ = rope_theta (10000), s = scaling factor (40),
L0 = original_max_position_embeddings (4096), Lmax = max_position_embeddings.

    inv_freq_i = θ^(-2i/dr),  i = 0 .. dr/2-1
    YaRN:  corr(n) = dr·ln(L0 / (2πn)) / (2 ln θ)
           low = max(floor(corr(beta_fast)), 0),  high = min(ceil(corr(beta_slow)), dr-1)
           ramp_i = clamp((i - low) / (high - low), 0, 1)
           inv_freq_i ← inv_freq_i·(1 - ramp_i) + inv_freq_i/s·ramp_i
    linear:  inv_freq_i ← inv_freq_i / s          (positions divided by s)
    dynamic: L = max(position_ids) + 1 over the whole call; when L > Lmax
             θ' = θ·(s·L/Lmax - (s-1))^(dr/(dr-2)),  inv_freq_i = θ'^(-2i/dr)   (else unchanged)
    freqs_cis[p, i] = m · exp(i·p·inv_freq_i),   m = mscale(s, mscale) / mscale(s, mscale_all_dim) (YaRN)

Dynamic NTK depends on the call: every token of a forward pass is rotated with the base of that pass's
longest position. With a cache, keys keep the rotation they were stored with, so a prompt decoded token by
token past Lmax gives other logits than one uncached forward over the same tokens — transformers does the
same (its DeepseekV3RotaryEmbedding recomputes inv_freq whenever a call reaches a longer position). Unlike
transformers, which keeps the longest length seen in module state until a call shorter than Lmax resets it,
dsv3 derives the base from each call's positions alone: same inputs, same outputs, whatever ran before,
and equal to transformers on a freshly loaded model. The base is computed on the device (no host sync),
so a compiled or CUDA-graph decode step keeps working.

A rope vector x of dr values is dr/2 complex numbers and is rotated by x·freqs_cis. With
`rope_interleave=True` (the released weights) the pairs are adjacent, (x0,x1),(x2,x3),...; with
`rope_interleave=False` (checkpoints whose rope rows were permuted) the real parts are the first
half and the imaginary parts the second half, which is the "rotate_half" formulation. Both are the
same complex product; only the memory layout differs, and the output keeps the input's layout.
"""

from __future__ import annotations

import math

import torch

from dsv3.config import DeepseekV3Config, yarn_get_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(config: DeepseekV3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dr/2] (fp32) and the magnitude m applied to cos/sin."""
    dim, base = config.qk_rope_head_dim, float(config.rope_theta)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = config.rope_scaling
    if rs is None or rs["rope_type"] in ("default", "dynamic"):   # dynamic: unscaled up to Lmax (see forward)
        return inv_freq, 1.0
    factor = float(rs["factor"])
    if rs["rope_type"] == "linear":
        return inv_freq / factor, 1.0
    l0 = int(rs["original_max_position_embeddings"])
    beta_fast = float(rs.get("beta_fast") or 32)
    beta_slow = float(rs.get("beta_slow") or 1)
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, l0)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, l0)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp) + inv_freq / factor * ramp
    if rs.get("attention_factor") is not None:
        magnitude = float(rs["attention_factor"])
    else:
        # DeepSeek's definition: mscale defaults to 1 and mscale_all_dim to 0 (i.e. a denominator of 1).
        magnitude = yarn_get_mscale(factor, float(rs.get("mscale") or 1.0)) / yarn_get_mscale(
            factor, float(rs.get("mscale_all_dim") or 0.0))
    return inv_freq, magnitude


def dynamic_ntk_inv_freq(seq_len: torch.Tensor, dim: int, base: float, factor: float,
                         max_position_embeddings: int) -> torch.Tensor:
    """Dynamic NTK inverse frequencies [dr/2] (fp32) for a 0-dim integer seq_len ≥ max_position_embeddings,
    op for op as transformers computes them (fp32 tensors, so the parity is exact)."""
    scaled = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_len.device).float() / dim
    return 1.0 / (scaled ** exponents)


class RotaryEmbedding(torch.nn.Module):
    """Turns position ids into complex rotations; holds no per-position table (V3 allows 163840)."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        inv_freq, magnitude = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.magnitude = magnitude
        rs = config.rope_scaling
        # Dynamic NTK: (factor, base, Lmax); the base is recomputed per call from its positions.
        self.dynamic: tuple[float, float, int] | None = None
        if rs is not None and rs["rope_type"] == "dynamic":
            self.dynamic = (float(rs["factor"]), float(config.rope_theta), config.max_position_embeddings)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids [B, S] -> freqs_cis [B, S, dr/2] complex64."""
        inv_freq = self.inv_freq.float()
        if self.dynamic is not None and position_ids.numel() > 0:
            factor, base, max_pos = self.dynamic
            seq_len = position_ids.max() + 1                        # [] int, stays on the device
            longer = dynamic_ntk_inv_freq(seq_len.clamp(min=max_pos), 2 * inv_freq.shape[0], base, factor, max_pos)
            inv_freq = torch.where(seq_len > max_pos, longer, inv_freq)
        angles = position_ids.to(torch.float32)[..., None] * inv_freq
        return torch.polar(torch.full_like(angles, self.magnitude), angles)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate x [B, S, H, dr] (or [B, S, dr]) by freqs_cis [B, S, dr/2]; computed in fp32."""
    dtype, shape = x.dtype, x.shape
    xf = x.float()
    if interleave:
        xc = torch.view_as_complex(xf.reshape(*shape[:-1], shape[-1] // 2, 2))
    else:
        xc = torch.complex(xf[..., : shape[-1] // 2], xf[..., shape[-1] // 2 :])
    fc = freqs_cis if x.dim() == 3 else freqs_cis.unsqueeze(2)  # broadcast over heads
    yc = xc * fc
    if interleave:
        y = torch.view_as_real(yc).reshape(shape)
    else:
        y = torch.cat([yc.real, yc.imag], dim=-1)
    return y.to(dtype)
