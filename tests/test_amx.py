"""The AMX expert GEMMs for prefill (dsv3/kernels/cpu_amx.cpp) against their slow reference (the format's own
dequantised weights in fp32, one product per row), for bf16, int8, int4 and FP8 weights, and through the weight
formats with `CpuKernels`, asserting which path ran (`calls`). Skipped on CPUs without AMX-BF16 (AMD, older Intel):
there `CpuKernels.amx` is False and prefill keeps PyTorch's grouped GEMMs, which the last test checks everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsv3 import kernels
from dsv3.kernels import amx
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


@needs_amx
@pytest.mark.parametrize("kind", ["int8", "int4", "fp8", "fp8 (48, 48)"])
def test_panels_hold_the_dequantised_bits(kind: str) -> None:
    """Unit rows x = e_k read column k of each expert's weights back: every value the kernel multiplies is the
    format's dequantised bf16 value, bit for bit (the panels, built chunk by chunk, for two experts with 80 rows
    = a 16-row last panel, and FP8 blocks of 48 inputs, whose chunks straddle two scale blocks)."""
    experts, n, k = 2, 80, 256
    dense = torch.randn(experts, n, k, generator=torch.Generator().manual_seed(7)) * 0.05
    if kind == "int8":
        w, s = intq.quantize_int8(dense)
        deq, extra = intq.dequantize_int8(w, s, torch.bfloat16), {}
    elif kind == "int4":
        m, fmt = nn.Module(), Int4Grouped(group_size=64)
        fmt.adopt(m, "w", dense)
        w, s, deq, extra = m.w_packed, m.w_scale_zero, fmt.matrix(m, "w", torch.bfloat16), {"group": 64}
    else:
        block = (48, 48) if "48" in kind else (128, 128)
        w, s = _fp8_stack(dense, block, 2)
        deq, extra = dequantize_fp8_stacked(w, s, block, torch.bfloat16, 2), {"block": block, "parts": 2}
    x = torch.eye(k, dtype=torch.bfloat16).repeat(experts, 1)                    # [E·K, K]
    ids = torch.arange(experts).repeat_interleave(k)
    got = amx.expert_gemm(x, w, s, ids, kind.split()[0], **extra)               # [E·K, N]: row e·K + j = W_e[:, j]
    assert torch.equal(got.view(experts, k, n).transpose(1, 2), deq.float()), f"AMX {kind}: panel bits differ"


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
