"""Fast by default: `from_pretrained(..., kernels="auto")` picks the CPU kernels where they help (and says so in the
log and in `model.kernels`), "off" opts out, "on" requires them, anything else is a clear error. And the MLA decode
kernel (dsv3/kernels/cpu_attention.cpp) against its fp32 reference and against the matmul path it replaces."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, kernels
from dsv3.generation.generate import DecodeStep, make_cache
from dsv3.kernels import amx
from dsv3.model.attention import MultiHeadLatentAttention, use_attention_kernels
from dsv3.model.weights import Linear
from tests.oracle import assert_close, left_padded_batch

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="CPU kernels need AVX-512 and a C++ compiler")
needs_attention = pytest.mark.skipif(not kernels.attention_available(),
                                     reason="the MLA decode kernel needs AVX512-BF16 and a C++ compiler")


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small bf16 checkpoint as wide as the kernels' threshold (hidden_size 1024)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide")
    cfg = DeepseekV3Config.tiny(hidden_size=kernels.KERNELS_MIN_HIDDEN, num_hidden_layers=2, torch_dtype="bfloat16")
    DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def _layers_with_kernels(model: torch.nn.Module) -> tuple[int, int]:
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.format.kernels is not None]
    attention = [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention) and m.kernels is not None]
    return len(linears), len(attention)


@needs_kernels
def test_from_pretrained_picks_the_kernels_by_default_where_they_help(wide_checkpoint: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dsv3.kernels"):
        model = DeepseekV3ForCausalLM.from_pretrained(wide_checkpoint)
    assert isinstance(model.kernels, kernels.CpuKernels)
    n_linear, n_attention = _layers_with_kernels(model)
    assert n_linear > 0 and n_attention >= model.config.num_hidden_layers      # (+ the MTP layer)
    assert "kernels: CpuKernels" in caplog.text and "kernels='auto'" in caplog.text
    off = DeepseekV3ForCausalLM.from_pretrained(wide_checkpoint, kernels="off")
    assert off.kernels is None and _layers_with_kernels(off) == (0, 0)
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = off(ids).logits.float(), model(ids).logits.float()
    assert_close(got, want, 0.05 * float(want.abs().max()), "default kernels vs kernels='off'")


def test_auto_keeps_the_stock_ops_for_small_or_fp32_models(wide_checkpoint: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    small = DeepseekV3ForCausalLM(DeepseekV3Config.tiny()).to(torch.bfloat16).eval()   # the test presets, the
    with caplog.at_level(logging.INFO, logger="dsv3.kernels"):                        # shipped model: no build
        assert kernels.select_kernels(small) is None
        fp32 = DeepseekV3ForCausalLM.from_pretrained(wide_checkpoint, torch_dtype=torch.float32)
    assert small.kernels is None and _layers_with_kernels(small) == (0, 0)
    assert fp32.kernels is None and _layers_with_kernels(fp32) == (0, 0)
    assert "hidden_size 64 < 1024" in caplog.text and "the model is in torch.float32" in caplog.text


@needs_kernels
def test_auto_takes_the_kernels_for_a_small_quantised_model(tmp_path: Path) -> None:
    """int8/int4 weights take the kernels at any width (PyTorch's int paths are the slow ones): the same small
    model that keeps the stock ops in bf16."""
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(DeepseekV3Config.tiny(torch_dtype="bfloat16")).bfloat16().save_pretrained(tmp_path)
    assert DeepseekV3ForCausalLM.from_pretrained(tmp_path).kernels is None
    for quantization in ("int8", "int4"):
        model = DeepseekV3ForCausalLM.from_pretrained(tmp_path, quantization=quantization)
        assert isinstance(model.kernels, kernels.CpuKernels), quantization
        assert _layers_with_kernels(model)[0] > 0


def test_bad_kernels_value_is_a_clear_error_before_loading(wide_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"kernels='fast'.*'auto'.*'on'.*'off'"):
        DeepseekV3ForCausalLM.from_pretrained(wide_checkpoint, kernels="fast")


def test_kernels_on_where_they_cannot_run_is_a_clear_error(wide_checkpoint: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.raises(ValueError, match="kernels='on'.*cannot be built"):
        DeepseekV3ForCausalLM.from_pretrained(wide_checkpoint, kernels="on")
    model = DeepseekV3ForCausalLM.from_pretrained(wide_checkpoint)            # auto: the stock ops, no error
    assert model.kernels is None


def test_cli_uses_the_library_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv3 import cli

    seen = {}

    def fake_from_pretrained(path, **kwargs):  # noqa: ANN001, ANN202
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(DeepseekV3ForCausalLM, "from_pretrained", fake_from_pretrained)
    for argv, want in ((["generate", "x"], "auto"), (["generate", "x", "--kernels", "off"], "off")):
        seen.clear()
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert seen.get("kernels") == want


# -- the MLA decode kernel ------------------------------------------------------------------------------------------
@needs_attention
@pytest.mark.parametrize("tiles", [False, pytest.param(True, marks=pytest.mark.skipif(
    not amx.available(), reason="the MLA kernel's AMX path needs a CPU with AMX-BF16"))], ids=["vdpbf16ps", "amx"])
@pytest.mark.parametrize("b, h, t", [(1, 16, 8192), (2, 5, 37), (1, 128, 300), (3, 16, 1), (1, 17, 9), (1, 16, 1100),
                                     (2, 16, 65)])
def test_mla_decode_kernel_matches_fp32_reference(b: int, h: int, t: int, tiles: bool) -> None:
    """Both paths of the kernel (the switch is process-wide: restored after), strided latents, token tails."""
    before = kernels.attention_amx()
    assert kernels.set_attention_amx(tiles) is tiles
    try:
        _check_mla_decode(b, h, t)
    finally:
        kernels.set_attention_amx(before)


def _check_mla_decode(b: int, h: int, t: int) -> None:
    g = torch.Generator().manual_seed(h + t)
    cache = torch.randn(b, t + 11, 576, generator=g).bfloat16()
    latent = cache[:, :t]                                              # a strided view, as a static cache returns
    query = (torch.randn(b, h, 576, generator=g) * 0.3).bfloat16()
    got = kernels.mla_decode(query, latent, 512, 0.135)
    want = kernels.reference_mla_decode(query, latent, 512, 0.135)
    # probabilities rounded to bf16 (relative 2⁻⁹ each) for the value sum, normalised by their own sum:
    # |Σ w'·v - Σ w·v| ≤ Σ|w' - w|·max|v| ≤ 2⁻⁸·max|v|; seen 7x (9 tokens) to 100x (8192) inside it
    assert_close(got, want, 2**-8 * float(latent[..., :512].float().abs().max()), "mla decode kernel")


class CountingAttention(kernels.CpuKernels):
    def __init__(self) -> None:
        super().__init__()
        self.served = 0

    def latent_decode(self, query: torch.Tensor, latent: torch.Tensor, r: int, scale: float) -> torch.Tensor | None:
        y = super().latent_decode(query, latent, r, scale)
        self.served += y is not None
        return y


@needs_attention
def test_decode_with_the_attention_kernel_is_as_accurate_as_the_matmul_path() -> None:
    torch.manual_seed(0)
    cfg = DeepseekV3Config.tiny(num_attention_heads=5, num_key_value_heads=5)
    model = DeepseekV3ForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))

    def decode(m: DeepseekV3ForCausalLM) -> torch.Tensor:
        cache = make_cache(m, "static", 2, 12)
        with torch.no_grad():
            out = [m(ids[:, :6], past_key_values=cache).logits[:, -1]]
            out += [m(ids[:, t:t + 1], past_key_values=cache).logits[:, -1] for t in range(6, 12)]
        return torch.stack(out, 1).float()

    exact = decode(model)
    model.to(torch.bfloat16)
    stock = decode(model)
    counting = CountingAttention()
    use_attention_kernels(model, counting)
    fast = decode(model)
    assert counting.served == 6 * cfg.num_hidden_layers                  # every decode step, no prefill
    # kv_b_proj read as stored by the head kernels, both directions, in every decode step (the prefill runs the
    # naive path: kv_b_proj as a linear over the latents)
    assert counting.calls["bf16_expert_linear_t"] == counting.calls["bf16_expert_linear (heads)"] \
        == 6 * cfg.num_hidden_layers
    stock_err, fast_err = float((stock - exact).abs().max()), float((fast - exact).abs().max())
    assert fast_err <= 1.5 * stock_err + 1e-3, f"attention kernel {fast_err:.2e} vs matmuls {stock_err:.2e}"
    assert_close(fast, stock, 4 * stock_err + 1e-3, "attention kernel vs matmuls (bf16)")

    # a padded batch needs a mask: the matmul path runs, the kernel is not asked
    counting.served = 0
    pad_ids, mask = left_padded_batch(cfg.vocab_size, [5, 3])
    cache = make_cache(model, "static", 2, 6)
    with torch.no_grad():
        model(pad_ids, attention_mask=mask, past_key_values=cache)
        model(pad_ids[:, :1], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
              past_key_values=cache)
    assert counting.served == 0


@needs_attention
@pytest.mark.slow   # compiles a decode step
def test_compiled_decode_runs_the_mla_kernel_in_the_graph(caplog: pytest.LogCaptureFixture) -> None:
    """The kernels' availability checks happen outside the traced step (a check inside it broke the graph and
    sent every step back to eager)."""
    from dsv3.generation.generate import generate

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny()).bfloat16().eval()
    counting = CountingAttention()
    use_attention_kernels(model, counting)
    ids = torch.randint(2, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    eager = generate(model, ids, max_new_tokens=6, cache_implementation="static", eos_token_id=[])
    assert counting.served == 5 * model.config.num_hidden_layers          # eager: every decode step's layers
    with caplog.at_level(logging.WARNING, logger="dsv3.generation.generate"):
        out = generate(model, ids, max_new_tokens=6, cache_implementation="static", eos_token_id=[], compile=True,
                       return_dict_in_generate=True)
    assert "failed to compile" not in caplog.text and out.compiled_steps == 5
    assert torch.equal(out.sequences, eager)
    # ... compiled with the graph's own kernels single-threaded (see the next test)
    assert DecodeStep(model, compile=True).compile_options == {"cpp_wrapper": True, "cpp.threads": 1}


@needs_attention
def test_compiled_cpu_decode_runs_its_glue_kernels_single_threaded_only_with_the_mla_kernel() -> None:
    """inductor's own kernels run on one thread only where the MLA decode kernel takes the attention (then the
    graph holds no context-sized work); the matmul path keeps them parallel; GPUs get no CPU options."""
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny()).bfloat16().eval()
    assert DecodeStep(model, compile=True).compile_options == {"cpp_wrapper": True}
    assert DecodeStep(model, compile=False).compile_options == {}
    use_attention_kernels(model, kernels.CpuKernels())
    assert DecodeStep(model, compile=True).compile_options == {"cpp_wrapper": True, "cpp.threads": 1}
    model.model.layers[0].self_attn.kernels = None                      # one layer on matmuls: parallel glue
    assert DecodeStep(model, compile=True).compile_options == {"cpp_wrapper": True}


@needs_attention
def test_short_multi_token_steps_run_the_decode_kernel_per_position_bit_for_bit() -> None:
    """A step of a few tokens without padding (MTP's verification) takes the MLA decode kernel once per position,
    so every position's logits equal those of one-token steps exactly — shared slots, and rows at their own
    slots (a per-row cache, as speculative decoding leaves it); a padded step or a long one stays on the
    matmuls."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny()).bfloat16().eval()
    counting = CountingAttention()
    use_attention_kernels(model, counting)
    layers = model.config.num_hidden_layers
    ids = torch.randint(2, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))

    def prefill(n: list[int]) -> object:
        cache = make_cache(model, "dynamic", 2, 12)
        with torch.no_grad():
            model(ids[:, : max(n)], past_key_values=cache)
        cache.crop(torch.tensor(n), max_length=max(n))
        return cache

    with torch.no_grad():
        for n in ([6, 6], [6, 4]):                          # shared slots; rows at their own slots
            pos = torch.tensor(n)[:, None] + torch.arange(3)                      # [B, 3]
            step_ids = torch.stack([ids[r, n[r]: n[r] + 3] for r in range(2)])
            cache = prefill(n)
            counting.served = 0
            multi = model(step_ids, position_ids=pos, past_key_values=cache, logits_to_keep=3).logits
            calls = 3 if n[0] == n[1] else 6                # per position (whole batch), or per row and position
            assert counting.served == calls * layers, n
            cache = prefill(n)
            single = torch.stack([model(step_ids[:, i: i + 1], position_ids=pos[:, i: i + 1], past_key_values=cache
                                        ).logits[:, -1] for i in range(3)], 1)
            assert torch.equal(multi, single), f"{n}: max diff {float((multi - single).abs().max())}"

        counting.served = 0
        pad_ids, mask = left_padded_batch(model.config.vocab_size, [5, 3])
        model(pad_ids, attention_mask=mask, past_key_values=make_cache(model, "dynamic", 2, 8))   # padded prefill
        model(ids[:, :9], past_key_values=make_cache(model, "dynamic", 2, 12))                   # 9 > 8 tokens
        assert counting.served == 0
