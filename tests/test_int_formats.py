"""int8 / int4 weight formats (dsv3.quant.intq, dsv3.quant.int_formats): the quantisation math against slow
per-element references, both compute paths (PyTorch's int pack ops for few rows, dequantise-per-tile for many)
against the dense product, and expert stacks that touch only the experts that received rows."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dsv3.config import DeepseekV3Config
from dsv3.model.moe import RoutedExperts
from dsv3.model.weights import Linear
from dsv3.quant import intq
from dsv3.quant.formats import DequantStats
from dsv3.quant.int_formats import Int4Grouped, Int8PerChannel
from tests.oracle import assert_close

needs_cpu_layout = pytest.mark.skipif(not intq.cpu_layout_supported(), reason="int4 pack op layout unknown here")


def _slow_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0])
    for r in range(w.shape[0]):
        amax = max(abs(float(v)) for v in w[r])
        s[r] = amax / 127 if amax > 0 else 1.0
        for c in range(w.shape[1]):
            q[r, c] = max(-127, min(127, round(float(w[r, c]) / float(s[r]))))
    return q, s


def test_int8_quantisation_matches_a_per_element_loop() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    w[3] = 0                                                   # an all-zero row: scale 1, codes 0
    q, s = intq.quantize_int8(w)
    q_ref, s_ref = _slow_int8(w)
    assert torch.equal(s, s_ref)
    assert (q.int() - q_ref.int()).abs().max() <= 1            # round-half cases of fp32 division
    assert (q != q_ref).float().mean() < 0.02
    err = (intq.dequantize_int8(q, s, torch.float32) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()


def test_int4_quantisation_error_bounds_and_the_scale_search() -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 256) * torch.linspace(0.1, 3, 256)    # groups of different ranges
    w[5, :64] = 0.25                                           # a constant group: exact
    codes, scale, zero = intq.quantize_int4(w, 64, search=False)
    assert codes.max() <= 15 and scale.shape == (64, 4)
    deq = intq.dequantize_int4(codes, scale, zero, torch.float32)
    # slow reference: each value from its group's (scale, zero)
    for r, c in [(0, 0), (7, 100), (63, 255), (5, 3)]:
        g = c // 64
        assert abs(float((int(codes[r, c]) - 8) * scale[r, g] + zero[r, g]) - float(deq[r, c])) < 1e-6
    assert torch.equal(deq[5, :64], w[5, :64])
    span = (w.view(64, 4, 64).amax(-1) - w.view(64, 4, 64).amin(-1))
    assert ((deq - w).abs().view(64, 4, 64).amax(-1) <= span / 30 + 1e-6).all()   # half a step of range/15
    searched = intq.dequantize_int4(*intq.quantize_int4(w, 64, search=True), torch.float32)
    err_rtn = (deq - w).square().view(64, 4, 64).sum(-1)
    err_search = (searched - w).square().view(64, 4, 64).sum(-1)
    assert (err_search <= err_rtn + 1e-6).all() and err_search.sum() < 0.95 * err_rtn.sum()


def test_int4_packings_round_trip() -> None:
    codes = torch.randint(0, 16, (3, 128, 64), dtype=torch.uint8)
    rows = intq.pack_rows(codes)
    assert rows.shape == (3, 128, 32)
    assert int(rows[0, 0, 0]) == int(codes[0, 0, 0]) | int(codes[0, 0, 1]) << 4
    assert torch.equal(intq.unpack_rows(rows), codes)
    if intq.cpu_layout_supported():
        assert torch.equal(intq.unpack_cpu(intq.pack_cpu(codes)), codes)
    assert intq.int4_group_size(256, 128) == 128 and intq.int4_group_size(64, 128) == 64
    assert intq.int4_group_size(72, 128) is None


FORMATS = [Int8PerChannel(), Int4Grouped(group_size=64, layout="rows"),
           pytest.param(Int4Grouped(group_size=64, layout="cpu"), marks=needs_cpu_layout)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{type(f).__name__}-{getattr(f, 'layout', '')}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_paths_against_the_dense_product(fmt, dtype: torch.dtype) -> None:  # noqa: ANN001
    """Few rows: the pack op (nothing dequantised); many rows: dequantise per tile (tiles of 64 rows here);
    both equal x·Wᵀ with W the format's own dequantised matrix (fp64 reference)."""
    torch.manual_seed(2)
    dense = torch.nn.Linear(256, 192, bias=True)
    stats = DequantStats()
    layer = Linear.from_linear(dense, fmt)
    layer.format = replace(fmt, tile_elements=64 * 256, stats=stats)
    w = layer.matrix(torch.float64)                            # [192, 256]
    assert_close(w.float(), dense.weight.detach(), 0.05 if isinstance(fmt, Int4Grouped) else 5e-3, "quantised W")
    for rows, packed in [(1, True), (3, True), (40, False)]:
        pack = packed and not (isinstance(fmt, Int4Grouped) and fmt.layout == "rows")
        x = torch.randn(rows, 256).to(dtype)
        stats.reset()
        with torch.no_grad():
            got = layer(x)
        assert got.dtype == dtype
        want = (x.double() @ w.t() + dense.bias.double()).float()
        assert_close(got.float(), want, 1e-4 if dtype == torch.float32 else 3e-2, f"{rows} rows {dtype}")
        # which path ran: the pack op dequantises nothing; the tiled path three tiles of 64 rows
        assert stats.calls == (0 if pack else 3), (rows, stats.calls)


