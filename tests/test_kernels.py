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


def test_expert_kernel_rejects_bad_ids() -> None:
    w = torch.zeros(4, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.bf16_expert_linear(torch.zeros(1, 16), w, torch.tensor([9]))


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
    with torch.no_grad():                                                             # prefill rows: stock GEMM
        use_kernels(model, counting)
        model(torch.randint(0, cfg.vocab_size, (2, kernels.MAX_EXPERT_ROWS)))
    assert counting.served["expert_linear"] == served["expert_linear"]
