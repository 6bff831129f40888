"""The AMX expert GEMMs for prefill (dsv3/kernels/cpu_amx.cpp) against their slow reference (the format's own
dequantised weights in fp32, one product per row), for bf16, int8, int4 and FP8 weights, and through the weight
formats with `CpuKernels`, asserting which path ran (`calls`). Skipped on CPUs without AMX-BF16 (AMD, older Intel):
there `CpuKernels.amx` is False and prefill keeps PyTorch's grouped GEMMs, which the last test checks everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsv3 import DeepseekV3Config, kernels
from dsv3.kernels import amx
from dsv3.model.moe import RoutedExperts
from dsv3.quant import intq
from dsv3.quant.formats import ExpertBatch, Fp8Blocks, Plain
from dsv3.quant.fp8 import dequantize_fp8_stacked, quantize_fp8_blocks
from dsv3.quant.int_formats import Int4Grouped, Int8PerChannel
from tests.oracle import assert_close

needs_amx = pytest.mark.skipif(not amx.available(), reason="the AMX expert GEMMs need a CPU with AMX-BF16")

# (experts, rows per expert): empty experts, single rows, tile tails (17, 33), more than two row tiles (70)
COUNTS = [3, 0, 1, 17, 33, 0, 70, 16]


def _ids(counts: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def _bound(x: torch.Tensor, dense: torch.Tensor, ids: torch.Tensor) -> float:
    """fp32 summation tolerance: 1e-5 of the largest Σ|x·w| (both sides multiply the same bf16 values)."""
    return 1e-5 * float(torch.bmm(dense[ids].float().abs(), x.float().abs()[:, :, None]).max()) + 1e-30


def _case(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = _ids(COUNTS)
    x = torch.randn(len(ids), k, generator=g).to(torch.bfloat16)
    dense = torch.randn(len(COUNTS), n, k, generator=g) * torch.rand(len(COUNTS), n, 1, generator=g) * 0.1
    return x, dense, ids


@needs_amx
@pytest.mark.parametrize("n, k", [(96, 256), (48, 64), (64, 2048)])
def test_bf16_and_int8(n: int, k: int) -> None:
    """N a multiple of 32 and not (48: a 16-row last panel), K from 2 to 64 chunks."""
    x, dense, ids = _case(n, k, seed=n + k)
    w = dense.to(torch.bfloat16)
    got = amx.expert_gemm(x, w, None, ids, "bf16")
    assert_close(got, amx.reference_expert_gemm(x, w, ids), _bound(x, w, ids), "AMX bf16")
    # bf16 output: the same fp32 sums, rounded to nearest even
    assert torch.equal(amx.expert_gemm(x, w, None, ids, "bf16", out_dtype=torch.bfloat16), got.to(torch.bfloat16))
    q, s = intq.quantize_int8(dense)
    deq = intq.dequantize_int8(q, s, torch.bfloat16)
    assert_close(amx.expert_gemm(x, q, s, ids, "int8"), amx.reference_expert_gemm(x, deq, ids),
                 _bound(x, deq, ids), "AMX int8")


@needs_amx
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_groups(group: int) -> None:
    x, dense, ids = _case(80, 256, seed=group)
    m = nn.Module()
    fmt = Int4Grouped(group_size=group)
    fmt.adopt(m, "w", dense)
    deq = fmt.matrix(m, "w", torch.bfloat16)                          # the format's own dequantised weights
    got = amx.expert_gemm(x, m.w_packed, m.w_scale_zero, ids, "int4", group=group)
    assert_close(got, amx.reference_expert_gemm(x, deq, ids), _bound(x, deq, ids), f"AMX int4 G={group}")


def _fp8_stack(dense: torch.Tensor, block: tuple[int, int], parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dense [E, N, K] as an FP8 expert stack with `parts` block grids per expert (weights, scale_inv)."""
    pieces = [quantize_fp8_blocks(h, block) for e in range(dense.shape[0]) for h in dense[e].chunk(parts, 0)]
    grouped = [pieces[e * parts:(e + 1) * parts] for e in range(dense.shape[0])]
    return (torch.stack([torch.cat([p[0] for p in g]) for g in grouped]),
            torch.stack([torch.cat([p[1] for p in g]) for g in grouped]))


