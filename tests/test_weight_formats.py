"""The weight-format seam (dsv3.quant.formats, dsv3.model.weights): FP8 held as stored touches only what a step
needs — the experts that received tokens, one bounded tile of a matrix at a time — and computes what the
dequantised model computes; formats change only through explicit calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv3 import DeepseekV3ForCausalLM
from dsv3.generation.generate import make_cache
from dsv3.model.moe import RoutedExperts
from dsv3.model.weights import Linear, map_formats, weight_matrix
from dsv3.quant import fp8 as quant_fp8
from dsv3.quant.formats import DequantStats, Fp8Blocks, Plain
from tests.oracle import assert_close
from tests.published import RAGGED_32, Published, build_published

BLOCK = (32, 32)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Published:
    # TINY with 32-blocks: 3 layers (2 MoE), 16 routed experts, 4 per token; expert intermediate 40 = 32 + 8.
    return build_published(tmp_path_factory.mktemp("fp8-formats"), RAGGED_32, BLOCK, seed=21)


def _load(path: Path, fp8: str = "dequantize") -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, fp8=fp8)


def _count_experts(model: torch.nn.Module) -> DequantStats:
    stats = DequantStats()
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            m.set_formats(*(f.with_stats(stats) for f in m.formats.values()))
    return stats


def test_fp8_decode_step_dequantises_only_the_chosen_experts(fp8_checkpoint: Published) -> None:
    plain, kept = _load(fp8_checkpoint.path), _load(fp8_checkpoint.path, "keep")
    cfg = kept.config
    stats = _count_experts(kept)
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    caches = make_cache(plain, "static", 1, 9), make_cache(kept, "static", 1, 9)
    n_moe, k = cfg.num_hidden_layers - cfg.first_k_dense_replace, cfg.num_experts_per_tok
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    with torch.no_grad():
        want = plain(ids[:, :6], past_key_values=caches[0]).logits
        assert torch.equal(kept(ids[:, :6], past_key_values=caches[1]).logits, want)
        for t in range(6, 9):                                   # decode steps: one token, k distinct experts
            stats.reset()
            want = plain(ids[:, t:t + 1], past_key_values=caches[0]).logits
            got = kept(ids[:, t:t + 1], past_key_values=caches[1]).logits
            assert torch.equal(got, want), f"step {t}: max diff {(got - want).abs().max():.3e}"
            # per MoE layer: the gate_up and the down stack of the k chosen experts, nothing else (was: all E)
            assert stats.experts == 2 * n_moe * k, (stats.experts, 2 * n_moe * cfg.n_routed_experts)
            assert stats.bytes == n_moe * k * (2 * i * d + d * i) * 2          # bf16
    assert cfg.n_routed_experts >= 4 * k


def test_fp8_prefill_in_chunks_of_experts_equals_one_chunk(fp8_checkpoint: Published) -> None:
    kept = _load(fp8_checkpoint.path, "keep")
    ids = torch.randint(0, kept.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = kept(ids, moe_dispatch="grouped").logits
        stats = DequantStats()
        for m in kept.modules():                                # one expert per chunk
            if isinstance(m, RoutedExperts):
                m.set_formats(*(Fp8Blocks(BLOCK, parts=f.parts, chunk_elements=1, stats=stats)
                                for f in m.formats.values()))
        got = kept(ids, moe_dispatch="grouped").logits
    assert torch.equal(got, want)
    assert stats.calls == stats.experts > 0                     # each dequantisation held a single expert


def test_fp8_linear_dequantises_one_bounded_tile_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    dense = torch.nn.Linear(200, 300, bias=True)
    tiled = Linear.from_linear(dense, Fp8Blocks(BLOCK, tile_elements=64 * 200))
    whole = Linear.from_linear(dense, Fp8Blocks(BLOCK))
    x = torch.randn(3, 5, 200)
    full = quant_fp8.dequantize_fp8_blocks(tiled.weight, tiled.weight_scale_inv, BLOCK, torch.float32)
    want = F.linear(x, full, dense.bias)
    assert torch.equal(whole(x), want)                          # within one tile: dequantise-on-load, bit for bit
    assert torch.equal(weight_matrix(whole, torch.float32), full)

    sizes: list[int] = []
    original = quant_fp8.dequantize_fp8_blocks

    def spy(weight: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        sizes.append(weight.numel())
        return original(weight, *args, **kwargs)

    monkeypatch.setattr(quant_fp8, "dequantize_fp8_blocks", spy)
    got = tiled(x)
    assert sizes == [64 * 200] * 4 + [44 * 200]                 # 300 rows: tiles of two 32-row blocks
    assert_close(got, want, 1e-5, "tiled FP8 linear")


def test_formats_keep_checkpoint_names_and_change_only_explicitly(fp8_checkpoint: Published) -> None:
    kept = _load(fp8_checkpoint.path, "keep")
    names = list(kept.state_dict())
    assert "model.layers.1.mlp.experts.gate_up_proj_scale_inv" in names
    assert "model.layers.0.self_attn.kv_b_proj.weight_scale_inv" in names
    with pytest.raises(ValueError, match="Fp8Blocks format into Plain"):
        map_formats(kept, lambda f: Plain())                   # storage changes only at load time
    experts = kept.model.layers[1].mlp.experts
    with pytest.raises(ValueError, match="cannot convert loaded weights"):
        experts.set_formats(Plain(), Plain())
    stats = DequantStats()
    assert map_formats(kept, lambda f: f.with_stats(stats)) > 0
    assert list(kept.state_dict()) == names                     # counting changes no tensor
