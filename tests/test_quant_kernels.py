"""The int8 / int4 C++ CPU kernels (dsv3/kernels/cpu_int.cpp) against their PyTorch references, every ISA variant
this CPU runs; the formats calling them through the `Kernels` seam (and the counter that shows they ran); the
fallback to PyTorch's ops where they cannot run. Skipped (with the reason) where the kernels cannot be built."""

from __future__ import annotations

import logging
import platform

import pytest
import torch

from dsv3.config import DeepseekV3Config
from dsv3.kernels import CpuKernels, int_kernels
from dsv3.model.moe import RoutedExperts
from dsv3.model.weights import Linear, use_kernels
from dsv3.quant import intq
from dsv3.quant.formats import DequantStats
from dsv3.quant.int_formats import Int4Grouped, Int8PerChannel
from tests.oracle import assert_close

ISAS = int_kernels.supported_isas()
pytestmark = pytest.mark.skipif(not ISAS, reason="int8/int4 CPU kernels need x86-64 with AVX2 and a C++ compiler")
isa_params = pytest.mark.parametrize("isa", ISAS)


def _int8(n: int, k: int, g: torch.Generator, lead: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    return intq.quantize_int8(torch.randn(*lead, n, k, generator=g))


def _int4(n: int, k: int, group: int, g: torch.Generator, lead: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    codes, scale, zero = intq.quantize_int4(torch.randn(*lead, n, k, generator=g), group, search=False)
    sz = torch.stack((scale, zero), -1).transpose(-3, -2).to(torch.bfloat16).contiguous()    # [.., K/G, N, 2]
    return intq.pack_rows(codes), sz


def _tol(ref: torch.Tensor, k: int) -> float:
    """fp32 summation order: a few ulps of the output's size per sqrt(K) terms."""
    return 2e-6 * k**0.5 * max(1.0, float(ref.abs().max()))


@isa_params
@pytest.mark.parametrize("rows, k, n", [(1, 2048, 300), (3, 100, 77), (16, 33, 5), (7, 1408, 129), (1, 7, 3),
                                        (4, 64, 1000), (11, 2, 2)])
def test_int8_linear_matches_reference(isa: str, rows: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + k)
    q, s = _int8(n, k, g)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, k, generator=g).to(dtype)
        got = int_kernels.int8_linear(x, q, s, int_kernels.ISAS[isa])
        ref = int_kernels.reference_int8_linear(x, q, s)
        assert got.dtype == torch.float32
        assert_close(got, ref, _tol(ref, k), f"int8 {isa} {rows}x{k}x{n} {dtype}")


@isa_params
@pytest.mark.parametrize("rows, k, n, group", [(1, 2048, 300, 128), (3, 128, 77, 64), (16, 256, 5, 64),
                                               (5, 1408, 129, 128), (2, 96, 3, 32), (9, 512, 33, 256),
                                               (13, 64, 64, 64)])
def test_int4_linear_matches_reference(isa: str, rows: int, k: int, n: int, group: int) -> None:
    if isa == "avx512_vnni" and group % 64:
        pytest.skip("the AVX-512 kernel takes groups of 64+ (CpuKernels runs the AVX2 one for 32)")
    g = torch.Generator().manual_seed(rows * 1000 + k)
    packed, sz = _int4(n, k, group, g)
    x = torch.randn(rows, k, generator=g)
    x[0, :group] *= 50                                        # an outlier group: its own activation scale
    got = int_kernels.int4_linear(x, packed, sz, group, int_kernels.ISAS[isa])
    ref = int_kernels.reference_int4_linear(x, packed, sz, group)
    assert_close(got, ref, _tol(ref, k), f"int4 {isa} {rows}x{k}x{n} G{group}")
    # against the product with unrounded activations: rounding x to int8 per group moves each value by at most
    # half a step (amax_group/254), so each output by at most Σ_k |W[n, k]|·step_k/2 — a strict bound; typical
    # relative change ≈ (amax/rms)/(254·√3) ≈ 0.6–0.8 % for Gaussian rows
    w = int_kernels._int4_matrix(packed, sz)                                # [N, K]
    exact = torch.nn.functional.linear(x, w)
    half_step = (x.view(rows, -1, group).abs().amax(-1, keepdim=True) / 254).expand(-1, -1, group).reshape(rows, k)
    bound = half_step @ w.abs().t()
    excess = float(((got - exact).abs() - bound).max())
    assert excess <= _tol(ref, k), f"int4 {isa}: the product moved {excess:.3e} beyond the rounding bound"
    rel = float((got - exact).norm() / exact.norm())
    assert 0 < rel < 0.03, f"int4 {isa}: activation rounding changed the product by {rel:.2%}"


@isa_params
@pytest.mark.parametrize("ids", [[0], [2, 2, 2], [0, 1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 7], list(range(8)),
                                 [3] * 16 + [6] * 5])
def test_expert_kernels_match_references_and_skip_unused_experts(isa: str, ids: list[int]) -> None:
    g = torch.Generator().manual_seed(len(ids))
    idx = torch.tensor(ids)
    unused = torch.ones(8, dtype=torch.bool)
    unused[idx] = False
    x = torch.randn(len(ids), 128, generator=g).bfloat16()
    q, s = _int8(40, 128, g, (8,))
    s[unused] = float("nan")                                  # an unused expert's weights never reach any row
    got = int_kernels.int8_expert_linear(x, q, s, idx, int_kernels.ISAS[isa])
    ref = int_kernels.reference_int8_expert_linear(x, q, s, idx)
    assert_close(got, ref, _tol(ref, 128), f"int8 experts {isa} {ids}")
    packed, sz = _int4(72, 128, 64, g, (8,))
    sz[unused] = float("nan")
    got = int_kernels.int4_expert_linear(x, packed, sz, 64, idx, int_kernels.ISAS[isa])
    ref = int_kernels.reference_int4_expert_linear(x, packed, sz, 64, idx)
    assert_close(got, ref, _tol(ref, 128), f"int4 experts {isa} {ids}")


def test_expert_kernels_reject_bad_ids_and_operands() -> None:
    isa = int_kernels.ISAS[ISAS[0]]
    q, s = torch.zeros(4, 8, 16, dtype=torch.int8), torch.ones(4, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        int_kernels.int8_expert_linear(torch.zeros(1, 16), q, s, torch.tensor([9]), isa)
    with pytest.raises(RuntimeError, match="sorted ascending"):
        int_kernels.int8_expert_linear(torch.zeros(2, 16), q, s, torch.tensor([2, 1]), isa)
    with pytest.raises(RuntimeError, match="x must be"):
        int_kernels.int8_linear(torch.zeros(1, 15), q[0], s[0], isa)
    with pytest.raises(RuntimeError, match="group size 48"):
        int_kernels.int4_linear(torch.zeros(1, 96), torch.zeros(8, 48, dtype=torch.uint8),
                                torch.zeros(2, 8, 2, dtype=torch.bfloat16), 48, isa)
    with pytest.raises(RuntimeError, match="isa must be"):
        int_kernels.int8_linear(torch.zeros(1, 16), q[0], s[0], 7)


def test_the_isa_choice_follows_the_cpu_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    f = int_kernels.cpu_features()
    want = ("avx512_vnni" if all(f[k] for k in ("avx512f", "avx512bw", "avx512vl", "avx512vnni"))
            else "avx2" if f["avx2"] and f["fma"] else None)
    assert int_kernels.best_isa() == want
    with caplog.at_level(logging.INFO, logger="dsv3.kernels"):
        kernels = CpuKernels()
    assert kernels.int_isa == want and f"int8/int4 {want}" in caplog.text
    assert CpuKernels(int_isa="avx2").int_isa == "avx2"
    with pytest.raises(ValueError, match="int_isa='sse'"):
        CpuKernels(int_isa="sse")


def test_without_the_kernels_the_choice_is_pytorch(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Another machine (ARM: no extension is built) or a CPU without AVX2: best_isa is None, CpuKernels logs
    that int weights use PyTorch's ops, and the formats run their stock paths (nothing counted)."""
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with caplog.at_level(logging.INFO, logger="dsv3.kernels"):
        assert int_kernels.extension.__wrapped__() is None
    assert "x86-64 only" in caplog.text
    monkeypatch.setattr(int_kernels, "cpu_features", lambda: {})            # what extension() None gives
    assert int_kernels.best_isa() is None and int_kernels.supported_isas() == ()
    monkeypatch.setattr(int_kernels, "cpu_features", lambda: {"avx2": True, "fma": True})   # AVX2-only CPU
    assert int_kernels.best_isa() == "avx2"
    monkeypatch.setattr(int_kernels, "cpu_features", lambda: {})
    kernels = CpuKernels(int_isa="auto") if int_kernels.extension() and _bf16() else None
    if kernels is None:
        pytest.skip("the bf16 kernels are not available here either: CpuKernels cannot be built at all")
    assert kernels.int_isa is None
    layer = Linear.from_linear(torch.nn.Linear(64, 32, bias=False), Int8PerChannel())
    stock = layer(torch.ones(1, 64))
    use_kernels(layer, kernels)
    assert torch.equal(layer(torch.ones(1, 64)), stock) and not kernels.calls


def _bf16() -> bool:
    from dsv3 import kernels

    return kernels.available()


FORMATS = [Int8PerChannel(), Int4Grouped(group_size=64, layout="rows"), Int4Grouped(group_size=32, layout="rows")]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{type(f).__name__}-{getattr(f, 'group_size', '')}")
def test_formats_run_the_kernels_for_few_rows_and_stock_paths_for_many(fmt) -> None:  # noqa: ANN001
    torch.manual_seed(5)
    dense = torch.nn.Linear(192, 136, bias=True)
    kernels, stats = CpuKernels(), DequantStats()
    stock = Linear.from_linear(dense, fmt.with_stats(stats))
    fast = Linear.from_linear(dense, fmt)
    fast.load_state_dict(stock.state_dict())                  # the same stored tensors
    use_kernels(fast, kernels)
    op = "int8_linear" if isinstance(fmt, Int8PerChannel) else "int4_linear"
    int4 = isinstance(fmt, Int4Grouped)
    for rows, kernel in [(1, True), (5, True), (16, True), (17, False)]:
        x = torch.randn(rows, 192).bfloat16()
        kernels.calls.clear()
        with torch.no_grad():
            got, want = fast(x), stock(x)
        assert got.dtype == torch.bfloat16
        assert kernels.calls[op] == (1 if kernel else 0), (rows, dict(kernels.calls))
        # kernels: fp32 accumulation and one rounding to bf16; the stock bf16 path rounds its dequantised
        # weights to bf16 too; int4 also rounds the activations to int8 per group (test above)
        rel = float((got.float() - want.float()).norm() / want.float().norm())
        assert rel < (0.02 if int4 else 0.01), f"{fmt} {rows} rows: kernels vs stock path, relative error {rel:.2%}"


@pytest.mark.parametrize("fmt", FORMATS[:2], ids=lambda f: type(f).__name__)
def test_expert_stacks_through_the_kernels_touch_only_routed_experts(fmt) -> None:  # noqa: ANN001
    cfg = DeepseekV3Config.tiny(n_routed_experts=8, num_experts_per_tok=2, hidden_size=128, moe_intermediate_size=64,
                                n_group=1, topk_group=1)
    torch.manual_seed(3)
    experts = RoutedExperts(cfg)
    experts.gate_up_proj = torch.nn.Parameter(torch.randn(8, 128, 128) * 0.1)
    experts.down_proj = torch.nn.Parameter(torch.randn(8, 128, 64) * 0.1)
    experts.adopt_format("gate_up_proj", fmt)
    experts.adopt_format("down_proj", fmt)
    kernels, stats = CpuKernels(), DequantStats()
    op = "int8_expert_linear" if isinstance(fmt, Int8PerChannel) else "int4_expert_linear"
    for n in (1, 3, 64):
        x = torch.randn(n, 128)
        weights = torch.rand(n, 2)
        indices = torch.stack([torch.randint(0, 4, (n,)), torch.randint(4, 6, (n,))], -1)   # experts 6, 7 unused
        experts.set_formats(*(f.with_kernels(None).with_stats(stats) for f in experts.formats.values()))
        with torch.no_grad():
            want = experts(x, weights, indices, "gather")       # dequantised matrices of the chosen experts
        experts.set_formats(*(f.with_kernels(kernels).with_stats(stats) for f in experts.formats.values()))
        stats.reset()
        kernels.calls.clear()
        with torch.no_grad():
            got = experts(x, weights, indices, "grouped")
        kernel = 2 * n <= kernels.max_expert_rows
        assert kernels.calls[op] == (2 if kernel else 0) and (stats.experts == 0) == kernel, (n, stats.experts)
        if isinstance(fmt, Int4Grouped):    # activations rounded to int8 per group, twice (gate_up and down inputs)
            rel = float((got - want).norm() / want.norm())
            assert rel < 0.02, f"int4 experts via kernels vs gather, {n} tokens: relative error {rel:.2%}"
        else:
            assert_close(got, want, 1e-4, f"{fmt} {n} tokens")


def test_compiled_decode_calls_the_kernels_as_custom_ops() -> None:
    """torch.compile traces the custom ops (fake shapes), no graph break, same result as eager."""
    torch.manual_seed(6)
    layer = Linear.from_linear(torch.nn.Linear(128, 64, bias=False), Int4Grouped(group_size=64, layout="rows"))
    kernels = CpuKernels()
    use_kernels(layer, kernels)
    x = torch.randn(2, 128)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    assert kernels.calls["int4_linear"] == 1                   # the eager call (compiled calls are not counted)
    assert_close(compiled, eager, 1e-5, "compiled vs eager int4 kernel")


def test_int4_loading_packs_rows_where_the_kernels_run() -> None:
    """from_pretrained(quantization="int4") plans the "rows" packing (the one the kernels read) on this CPU."""
    from dsv3 import DeepseekV3ForCausalLM
    from dsv3.checkpoint.quantize import plan_quantization

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny())
    plan = plan_quantization(model, "int4", torch.device("cpu"))
    int4 = [f for f in plan.values() for f in (f if isinstance(f, tuple) else (f,)) if isinstance(f, Int4Grouped)]
    assert int4 and all(f.layout == "rows" for f in int4)


# -- dequantising to bf16 for prefill (cpu_int.cpp int8_dense / int4_dense) ---------------------------------------
dense_kernels = pytest.mark.skipif("avx512_vnni" not in ISAS, reason="the dequantising kernels are AVX-512 only")


@dense_kernels
@pytest.mark.parametrize("lead, rows", [((), (0, 37)), ((), (5, 30)), ((6,), (0, 40)), ((6,), (3, 17))])
def test_dense_kernels_equal_the_references_bit_for_bit(lead: tuple[int, ...], rows: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(len(lead) + rows[0])
    n = 40 if lead else 37
    experts = torch.tensor([4, 0, 4, 2]) if lead else None
    kernels = CpuKernels()
    for k in (100, 2048):                                            # int8: any width (masked tail)
        q, s = _int8(n, k, g, lead)
        got = kernels.int8_dense(q, s, torch.bfloat16, experts, rows)
        qe, se = (q[experts], s[experts]) if lead else (q, s)
        want = intq.dequantize_int8(qe, se, torch.bfloat16)[..., rows[0]: rows[1], :]
        assert torch.equal(got, want), f"int8 dense {lead} {rows} K={k}"
    for k, group in ((2048, 128), (192, 64), (96, 32)):
        packed, sz = _int4(n, k, group, g, lead)
        got = kernels.int4_dense(packed, sz, group, torch.bfloat16, experts, rows)
        pe, sze = (packed[experts], sz[experts]) if lead else (packed, sz)
        szt = sze.transpose(-3, -2)
        want = intq.dequantize_int4(intq.unpack_rows(pe), szt[..., 0], szt[..., 1], torch.bfloat16)
        assert torch.equal(got, want[..., rows[0]: rows[1], :]), f"int4 dense {lead} {rows} K={k} G={group}"
    assert kernels.calls["int8_dense"] == 2 and kernels.calls["int4_dense"] == 3
    assert kernels.int8_dense(q, s, torch.float32, experts, rows) is None       # bf16 only: the stock path


@dense_kernels
def test_dense_results_share_one_buffer_except_under_autograd() -> None:
    q, s = _int8(64, 128, torch.Generator().manual_seed(0))
    kernels = CpuKernels()
    with torch.no_grad():
        a = kernels.int8_dense(q, s, torch.bfloat16, None, (0, 64))
        b = kernels.int8_dense(q, s, torch.bfloat16, None, (0, 32))
    assert a.data_ptr() == b.data_ptr()                              # reused: no fresh pages per tile
    c = kernels.int8_dense(q, s, torch.bfloat16, None, (0, 64))     # grad mode: may be saved for backward
    assert c.data_ptr() != a.data_ptr() and torch.equal(c, intq.dequantize_int8(q, s, torch.bfloat16))


@dense_kernels
@pytest.mark.parametrize("fmt", FORMATS[:2], ids=lambda f: type(f).__name__)
def test_prefill_rows_dequantise_through_the_dense_kernels(fmt) -> None:  # noqa: ANN001
    torch.manual_seed(6)
    dense = torch.nn.Linear(256, 300, bias=True)
    stock = Linear.from_linear(dense, fmt)
    fast = Linear.from_linear(dense, fmt.with_kernels(None))
    fast.load_state_dict(stock.state_dict())
    kernels = CpuKernels()
    use_kernels(fast, kernels)
    x = torch.randn(2, 40, 256).bfloat16()                            # 80 rows: past the GEMV kernels
    with torch.no_grad():
        got, want = fast(x), stock(x)
    op = "int8_dense" if isinstance(fmt, Int8PerChannel) else "int4_dense"
    assert kernels.calls[op] >= 1 and kernels.calls["int8_linear"] + kernels.calls["int4_linear"] == 0
    assert torch.equal(got, want)                                    # the same bf16 matrix, the same GEMM
