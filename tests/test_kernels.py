"""The optional C++ CPU kernels against their PyTorch references, and a model using them against the
same model without them. Skipped (with the reason) where the kernels cannot be built."""

from __future__ import annotations

import pytest
import torch

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, kernels
from dsv3.generation.generate import make_cache
from dsv3.model.weights import Linear, use_kernels
from tests.oracle import assert_close

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels need AVX-512 and a C++ compiler")


@pytest.mark.parametrize("rows, k, n", [(1, 2048, 300), (3, 100, 77), (8, 64, 1000), (16, 33, 5), (11, 1, 2)])
def test_linear_kernel_matches_reference(rows: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(rows * k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    assert_close(kernels.bf16_linear(x, w), kernels.reference_linear(x, w), 1e-4 * k**0.5, "bf16 linear")


@pytest.mark.parametrize("ids", [[0], [2, 2, 2], [0, 1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 7], list(range(8))])
def test_expert_kernel_matches_reference(ids: list[int]) -> None:
    g = torch.Generator().manual_seed(len(ids))
    w = torch.randn(8, 40, 72, generator=g).bfloat16()
    x = torch.randn(len(ids), 72, generator=g).bfloat16()
    idx = torch.tensor(ids)
    assert_close(kernels.bf16_expert_linear(x, w, idx), kernels.reference_expert_linear(x, w, idx), 1e-3,
                 "bf16 expert linear")


@pytest.mark.parametrize("ids, rows", [([0], (0, 40)), ([2, 2, 2], (8, 24)), ([0, 1, 5, 5, 5, 7], (33, 40)),
                                       (list(range(8)), (0, 1))])
def test_expert_kernel_over_a_row_range_matches_reference(ids: list[int], rows: tuple[int, int]) -> None:
    """Rows [row0, row1) of each expert (MLA's W_UV inside kv_b_proj, heads as experts)."""
    g = torch.Generator().manual_seed(len(ids) + rows[0])
    w = torch.randn(8, 40, 72, generator=g).bfloat16()
    x = torch.randn(len(ids), 72, generator=g).bfloat16()
    idx = torch.tensor(ids)
    want = kernels.reference_expert_linear(x, w[:, rows[0]: rows[1]].contiguous(), idx)
    assert_close(kernels.bf16_expert_linear(x, w, idx, *rows), want, 1e-3, "bf16 expert linear, row range")


@pytest.mark.parametrize("ids, rows, k", [([0], (0, 16), 512), ([3, 3], (4, 20), 130), ([0, 1, 1, 6, 7], (16, 32), 40),
                                          (list(range(8)), (0, 32), 300), ([5], (31, 32), 16), ([1, 2], (3, 30), 1100)])
def test_transposed_expert_kernel_matches_reference(ids: list[int], rows: tuple[int, int], k: int) -> None:
    """y[p] = x[p] @ W[ids[p]][rows]: MLA's absorbed query q_nope·W_UK with kv_b_proj as stored; K across
    several 128-column jobs, ragged tails, repeated experts."""
    g = torch.Generator().manual_seed(k + len(ids))
    w = torch.randn(8, 32, k, generator=g).bfloat16()
    x = torch.randn(len(ids), rows[1] - rows[0], generator=g).bfloat16()
    idx = torch.tensor(ids)
    got = kernels.bf16_expert_linear_t(x, w, idx, *rows)
    assert_close(got, kernels.reference_expert_linear_t(x, w, idx, rows), 1e-4 * (rows[1] - rows[0]) ** 0.5,
                 "bf16 transposed expert linear")


def test_head_products_read_kv_b_as_stored() -> None:
    """CpuKernels.head_products (what MLA's absorbed decode calls): both directions against einsum in fp32."""
    g = torch.Generator().manual_seed(0)
    h, dn, dv, r = 5, 24, 16, 40
    w = torch.randn(h, dn + dv, r, generator=g).bfloat16()
    for p in (1, 3):
        q = torch.randn(p, h, dn, generator=g).bfloat16()
        o = torch.randn(p, h, r, generator=g).bfloat16()
        ck = kernels.CpuKernels()
        got_q = ck.head_products(q, w, (0, dn), transposed=True)
        got_o = ck.head_products(o, w, (dn, dn + dv), transposed=False)
        assert ck.calls["bf16_expert_linear_t"] == 1 and ck.calls["bf16_expert_linear (heads)"] == 1
        assert_close(got_q, torch.einsum("phd,hdc->phc", q.float(), w[:, :dn].float()), 1e-4, "q_nope·W_UK")
        assert_close(got_o, torch.einsum("phc,hdc->phd", o.float(), w[:, dn:].float()), 1e-4, "o·W_UVᵀ")
    with torch.enable_grad():   # autograd: not the kernels' business
        assert ck.head_products(q.requires_grad_(), w, (0, dn), transposed=True) is None


def test_expert_kernel_rejects_bad_ids() -> None:
    w = torch.zeros(4, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.bf16_expert_linear(torch.zeros(1, 16), w, torch.tensor([9]))
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.bf16_expert_linear_t(torch.zeros(1, 8), w, torch.tensor([4]), 0, 8)
    with pytest.raises(RuntimeError, match=r"sorted ascending \(1 after 2\)"):
        kernels.bf16_expert_linear(torch.zeros(2, 16), w, torch.tensor([2, 1]))
    with pytest.raises(RuntimeError, match=r"rows \[4, 9\) outside \[0, 8\)"):
        kernels.bf16_expert_linear(torch.zeros(1, 16), w, torch.tensor([0]), 4, 9)


def _decode_logits(model: DeepseekV3ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Prefill 6 tokens, then teacher-forced single-token steps (the kernels' decode regime)."""
    cache = make_cache(model, "static", ids.shape[0], ids.shape[1])
    with torch.no_grad():
        out = [model(ids[:, :6], past_key_values=cache).logits[:, -1]]
        for t in range(6, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(out, 1).float()


def test_model_with_kernels_is_as_accurate_as_without() -> None:
    torch.manual_seed(0)
    cfg = DeepseekV3Config.tiny()
    model = DeepseekV3ForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    exact = _decode_logits(model, ids)
    model.to(torch.bfloat16)
    stock = _decode_logits(model, ids)
    assert kernels.use_cpu_kernels(model)
    with_kernels = _decode_logits(model, ids)
    stock_err = float((stock - exact).abs().max())
    kernel_err = float((with_kernels - exact).abs().max())
    # The kernels accumulate in fp32 from bf16 weights: no less accurate than the stock bf16 path.
    assert kernel_err <= 1.5 * stock_err + 1e-3, f"kernels {kernel_err:.2e} vs stock bf16 {stock_err:.2e}"
    assert_close(with_kernels, stock, 4 * stock_err + 1e-3, "kernels vs stock bf16")


class CountingKernels(kernels.CpuKernels):
    """The CPU kernels, counting the calls they served (None: the format ran the stock op instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.served = {"linear": 0, "expert_linear": 0}

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        y = super().linear(x, weight)
        self.served["linear"] += y is not None
        return y

    def expert_linear(self, x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        y = super().expert_linear(x, weight, ids)
        self.served["expert_linear"] += y is not None
        return y


def test_kernels_are_a_format_argument_not_a_swapped_class() -> None:
    torch.manual_seed(1)
    cfg = DeepseekV3Config.tiny()
    model = DeepseekV3ForCausalLM(cfg).eval().to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    stock = _decode_logits(model, ids)
    tensors = {name: t.data_ptr() for name, t in model.state_dict().items()}
    counting = CountingKernels()
    assert use_kernels(model, counting) > 0
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == tensors   # same names, same tensors
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert all(m.format.kernels is counting for m in model.modules() if isinstance(m, Linear))
    with_kernels = _decode_logits(model, ids)
    assert counting.served["linear"] > 0 and counting.served["expert_linear"] > 0       # the kernels ran
    assert_close(with_kernels, stock, 2e-2, "kernels via use_kernels vs stock bf16")
    served = dict(counting.served)
    use_kernels(model, None)                                                          # back to stock ops
    assert torch.equal(_decode_logits(model, ids), stock) and counting.served == served
    with torch.no_grad():   # prefill rows: the stock GEMM, or on a CPU with AMX the fused AMX experts (counted)
        use_kernels(model, counting)
        model(torch.randint(0, cfg.vocab_size, (2, kernels.MAX_EXPERT_ROWS)))
    amx_calls = counting.calls["amx_moe_experts (bf16, bf16)"]
    assert (amx_calls > 0) == counting.amx
    assert counting.served["expert_linear"] == served["expert_linear"]   # (neither path serves prefill per weight)


def test_eager_calls_skip_the_dispatcher_and_the_op_gives_the_same_result() -> None:
    """kernel_op: eager mode calls the extension directly (the custom-op dispatcher cost ~16 µs per call under
    no_grad); the registered op, what compiled graphs call, runs the same code."""
    from torch.profiler import profile

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 64, generator=g).bfloat16(), torch.randn(24, 64, generator=g).bfloat16()
    with torch.no_grad(), profile() as prof:
        direct = kernels.bf16_linear(x, w)
        via_op = torch.ops.dsv3.bf16_linear.default(x, w)
    names = [e.name for e in prof.events()]
    assert names.count("dsv3::bf16_linear") == 1          # only the explicit op call went through the dispatcher
    assert torch.equal(direct, via_op)
