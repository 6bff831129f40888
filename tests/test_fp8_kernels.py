"""The block-FP8 CPU kernels (dsv3/kernels/cpu_fp8.cpp) against their slow reference (dequantise, then an fp32
product), through the `Fp8Blocks` format and through a model loaded with fp8="keep"; which path ran is asserted
(`DequantStats`: the kernels dequantise nothing; the fallback does). Skipped where the kernels cannot be built."""

from __future__ import annotations

import pytest
import torch

from dsv3 import DeepseekV3ForCausalLM, kernels
from dsv3.model.moe import RoutedExperts
from dsv3.model.weights import Linear, map_formats, use_kernels
from dsv3.quant.formats import DequantStats, ExpertBatch, Fp8Blocks
from dsv3.quant.fp8 import dequantize_fp8_blocks, dequantize_fp8_stacked, quantize_fp8_blocks
from tests.oracle import assert_close
from tests.published import RAGGED_32, Published, build_published

pytestmark = pytest.mark.skipif(not kernels.fp8_available(), reason="FP8 CPU kernels need AVX-512 and a C++ compiler")


def _fp8(rows: int, cols: int, block: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3   # uneven row magnitudes
    return quantize_fp8_blocks(w, block)


def _bound(x: torch.Tensor, dense: torch.Tensor) -> float:
    """fp32 summation tolerance: 1e-5 of the largest Σ|x·w| (the kernels and the reference sum in fp32)."""
    return 1e-5 * float((x.float().abs() @ dense.abs().transpose(-1, -2)).max()) + 1e-30


@pytest.mark.parametrize("out_f, in_f, block", [(576, 2048, (128, 128)), (300, 200, (128, 128)),
                                                (129, 1000, (128, 128)), (72, 40, (32, 32)), (50, 96, (16, 48))])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16])
def test_fp8_linear_matches_the_dequantised_reference(out_f: int, in_f: int, block: tuple[int, int],
                                                      rows: int) -> None:
    """Ragged last blocks (out/in not multiples of the block), odd widths, 1..16 activation rows, bf16 and fp32 x."""
    w, s = _fp8(out_f, in_f, block, seed=out_f + rows)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)).to(dtype)
        want = kernels.reference_fp8_linear(x, w, s, block)
        got = kernels.fp8_linear(x, w, s, *block)
        assert got.dtype == torch.float32
        assert_close(got, want, _bound(x, dequantize_fp8_blocks(w, s, block, torch.float32)), "fp8 linear kernel")


def test_every_e4m3_byte_converts_exactly() -> None:
    """Row n holds byte n: y = the e4m3 value × scale, exactly, subnormals and ±0 included. The NaN bytes 0x7f and
    0xff (never written by quantisers: e4m3 saturates at ±448) read as ±480, as documented in cpu_fp8.cpp."""
    w = torch.zeros(256, 16, dtype=torch.uint8)
    w[:, 0] = torch.arange(256, dtype=torch.uint8)
    w = w.view(torch.float8_e4m3fn)
    x = torch.zeros(1, 16)
    x[0, 0] = 1.0
    scale = torch.full((2, 1), 0.75)
    got = kernels.fp8_linear(x, w, scale, 128, 16)[0]                       # [256]
    want = w[:, 0].float() * 0.75
    finite = torch.ones(256, dtype=torch.bool)
    finite[[0x7F, 0xFF]] = False
    assert torch.equal(got[finite], want[finite])
    assert got[0x7F] == 480 * 0.75 and got[0xFF] == -480 * 0.75


