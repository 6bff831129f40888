"""The transformers oracle: tiny random DeepSeek-V3 models built and saved by transformers 5.23.

Everything the parity tests need to compare dsv3 against transformers lives here: configs in both
libraries' spellings, random models with the parts HF initialises too kindly (zero router bias,
unit norms) randomised, and a comparison helper that reports max/mean differences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Worst difference seen per comparison label prefix; printed at the end of the run (conftest).
PARITY_REPORT: dict[str, float] = {}

TINY: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
    topk_group=2, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=48,
    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=256, rope_theta=10000.0, rope_interleave=True, attention_bias=False,
    rope_scaling=None, tie_word_embeddings=False,
)


def yarn(factor: float = 4.0, mscale: float | None = 1.0, mscale_all_dim: float | None = 1.0,
         original: int = 64) -> dict[str, Any]:
    rs: dict[str, Any] = {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                          "beta_fast": 32, "beta_slow": 1}
    if mscale is not None:
        rs["mscale"] = mscale
    if mscale_all_dim is not None:
        rs["mscale_all_dim"] = mscale_all_dim
    return rs


def scaled_rope(kind: str, factor: float) -> dict[str, Any]:
    """rope_scaling as the transformers documentation writes linear and dynamic scaling."""
    return {"type": kind, "factor": factor}


def hf_config(**overrides: Any) -> Any:
    from transformers import DeepseekV3Config as HFConfig

    kw = {**TINY, **overrides}
    rope_scaling = kw.pop("rope_scaling")
    theta = kw.pop("rope_theta")
    if rope_scaling is None:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        rp = {k: v for k, v in rope_scaling.items() if k != "type"}
        kw["rope_parameters"] = {"rope_type": rope_scaling["type"], "rope_theta": theta, **rp}
        if "original_max_position_embeddings" in rp:   # YaRN states the stretched length; linear/dynamic do not
            kw["max_position_embeddings"] = int(rp["factor"] * rp["original_max_position_embeddings"])
    return HFConfig(**kw)


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Randomise what HF initialises to constants: router bias (zero hides routing bugs), norms, biases."""
    g = torch.Generator().manual_seed(seed + 1000)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            t.copy_(torch.rand(t.shape, generator=g) * 0.2 - 0.1)
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
        elif name.endswith(".bias"):
            t.copy_(0.05 * torch.randn(t.shape, generator=g))
        elif name.endswith("gate.weight"):
            t.copy_(0.3 * torch.randn(t.shape, generator=g))   # spread router scores so top-k is decisive


def make_hf_model(directory: Path, seed: int = 0, **overrides: Any) -> Any:
    """Build a random transformers model in fp32/eager, save it to `directory`, return it (eval mode)."""
    from transformers import DeepseekV3ForCausalLM as HFModel

    torch.manual_seed(seed)
    cfg = hf_config(**overrides)
    cfg._attn_implementation = "eager"
    model = HFModel(cfg).eval()
    randomise(model, seed)
    model.save_pretrained(directory)
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "") -> float:
    """Assert max |a-e| <= atol; the message gives max and mean difference. Returns the max difference."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.detach().double() - expected.detach().double()).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    label = what.split(":")[-1].strip() if ":" in what else what
    PARITY_REPORT[label] = max(PARITY_REPORT.get(label, 0.0), worst)
    assert worst <= atol, f"{what}: max diff {worst:.3e} (mean {float(diff.mean()):.3e}) exceeds atol {atol:.1e}"
    return worst


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, max_len] with left padding (pad id 0) and the matching 0/1 attention mask."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(2, vocab, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, t - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (what generate uses for left-padded prompts)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def load_hf(directory: Path) -> Any:
    """A checkpoint directory loaded by transformers in fp32/eager (eval mode)."""
    from transformers import DeepseekV3ForCausalLM as HFModel

    return HFModel.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def compare_padded_logits(model: torch.nn.Module, reference: torch.nn.Module, lengths: list[int], seed: int,
                          atol: float, what: str) -> float:
    """Logits of `model` and `reference` on a random left-padded batch, compared on the real tokens."""
    ids, mask = left_padded_batch(reference.config.vocab_size, lengths, seed=seed)
    pos = positions_from_mask(mask)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ref = reference(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return assert_close(got[mask.bool()], ref[mask.bool()], atol, what)