@needs_amx
@pytest.mark.parametrize("parts, block", [(2, (32, 128)), (1, (128, 128)), (2, (48, 64))])
def test_fp8_blocks(parts: int, block: tuple[int, int]) -> None:
    """Block grids per part (a gate_up stack from separate gate/up tensors) and ragged row blocks (48 of 40 rows)."""
    x, dense, ids = _case(80, 256, seed=parts)
    w, s = _fp8_stack(dense, block, parts)
    deq = dequantize_fp8_stacked(w, s, block, torch.bfloat16, parts)
    got = amx.expert_gemm(x, w, s, ids, "fp8", block=block, parts=parts)
    assert_close(got, amx.reference_expert_gemm(x, deq, ids), _bound(x, deq, ids), f"AMX fp8 {parts} {block}")


def _stack(kind: str, dense: torch.Tensor,
           block: tuple[int, int] = (32, 128)) -> tuple[torch.Tensor, torch.Tensor | None, dict, torch.Tensor]:
    """dense [E, N, K] held as `kind` (FP8: `block`, separate gate/up grids): (weight, scale, expert_gemm keywords,
    the format's dequantised bf16 weights)."""
    if kind == "bf16":
        w = dense.to(torch.bfloat16)
        return w, None, {}, w
    if kind == "int8":
        q, sc = intq.quantize_int8(dense)
        return q, sc, {}, intq.dequantize_int8(q, sc, torch.bfloat16)
    if kind == "int4":
        m, fmt = nn.Module(), Int4Grouped(group_size=64)
        fmt.adopt(m, "w", dense)
        return m.w_packed, m.w_scale_zero, {"group": 64}, fmt.matrix(m, "w", torch.bfloat16)
    w, sc = _fp8_stack(dense, block, 2)
    return w, sc, {"block": block, "parts": 2}, dequantize_fp8_stacked(w, sc, block, torch.bfloat16, 2)


@needs_amx
@pytest.mark.parametrize("kind", ["int8", "int4", "fp8", "fp8 (48, 48)"])
def test_panels_hold_the_dequantised_bits(kind: str) -> None:
    """Unit rows x = e_k read column k of each expert's weights back: every value the kernel multiplies is the
    format's dequantised bf16 value, bit for bit (the panels, built chunk by chunk, for two experts with 80 rows
    = a 16-row last panel, and FP8 blocks of 48 inputs, whose chunks straddle two scale blocks)."""
    experts, n, k = 2, 80, 256
    dense = torch.randn(experts, n, k, generator=torch.Generator().manual_seed(7)) * 0.05
    w, s, extra, deq = _stack(kind.split()[0], dense, (48, 48) if "48" in kind else (128, 128))
    x = torch.eye(k, dtype=torch.bfloat16).repeat(experts, 1)                    # [E·K, K]
    ids = torch.arange(experts).repeat_interleave(k)
    got = amx.expert_gemm(x, w, s, ids, kind.split()[0], **extra)               # [E·K, N]: row e·K + j = W_e[:, j]
    assert torch.equal(got.view(experts, k, n).transpose(1, 2), deq.float()), f"AMX {kind}: panel bits differ"


