"""The RMSNorm kernel (cpu_gemv.cpp, `CpuKernels.rms_norm`) against the norm's PyTorch ops, alone and fused with
the residual add, and the paths it declines; the MoE layer's end in one pass (`CpuKernels.moe_residual`) against the
ops it replaces. Skipped (with the reason) where the kernels cannot be built."""

from __future__ import annotations

import pytest
import torch

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, kernels
from dsv3.generation.generate import make_cache
from dsv3.model.norm import RMSNorm, use_norm_kernels
from tests.oracle import assert_close

pytestmark = pytest.mark.skipif(not (kernels.available() and torch.backends.cpu.get_cpu_capability() == "AVX512"),
                                reason="the RMSNorm kernel needs AVX-512 and a C++ compiler")


def _norm(d: int, seed: int) -> RMSNorm:
    norm = RMSNorm(d).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return norm


def _differences(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(fraction of values that differ, largest difference in bf16 steps of the expected value)."""
    g, w = got.float(), want.float()
    step = torch.ldexp(torch.ones_like(w), torch.frexp(w).exponent - 8)   # one bf16 ulp at |w|
    return (g != w).float().mean().item(), ((g - w).abs() / step).max().item()


@pytest.mark.parametrize("rows, d, stride", [(512, 2048, 2048), (3, 768, 768), (7, 512, 576), (5, 100, 130), (1, 7, 7)])
def test_rms_norm_kernel_rounds_as_the_pytorch_ops(rows: int, d: int, stride: int) -> None:
    """Widths with and without a 16-wide tail, strided rows (the kv latent is a slice of a wider row): almost every
    value equal; the rest off by a step of x·rsqrt's rounding (the mean of squares sums in another order), which
    the weight's product may carry to two bf16 steps of the output."""
    g = torch.Generator().manual_seed(rows * d)
    norm = _norm(d, d)
    x = (torch.randn(rows, stride, generator=g) * 3).bfloat16()[:, :d]
    ck = kernels.CpuKernels()
    with torch.no_grad():
        got, want = ck.rms_norm(x, norm.weight, norm.eps), norm._norm(x)
    assert ck.calls["rms_norm"] == 1 and got.shape == want.shape and got.dtype == torch.bfloat16
    frac, steps = _differences(got, want)
    assert steps <= 2 and frac <= 1e-3, f"{frac:.2e} of values differ, by up to {steps} bf16 steps"


@pytest.mark.parametrize("rows, d", [(512, 2048), (2, 100)])
def test_rms_norm_kernel_fuses_the_residual_add(rows: int, d: int) -> None:
    g = torch.Generator().manual_seed(d)
    norm = _norm(d, d + 1)
    x, delta = (torch.randn(2, 1, rows, d, generator=g) * 2).bfloat16()
    norm.kernels = ck = kernels.CpuKernels()
    with torch.no_grad():
        h, y = norm.residual(x, delta)
        h_want = x + delta
        y_want = norm._norm(h_want)
    assert ck.calls["add_rms_norm"] == 1
    assert torch.equal(h, h_want)                                 # the add rounds as PyTorch's bf16 add
    frac, steps = _differences(y, y_want)
    assert steps <= 2 and frac <= 1e-3, f"{frac:.2e} of values differ, by up to {steps} bf16 steps"


def test_rms_norm_kernel_declines_what_it_does_not_take() -> None:
    """fp32 rows, an fp32 weight, autograd and a compiled graph keep the PyTorch ops (nothing counted)."""
    norm = _norm(64, 0)
    norm.kernels = ck = kernels.CpuKernels()
    x = torch.randn(4, 64)
    assert ck.rms_norm(x, norm.weight, norm.eps) is None                            # fp32 rows
    assert ck.rms_norm(x.bfloat16(), norm.weight.float(), norm.eps) is None         # fp32 weight
    with torch.enable_grad():
        out = norm(x.bfloat16().requires_grad_())                                   # autograd: the ops
        out.float().sum().backward()
    compiled = torch.compile(norm, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x.bfloat16()), norm._norm(x.bfloat16()))         # traced: the ops
    assert sum(ck.calls.values()) == 0


def test_model_norms_run_the_kernel_and_match_the_ops() -> None:
    """A bf16 model's prefill with every RMSNorm on the kernel (the residual add before each post-attention norm
    fused) against the same model with the PyTorch ops: counted calls, logits within bf16 noise."""
    config = DeepseekV3Config.tiny(num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(2, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(ids, past_key_values=make_cache(model, "static", 2, 24), use_cache=True).logits.float()

    stock = logits()
    ck = kernels.CpuKernels()
    assert use_norm_kernels(model, ck) == 2 * config.num_hidden_layers + 2 * config.num_hidden_layers + 1
    fused = logits()
    layers = config.num_hidden_layers
    assert ck.calls["add_rms_norm"] == layers                       # post-attention norms, with the residual add
    assert ck.calls["rms_norm"] == layers + 2 * layers + 1          # input, q_a and kv_a norms, the final norm
    assert_close(fused, stock, 2e-2, "logits with the RMSNorm kernel vs PyTorch's ops")


@pytest.mark.parametrize("rows, d, shared", [(512, 2048, True), (3, 100, True), (5, 64, False)])
def test_moe_residual_kernel_gives_the_ops_bits(rows: int, d: int, shared: bool) -> None:
    """bf16(h + bf16(routed + shared)) in one pass: bit for bit what `(routed + shared.float()).to(bf16)` and the
    bf16 residual add give (no reduction, the same roundings); a 16-wide tail; no shared experts."""
    g = torch.Generator().manual_seed(rows + d)
    h = (torch.randn(rows, d, generator=g) * 4).bfloat16()
    routed = torch.randn(rows, d, generator=g) * 3
    sh = (torch.randn(rows, d, generator=g) * 2).bfloat16() if shared else None
    ck = kernels.CpuKernels()
    with torch.no_grad():
        got = ck.moe_residual(h, routed, sh)
    want = h + (routed + (sh.float() if shared else 0.0)).to(torch.bfloat16)
    assert ck.calls["moe_residual"] == 1 and torch.equal(got, want)
    assert ck.moe_residual(h.float(), routed, sh) is None                           # fp32 stream: the ops
    assert ck.moe_residual(h, routed.bfloat16(), sh) is None                        # a bf16 routed sum: the ops


def test_moe_layer_adds_the_residual_in_one_pass() -> None:
    """MoE(x, residual=h) with the CPU kernels: one counted moe_residual call and the same bits as h + MoE(x)."""
    from dsv3.model.moe import MoE
    from dsv3.model.weights import use_kernels

    config = DeepseekV3Config.tiny()
    moe = MoE(config).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in moe.parameters():   # (a bare module's stacks are allocated, not initialised)
            p.normal_(0.0, 0.05, generator=g)
    ck = kernels.CpuKernels()
    use_kernels(moe, ck)
    x, h = torch.randn(2, 1, 9, config.hidden_size, generator=g).bfloat16()
    with torch.no_grad():
        want = h + moe(x)
        assert ck.calls["moe_residual"] == 0
        got = moe(x, residual=h)
    assert ck.calls["moe_residual"] == 1 and torch.equal(got, want)