def _stack(experts: int, inter: int, cols: int, parts: int, block: tuple[int, int],
           seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 expert stack [E, parts·inter, cols] with `parts` block grids per expert (gate and up, or one)."""
    pieces = [_fp8(inter * (2 // parts), cols, block, seed=seed + 10 * e + j)
              for e in range(experts) for j in range(parts)]
    w = torch.stack([torch.cat([pieces[e * parts + j][0] for j in range(parts)]) for e in range(experts)])
    s = torch.stack([torch.cat([pieces[e * parts + j][1] for j in range(parts)]) for e in range(experts)])
    return w.contiguous(), s.contiguous()


@pytest.mark.parametrize("parts, inter, cols, block", [(2, 40, 72, (32, 32)), (1, 40, 72, (32, 32)),
                                                        (2, 200, 136, (128, 128)), (1, 704, 256, (128, 128))])
@pytest.mark.parametrize("ids", [[3], [0, 0, 0, 5, 5, 7], [1, 2, 2, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6]])
def test_fp8_expert_kernel_matches_reference_and_reads_only_used_experts(
        parts: int, inter: int, cols: int, block: tuple[int, int], ids: list[int]) -> None:
    w, s = _stack(8, inter, cols, parts, block, seed=len(ids))
    idx = torch.tensor(ids)
    unused = torch.tensor([e for e in range(8) if e not in ids])
    s[unused] = float("nan")            # any read of an unused expert's blocks would turn its rows into NaN
    x = torch.randn(len(ids), cols, generator=torch.Generator().manual_seed(7)).bfloat16()
    got = kernels.fp8_expert_linear(x, w, s, idx, *block, parts)
    assert torch.isfinite(got).all()
    want = kernels.reference_fp8_expert_linear(x, w, s, idx, block, parts)
    dense = dequantize_fp8_stacked(w[idx], s[idx], block, torch.float32, parts)      # [P, N, K]
    bound = 1e-5 * float((x.float().abs()[:, None, :] * dense.abs()).sum(-1).max())
    assert_close(got, want, bound, "fp8 expert kernel")


def test_fp8_expert_kernel_rejects_bad_ids() -> None:
    w, s = _stack(4, 40, 72, 2, (32, 32), seed=0)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.fp8_expert_linear(torch.zeros(1, 72), w, s, torch.tensor([9]), 32, 32, 2)
    with pytest.raises(RuntimeError, match="sorted"):
        kernels.fp8_expert_linear(torch.zeros(2, 72), w, s, torch.tensor([2, 1]), 32, 32, 2)


# -- through the Fp8Blocks format: kernels chosen per call, the fallback explicit and visible --------------------------
def _fp8_layer(out_f: int, in_f: int, fmt: Fp8Blocks) -> Linear:
    layer = Linear(in_f, out_f, format=fmt)
    w, s = _fp8(out_f, in_f, fmt.block_size, seed=out_f)
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    layer.weight_scale_inv = s
    return layer


def test_fp8_blocks_uses_the_kernels_for_few_rows_and_dequantises_otherwise() -> None:
    stats = DequantStats()
    stock = _fp8_layer(300, 200, Fp8Blocks(stats=stats))
    fast = _fp8_layer(300, 200, Fp8Blocks(stats=stats, kernels=kernels.CpuKernels(max_rows=4)))
    dense = dequantize_fp8_blocks(stock.weight, stock.weight_scale_inv, (128, 128), torch.float32)
    for rows in (1, 4, 5):
        x = torch.randn(1, rows, 200, generator=torch.Generator().manual_seed(rows))   # [B, S, in]
        stats.reset()
        want = stock(x)
        assert stats.calls == 1                                  # the stock path dequantises
        stats.reset()
        got = fast(x)
        assert stats.calls == (0 if rows <= 4 else 1), rows      # kernels: nothing dequantised; 5 rows: fallback
        assert got.shape == want.shape and got.dtype == x.dtype
        assert_close(got, want, _bound(x.reshape(-1, 200), dense), "Fp8Blocks kernels vs dequantise")
    x16 = torch.randn(1, 200, dtype=torch.bfloat16)
    assert_close(fast(x16).float(), stock(x16).float(), 0.02 * float(stock(x16).float().abs().max()),
                 "Fp8Blocks kernels vs dequantise, bf16")


def test_fp8_blocks_falls_back_where_the_kernels_do_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    stats = DequantStats()
    fast = _fp8_layer(64, 96, Fp8Blocks(stats=stats, kernels=kernels.CpuKernels()))
    x = torch.randn(3, 96)
    bound = _bound(x, fast.matrix(torch.float32))
    stats.reset()
    want = fast(x)
    assert stats.calls == 0
    monkeypatch.setattr(kernels, "fp8_available", lambda: False)   # a CPU without AVX-512 / a compiler
    assert_close(fast(x), want, bound, "fallback vs kernels")
    assert stats.calls == 1
    monkeypatch.undo()
    stats.reset()
    x.requires_grad_(True)
    fast(x)                                                          # autograd: the differentiable stock path
    assert stats.calls == 1


def test_fp8_grouped_uses_the_kernel_and_touches_only_the_used_experts() -> None:
    stats = DequantStats()
    w, s = _stack(8, 40, 72, 2, (32, 32), seed=3)
    module = torch.nn.Module()
    module.register_parameter("gate_up_proj", torch.nn.Parameter(w, requires_grad=False))
    module.register_buffer("gate_up_proj_scale_inv", s)
    ids = torch.tensor([1, 1, 4, 6])
    batch = ExpertBatch.from_sorted(ids, 8)
    xs = torch.randn(4, 72).bfloat16()
    stock = Fp8Blocks((32, 32), parts=2, stats=stats)
    want = stock.grouped(module, "gate_up_proj", xs, batch)
    assert stats.experts == 3                                        # dequantised: the 3 used experts only
    stats.reset()
    got = stock.with_kernels(kernels.CpuKernels()).grouped(module, "gate_up_proj", xs, batch)
    assert stats.calls == 0                                          # the kernel ran: nothing dequantised
    assert_close(got.float(), want.float(), 0.02 * float(want.float().abs().max()), "grouped kernel vs dequantise")


# -- a model loaded with fp8="keep" ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return build_published(tmp_path_factory.mktemp("fp8-kernels"), RAGGED_32, (32, 32), seed=5)


def test_fp8_kept_model_with_kernels_decodes_like_the_dequantising_one(fp8_checkpoint: Published) -> None:
    from dsv3.generation.generate import make_cache

    def load(choice: str) -> DeepseekV3ForCausalLM:
        return DeepseekV3ForCausalLM.from_pretrained(fp8_checkpoint.path, torch_dtype=torch.float32, fp8="keep",
                                                     kernels=choice)

    stock, fast = load("off"), load("on")
    assert stock.kernels is None and isinstance(fast.kernels, kernels.CpuKernels)
    stats = DequantStats()
    map_formats(fast, lambda f: f.with_stats(stats))
    experts = [m for m in fast.modules() if isinstance(m, RoutedExperts)]
    assert experts and all(f.kernels is fast.kernels for m in experts for f in m.formats.values())
    ids = torch.randint(0, fast.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    caches = make_cache(stock, "static", 1, 9), make_cache(fast, "static", 1, 9)
    with torch.no_grad():
        stock(ids[:, :6], past_key_values=caches[0])
        fast(ids[:, :6], past_key_values=caches[1])
        for t in range(6, 9):
            stats.reset()
            want = stock(ids[:, t:t + 1], past_key_values=caches[0]).logits
            got = fast(ids[:, t:t + 1], past_key_values=caches[1]).logits
            assert_close(got, want, 1e-4 * float(want.abs().max()), "fp8 kept: kernels vs dequantise")
            # decode: every FP8 linear and expert product ran in the kernels; only kv_b_proj's matrix (MLA's
            # absorbed path uses W_UK/W_UV themselves) is dequantised, once per layer
            assert stats.calls == fast.config.num_hidden_layers and stats.experts == 0, stats
    use_kernels(fast, None)
    assert all(f.kernels is None for m in experts for f in m.formats.values())


# -- MLA's absorbed path with an FP8 kv_b_proj: W_UK and W_UV read as stored ----------------------------------------
@pytest.mark.parametrize("rows", [(0, 40), (0, 16), (16, 40), (5, 6)])
def test_fp8_transposed_head_kernel_matches_reference(rows: tuple[int, int]) -> None:
    w, s = _stack(6, 20, 72, 1, (40, 32), seed=9)                      # [6, 40, 72]: one 40-row block per head
    idx = torch.tensor([0, 0, 2, 3, 3, 3, 5])
    x = torch.randn(len(idx), rows[1] - rows[0], generator=torch.Generator().manual_seed(2))
    got = kernels.fp8_expert_linear_t(x, w, s, idx, rows[0], rows[1], 40, 32)
    want = kernels.reference_fp8_expert_linear_t(x, w, s, idx, rows, (40, 32))
    dense = dequantize_fp8_stacked(w[idx], s[idx], (40, 32), torch.float32)[:, rows[0]: rows[1]]
    assert_close(got, want, 1e-5 * float((x.abs()[:, :, None] * dense.abs()).sum(1).max()), "fp8 transposed kernel")


def test_absorbed_attention_reads_an_fp8_kv_b_as_stored() -> None:
    from dsv3.config import DeepseekV3Config
    from dsv3.model.attention import MultiHeadLatentAttention
    from dsv3.model.rope import RotaryEmbedding

    torch.manual_seed(0)
    cfg = DeepseekV3Config.tiny()                                      # dn + dv = 16 + 24 = 40 rows per head
    mla = MultiHeadLatentAttention(cfg, 0).eval()
    stats = DequantStats()
    block = (cfg.qk_nope_head_dim + cfg.v_head_dim, 32)                # whole heads per row block
    mla.kv_b_proj = Linear.from_linear(mla.kv_b_proj, Fp8Blocks(block, stats=stats))
    x = torch.randn(2, 1, cfg.hidden_size)
    freqs = RotaryEmbedding(cfg)(torch.tensor([[7], [7]]))
    latent = torch.randn(2, 8, cfg.kv_lora_rank + cfg.qk_rope_head_dim)

    class Fixed:
        def update(self, layer_idx: int, new: torch.Tensor) -> torch.Tensor:
            return torch.cat([latent[:, :7], new], 1)

    with torch.no_grad():
        want = mla(x, freqs, None, Fixed(), path="absorbed")
        assert stats.calls == 1                                         # kv_b_proj dequantised once
        mla.kv_b_proj.format = mla.kv_b_proj.format.with_kernels(kernels.CpuKernels())
        stats.reset()
        got = mla(x, freqs, None, Fixed(), path="absorbed")
    assert stats.calls == 0                                             # W_UK and W_UV read as stored
    assert_close(got, want, 1e-5 * float(want.abs().max()), "absorbed MLA, FP8 kv_b: kernels vs dequantise")


@pytest.mark.parametrize("parts, experts, rows", [(1, None, (0, 300)), (1, None, (70, 260)),
                                                  (2, [6, 1, 1], (0, 80)), (2, [0, 7], (30, 75))])
def test_fp8_dense_kernel_equals_the_reference_bit_for_bit(parts: int, experts: list[int] | None,
                                                           rows: tuple[int, int]) -> None:
    cpu = kernels.CpuKernels()
    if experts is None:
        w, s = _fp8(300, 200, (128, 128), seed=7)
        want = dequantize_fp8_blocks(w, s, (128, 128), torch.bfloat16)
        got = cpu.fp8_dense(w, s, torch.bfloat16, None, rows, (128, 128), 1)
    else:
        w, s = _stack(8, 40, 72, parts, (32, 32), seed=4)
        ids = torch.tensor(experts)
        want = dequantize_fp8_stacked(w[ids], s[ids], (32, 32), torch.bfloat16, parts, "w", 1 << 20)
        got = cpu.fp8_dense(w, s, torch.bfloat16, ids, rows, (32, 32), parts)
    assert torch.equal(got, want[..., rows[0]: rows[1], :])
    assert cpu.fp8_dense(w, s, torch.float32, None if experts is None else ids, rows, (32, 32), parts) is None


def test_fp8_blocks_prefill_dequantises_per_tile_through_the_kernel() -> None:
    stock = _fp8_layer(300, 200, Fp8Blocks())
    cpu = kernels.CpuKernels()
    fast = _fp8_layer(300, 200, Fp8Blocks(kernels=cpu, tile_elements=200 * 64))   # 5 tiles of 64 rows
    x = torch.randn(1, 40, 200).bfloat16()                                         # 40 rows: past the GEMV kernel
    with torch.no_grad():
        got, want = fast(x), stock(x)
    assert cpu.calls["fp8_dense"] == 5
    assert_close(got.float(), want.float(), 0.01 * float(want.float().abs().max()), "tiles via the kernel vs stock")


@pytest.mark.slow   # compiles a decode step
@pytest.mark.parametrize("choice", ["on", "off"])
def test_fp8_kept_model_compiles(fp8_checkpoint: Published, caplog: pytest.LogCaptureFixture, choice: str) -> None:
    """With the kernels, their availability check is a constant to a compiled step (tracing it broke the graph);
    without, the expert stacks take the gather path in the graph (reading the counts on the host raised)."""
    import logging

    from dsv3.generation.generate import generate

    torch._dynamo.reset()
    model = DeepseekV3ForCausalLM.from_pretrained(fp8_checkpoint.path, torch_dtype=torch.bfloat16, fp8="keep",
                                                  kernels=choice)
    ids = torch.randint(2, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    opts = dict(max_new_tokens=5, cache_implementation="static", eos_token_id=[], do_sample=False)   # greedy
    eager = generate(model, ids, **opts)
    with caplog.at_level(logging.WARNING, logger="dsv3.generation.generate"):
        out = generate(model, ids, **opts, compile=True, return_dict_in_generate=True)
    assert "failed to compile" not in caplog.text and out.compiled_steps == 4
    assert torch.equal(out.sequences, eager)