@needs_amx
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4", "fp8"])
def test_fused_gather_swiglu_and_row_scales(kind: str) -> None:
    """The MoE layer's fusions against the same kernel unfused and PyTorch ops around it: rows gathered through
    `src` (bit for bit), row scales on the fp32 sums (bit for bit), rows added into `dst` rows (the index_add over
    tokens, two threads each owning a column range), and silu(gate)·up of a gate_up stack [E, 2I, K]
    (I = 48: the up rows of gate rows j are 48 + j; FP8 with separate gate/up block grids) against bf16 ops on the
    unfused bf16 output: equal but where the kernel's e^x and PyTorch's round silu's fp32 value to different
    sides of a bf16 rounding boundary (at most one bf16 step of the result, counted)."""
    g = torch.Generator().manual_seed(11)
    ids = _ids(COUNTS)
    p, k, inter = len(ids), 128, 48
    w, s, kw, _ = _stack(kind, torch.randn(len(COUNTS), 2 * inter, k, generator=g) * 0.1)
    x = torch.randn(p + 5, k, generator=g).to(torch.bfloat16)
    src = torch.randperm(p + 5, generator=g)[:p]
    plain = amx.expert_gemm(x[src], w, s, ids, kind, **kw)
    assert torch.equal(amx.expert_gemm(x, w, s, ids, kind, src=src, **kw), plain), "gathered rows differ"
    scale = torch.rand(p, generator=g)
    assert torch.equal(amx.expert_gemm(x, w, s, ids, kind, src=src, row_scale=scale, **kw), plain * scale[:, None])
    dst = torch.randint(0, 7, (p,), generator=g)                               # rows added into 7 output rows
    summed = torch.zeros(7, 2 * inter).index_add_(0, dst, plain * scale[:, None])
    got = amx.expert_gemm(x, w, s, ids, kind, src=src, row_scale=scale, dst=dst, dst_rows=7, **kw)
    assert_close(got, summed, 1e-6 * float(summed.abs().max()), f"AMX {kind}: rows added into their dst rows")
    h = plain.to(torch.bfloat16)
    want = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    got = amx.expert_gemm(x, w, s, ids, kind, src=src, swiglu=True, out_dtype=torch.bfloat16, **kw)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    differ = got != want
    step = (want.float().abs() * 2.0**-7).clamp_min(1e-30)                     # one bf16 step of the result
    assert ((got.float() - want.float()).abs() <= step).all(), f"AMX {kind} swiglu: off by more than a bf16 step"
    assert differ.float().mean() < 0.01, f"AMX {kind} swiglu: {int(differ.sum())} of {differ.numel()} values differ"


@needs_amx
def test_swiglu_with_the_up_rows_apart() -> None:
    """`w_up`: a dense MLP's gate and up weights as two tensors give the same bits as their concatenated stack (E =
    1, row tails of 16 and 32 tiles); and through `SwiGLU` with `CpuKernels`: one counted call for more rows than
    the GEMV kernels take, up to AMX_SWIGLU_MAX_ROWS, the two linears elsewhere, within a bf16 step of them."""
    from dsv3.model.moe import SwiGLU
    from dsv3.model.weights import use_kernels

    g = torch.Generator().manual_seed(5)
    inter, k = 80, 96
    gate, up = (torch.randn(2, inter, k, generator=g) * 0.1).to(torch.bfloat16)
    x = torch.randn(37, k, generator=g).to(torch.bfloat16)
    ids = torch.zeros(37, dtype=torch.long)
    stacked = amx.expert_gemm(x, torch.cat([gate, up])[None], None, ids, "bf16", swiglu=True, out_dtype=torch.bfloat16)
    split = amx.expert_gemm(x, gate[None], None, ids, "bf16", swiglu=True, out_dtype=torch.bfloat16, up=up[None])
    assert torch.equal(split, stacked)
    with pytest.raises(RuntimeError, match="w_up"):
        amx.expert_gemm(x, gate[None], None, ids, "bf16", up=up[None])                       # no swiglu

    mlp = SwiGLU(k, inter).to(torch.bfloat16)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(gate)
        mlp.up_proj.weight.copy_(up)
    ks = kernels.CpuKernels()
    use_kernels(mlp, ks)
    for rows, fused in ((ks.max_rows, False), (ks.max_rows + 1, True), (kernels.AMX_SWIGLU_MAX_ROWS, True),
                        (kernels.AMX_SWIGLU_MAX_ROWS + 1, False)):
        xs = torch.randn(1, rows, k, generator=g).to(torch.bfloat16)
        ks.calls.clear()
        with torch.no_grad():
            got = mlp.partial(xs)
            want = mlp.down_proj(torch.nn.functional.silu(xs @ gate.T) * (xs @ up.T))
        assert ks.calls["amx_swiglu"] == int(fused), (rows, dict(ks.calls))
        assert_close(got, want, 2 ** -7 * float(want.abs().max()), f"SwiGLU, {rows} rows")