def _experts(fmt) -> tuple[RoutedExperts, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    cfg = DeepseekV3Config.tiny(n_routed_experts=8, num_experts_per_tok=2, hidden_size=128, moe_intermediate_size=64,
                                n_group=1, topk_group=1)
    torch.manual_seed(3)
    experts = RoutedExperts(cfg)
    gate_up, down = torch.randn(8, 128, 128) * 0.1, torch.randn(8, 128, 64) * 0.1
    experts.gate_up_proj, experts.down_proj = torch.nn.Parameter(gate_up), torch.nn.Parameter(down)
    experts.adopt_format("gate_up_proj", fmt)
    experts.adopt_format("down_proj", fmt)
    return experts, gate_up, down


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{type(f).__name__}-{getattr(f, 'layout', '')}")
def test_expert_stacks_touch_only_the_routed_experts(fmt) -> None:  # noqa: ANN001
    stats = DequantStats()
    experts, gate_up, _ = _experts(fmt)
    experts.set_formats(*(f.with_stats(stats) for f in experts.formats.values()))
    pack = not (isinstance(fmt, Int4Grouped) and fmt.layout == "rows")
    for n in (1, 3, 64):
        x = torch.randn(n, 128)
        weights = torch.rand(n, 2)
        indices = torch.stack([torch.randint(0, 4, (n,)), torch.randint(4, 6, (n,))], -1)   # experts 6, 7 unused
        stats.reset()
        with torch.no_grad():
            got = experts(x, weights, indices, "grouped")
        ran = stats.experts
        with torch.no_grad():
            want = experts(x, weights, indices, "gather")       # dequantised matrices of the chosen experts
        assert_close(got, want, 1e-4, f"grouped vs gather, {n} tokens")
        used = int(indices.unique().numel())
        if n <= 3 and pack:
            assert ran == 0                                     # the pack op on each routed expert
        else:
            assert ran == 2 * used                              # gate_up and down of the routed experts only
    # the dequantised stack is close to the original weights
    assert_close(experts.stacked_weights(dtype=torch.float32)[0], gate_up,
                 0.05 if isinstance(fmt, Int4Grouped) else 2e-3, "stack")


def test_int_formats_reject_bad_arguments_and_conversions() -> None:
    with pytest.raises(ValueError, match="group_size=48"):
        Int4Grouped(group_size=48)
    with pytest.raises(ValueError, match="layout='blocked'"):
        Int4Grouped(layout="blocked")
    with pytest.raises(ValueError, match="multiple of 64 rows"):
        Linear.from_linear(torch.nn.Linear(64, 96), Int4Grouped(group_size=64, layout="cpu"))
    experts, _, _ = _experts(Int8PerChannel())
    with pytest.raises(ValueError, match="adopt_format needs loaded plain weights"):
        experts.adopt_format("down_proj", Int8PerChannel())


def test_int_formats_keep_their_dtypes_under_model_casts() -> None:
    layer = Linear.from_linear(torch.nn.Linear(128, 64), Int8PerChannel())
    x = torch.randn(2, 128)
    want = layer(x)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert_close(layer(x.bfloat16()).float(), want, 3e-2, "after .to(bf16)")


@pytest.mark.parametrize("cols", [72, 200, 48])
def test_int8_pack_path_with_input_widths_off_multiples_of_16(cols: int) -> None:
    """PyTorch's bf16 `_weight_int8pack_mm` is wrong when in_features % 16 != 0 (72, 200); the format multiplies
    in fp32 there. Few rows (the pack path) against the dense product."""
    torch.manual_seed(4)
    layer = Linear.from_linear(torch.nn.Linear(cols, 40, bias=False), Int8PerChannel())
    x = torch.randn(3, cols).bfloat16()
    with torch.no_grad():
        got = layer(x)
    want = x.double() @ layer.matrix(torch.float64).t()
    assert_close(got.float(), want.float(), 3e-2, f"int8 bf16, in={cols}")