def _formats() -> list[tuple[str, object]]:
    return [("bf16", Plain()), ("int8", Int8PerChannel()), ("int4", Int4Grouped(group_size=64)),
            ("fp8", Fp8Blocks(block_size=(128, 128), parts=2))]


@needs_amx
@pytest.mark.parametrize("kind, fmt", _formats(), ids=[k for k, _ in _formats()])
def test_formats_take_the_amx_path_for_prefill(kind: str, fmt: object) -> None:
    """Through a weight format with `CpuKernels`: more rows than the GEMV kernels take run the AMX GEMM (counted),
    and equal the same format without it (the stock dequantise + grouped_mm path, bf16 outputs)."""
    g = torch.Generator().manual_seed(5)
    counts = [40, 0, 90, 30, 1]
    ids = _ids(counts)
    dense = torch.randn(len(counts), 256, 256, generator=g) * 0.05
    x = torch.randn(len(ids), 256, generator=g).to(torch.bfloat16)
    m = nn.Module()
    if kind == "fp8":
        w, s = _fp8_stack(dense, (128, 128), 2)
        m.register_buffer("w", w)
        m.register_buffer("w_scale_inv", s)
    else:
        fmt.adopt(m, "w", dense.to(torch.bfloat16) if kind == "bf16" else dense)
    batch = ExpertBatch.from_sorted(ids, len(counts))
    ks = kernels.CpuKernels(int_isa=None) if not kernels.available() else kernels.CpuKernels()
    with torch.no_grad():
        got = fmt.with_kernels(ks).grouped(m, "w", x, batch)
        want = fmt.with_kernels(None).grouped(m, "w", x, batch)
    assert ks.calls[f"amx_expert_gemm ({kind})"] == 1
    assert got.dtype == want.dtype == torch.bfloat16    # both round the fp32 sums to bf16 once
    assert_close(got.float(), want.float(), 2 ** -7 * float(want.float().abs().max()), f"{kind}: AMX vs stock")


@needs_amx
@pytest.mark.parametrize("kind, fmt", _formats()[1:], ids=[k for k, _ in _formats()[1:]])
def test_large_quantised_matrices_take_amx_for_many_rows(kind: str, fmt: object) -> None:
    """A quantised matrix of at least `amx_dense_min` values times more rows than the GEMV kernels take runs as a
    one-expert AMX GEMM (counted) and equals the format's stock path (dequantised tiles + oneDNN, bf16 outputs);
    below the size, or with fp32 activations, the stock path runs."""
    g = torch.Generator().manual_seed(4)
    dense = torch.randn(96, 256, generator=g) * 0.05
    m = nn.Module()
    if kind == "fp8":
        w, s = quantize_fp8_blocks(dense, (128, 128))
        m.register_buffer("w", w)
        m.register_buffer("w_scale_inv", s)
        fmt = Fp8Blocks(block_size=(128, 128))
    else:
        fmt.adopt(m, "w", dense)
    x = torch.randn(40, 256, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        want = fmt.with_kernels(None).linear(m, "w", x, None)
        for size, dtype, amx_calls in ((96 * 256, torch.bfloat16, 1), (96 * 256 + 1, torch.bfloat16, 0),
                                       (96 * 256, torch.float32, 0)):
            ks = kernels.CpuKernels(amx_dense_min=size) if kernels.available() else kernels.CpuKernels(int_isa=None)
            got = fmt.with_kernels(ks).linear(m, "w", x.to(dtype), None)
            assert ks.calls[f"amx_linear ({kind})"] == amx_calls, (size, dtype, dict(ks.calls))
            assert_close(got.float(), want.float(), 2 ** -7 * float(want.float().abs().max()), f"{kind} linear")


def _experts(kind: str, fmt: object, cfg: DeepseekV3Config, g: torch.Generator) -> RoutedExperts:
    e, i, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gate_up, down = torch.randn(e, 2 * i, d, generator=g) * 0.1, torch.randn(e, d, i, generator=g) * 0.1
    if kind != "fp8":
        experts = RoutedExperts(cfg)
        experts.gate_up_proj = nn.Parameter(gate_up.to(torch.bfloat16))
        experts.down_proj = nn.Parameter(down.to(torch.bfloat16))
        if kind != "bf16":
            experts.adopt_format("gate_up_proj", fmt)
            experts.adopt_format("down_proj", fmt)
        return experts
    with torch.device("meta"):
        experts = RoutedExperts(cfg, Fp8Blocks(block_size=(64, 64), parts=2), Fp8Blocks(block_size=(64, 64)))
    for name, dense, parts in (("gate_up_proj", gate_up, 2), ("down_proj", down, 1)):
        w, s = _fp8_stack(dense, (64, 64), parts)
        setattr(experts, name, nn.Parameter(w, requires_grad=False))
        setattr(experts, name + "_scale_inv", s)
    return experts


@needs_amx
@pytest.mark.parametrize("kind, fmt", _formats(), ids=[k for k, _ in _formats()])
def test_moe_layer_fuses_gather_swiglu_and_weights(kind: str, fmt: object) -> None:
    """A routed-experts layer at prefill with `CpuKernels`: the fused pair of AMX calls (counted; nothing
    dequantised, no per-weight call), equal to the same layer on the stock path (gather, per-weight grouped GEMMs
    with bf16 outputs, silu, mul, weights, index_add) within the stock path's bf16 roundings."""
    cfg = DeepseekV3Config.tiny(n_routed_experts=8, num_experts_per_tok=2, hidden_size=128, moe_intermediate_size=64,
                                n_group=1, topk_group=1)
    g = torch.Generator().manual_seed(9)
    experts = _experts(kind, fmt, cfg, g)
    n = 100                                                            # 200 (token, expert) pairs > max_expert_rows
    x = torch.randn(n, 128, generator=g).to(torch.bfloat16)
    weights = torch.rand(n, 2, generator=g)
    indices = torch.stack([torch.randint(0, 4, (n,), generator=g), torch.randint(4, 7, (n,), generator=g)], -1)
    stock = {k: f.with_kernels(None) for k, f in experts.formats.items()}
    ks = kernels.CpuKernels(int_isa=None) if not kernels.available() else kernels.CpuKernels()
    experts.set_formats(*(f.with_kernels(ks) for f in stock.values()))
    with torch.no_grad():
        got = experts(x, weights, indices, "grouped")
        experts.set_formats(*stock.values())
        want = experts(x, weights, indices, "grouped")
    gk, dk = (experts.formats[k].expert_operands(experts, k).kind for k in ("gate_up_proj", "down_proj"))
    assert ks.calls == {f"amx_moe_experts ({gk}, {dk})": 1}
    assert got.dtype == want.dtype == torch.float32
    assert_close(got, want, 2 ** -6 * float(want.abs().max()), f"{kind}: fused AMX experts vs stock")


def test_without_amx_prefill_keeps_the_stock_grouped_gemm() -> None:
    """`use_amx=False` (and any CPU without AMX) leaves many-row expert products to the format's stock path."""
    if not (kernels.available() or kernels.int_kernels.best_isa() is not None):
        pytest.skip("the dsv3 CPU kernels cannot be built here")
    ks = kernels.CpuKernels(use_amx=False)
    assert ks.amx is False
    x = torch.randn(200, 64).to(torch.bfloat16)
    w = torch.randn(2, 32, 64).to(torch.bfloat16)
    ids = torch.zeros(200, dtype=torch.long)
    assert ks.expert_linear(x, w, ids) is None
    assert not any(k.startswith("amx") for k in ks.calls)
    assert kernels.CpuKernels().amx is amx.available()
