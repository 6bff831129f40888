"""`from_pretrained(path, quantization="int8" | "int4")` (dsv3.checkpoint.quantize): which tensors are quantised,
quantisation while loading from bf16 and FP8 checkpoints — equal to quantising the dense model, read in row
chunks, never a whole tensor in fp32 — and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv3 import DeepseekV3ForCausalLM
from dsv3.checkpoint import loader, quantize
from dsv3.model.moe import RoutedExperts, Router
from dsv3.model.weights import Linear
from dsv3.quant import intq
from dsv3.quant.formats import Fp8Blocks
from dsv3.quant.int_formats import Int4Grouped, Int8PerChannel
from tests.oracle import assert_close
from tests.published import RAGGED_128, Published, build_published


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Published:
    # hidden 160 (int4 groups of 32), dense intermediate 200 (no int4 group: int8), kv_a 144 rows ("rows" packing)
    return build_published(tmp_path_factory.mktemp("q-fp8"), RAGGED_128, (128, 128), seed=5)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return build_published(tmp_path_factory.mktemp("q-bf16"), RAGGED_128, None, seed=6)


def _load(path: Path, **kw: object) -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM.from_pretrained(path, **{"torch_dtype": torch.float32, **kw})


def _quantise_like_the_loader(model: DeepseekV3ForCausalLM, reference: DeepseekV3ForCausalLM) -> None:
    """Quantise a dense model after loading with the formats the quantised load chose (the slow way: whole model)."""
    for name, module in list(reference.named_modules()):
        if isinstance(module, Linear):
            owner, _, child = name.rpartition(".")
            dense = model.get_submodule(name)
            setattr(model.get_submodule(owner) if owner else model, child, Linear.from_linear(dense, module.format))
        elif isinstance(module, RoutedExperts):
            for stack, fmt in module.formats.items():
                model.get_submodule(name).adopt_format(stack, fmt)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("source", ["bf16", "fp8"])
def test_quantised_load_equals_quantising_the_dense_model(quantization: str, source: str, bf16_checkpoint: Published,
                                                          fp8_checkpoint: Published) -> None:
    path = (bf16_checkpoint if source == "bf16" else fp8_checkpoint).path
    q = _load(path, quantization=quantization)
    dense = _load(path)
    cfg = q.config
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_dense = dense(ids).logits
    formats = {type(m.format) for m in q.modules() if isinstance(m, Linear)}
    assert formats == ({Int8PerChannel} if quantization == "int8" else {Int8PerChannel, Int4Grouped})
    assert type(q.lm_head.format) is Int8PerChannel                          # the head: int8 in both modes
    assert q.model.layers[0].mlp.down_proj.format == Int8PerChannel()       # in=200: no int4 group divides it
    if quantization == "int4":
        attn = q.model.layers[0].self_attn
        assert attn.q_a_proj.format.group_size == 32                         # hidden 160 = 5 groups of 32
        assert attn.kv_a_proj_with_mqa.format.layout == "rows"               # 144 rows: not whole 64-row blocks
    for m in q.modules():
        if isinstance(m, Router):
            assert m.weight.dtype == torch.float32 and m.e_score_correction_bias.dtype == torch.float32
        if isinstance(m, RoutedExperts):                                      # down: in=48, no int4 group: int8
            assert type(m.formats["gate_up_proj"]) is (Int8PerChannel if quantization == "int8" else Int4Grouped)
            assert type(m.formats["down_proj"]) is Int8PerChannel
    assert q.model.embed_tokens.weight.dtype == torch.float32                # embeddings as loaded
    _quantise_like_the_loader(dense, q)
    with torch.no_grad():
        got, want = q(ids).logits, dense(ids).logits
    assert torch.equal(got, want), f"max diff {(got - want).abs().max():.3e}"
    assert_close(got, want_dense, 0.05 if quantization == "int8" else 0.5, f"{quantization} vs dense logits")


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantised_load_reads_in_row_chunks_with_the_same_result(quantization: str, layout: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # 2I = 192 expert rows: the second 128-row chunk starts inside the up rows (FP8 blocks read around it)
    pub = build_published(tmp_path, {**RAGGED_128, "moe_intermediate_size": 96}, (128, 128), layout=layout, seed=7)
    whole = _load(pub.path, quantization=quantization)                     # tensors fit one chunk (16 MiB)
    dense = _load(pub.path)
    _quantise_like_the_loader(dense, whole)                                 # the whole-tensor reference
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), dense.state_dict().values(),
                                                 strict=True))
    seen: list[tuple[int, ...]] = []
    for fn in ("quantize_int8", "quantize_int4_integer_zero"):
        original = getattr(intq, fn)

        def spy(w: torch.Tensor, *args: object, original=original) -> object:  # noqa: ANN001
            seen.append(tuple(w.shape))
            return original(w, *args)

        monkeypatch.setattr(intq, fn, spy)
    monkeypatch.setattr(quantize, "LOAD_CHUNK_ELEMENTS", 128 * 160)
    chunked = _load(pub.path, quantization=quantization)
    chunk = 128 * 160                                       # values per chunk, in whole 128-row blocks
    assert seen and all(rows * cols <= max(chunk, 128 * cols) for rows, cols in seen), seen
    assert len(seen) > len([n for n in whole.state_dict() if n.endswith(("_scale", "_scale_zero"))])  # split
    a, b = whole.state_dict(), chunked.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), [
        k for k in a if not torch.equal(a[k], b[k])][:5]


def test_quantization_arguments_fail_clearly(bf16_checkpoint: Published, fp8_checkpoint: Published) -> None:
    with pytest.raises(ValueError, match=r"quantization='int3': expected one of \('int8', 'int4'\)"):
        _load(bf16_checkpoint.path, quantization="int3")
    with pytest.raises(ValueError, match=r"head_quantization='int2': expected one of \('int8', 'int4'\)"):
        _load(bf16_checkpoint.path, quantization="int4", head_quantization="int2")
    with pytest.raises(ValueError, match="head_quantization='int4' applies to a quantised load: pass quantization="):
        _load(bf16_checkpoint.path, head_quantization="int4")


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_head_quantization_int4_makes_both_heads_int4_and_nothing_else(quantization: str,
                                                                        bf16_checkpoint: Published) -> None:
    default = _load(bf16_checkpoint.path, quantization=quantization)
    explicit = _load(bf16_checkpoint.path, quantization=quantization, head_quantization="int8")
    q4 = _load(bf16_checkpoint.path, quantization=quantization, head_quantization="int4")
    heads = ("lm_head", "mtp.0.shared_head.head")
    formats = {n: getattr(m, "format", None) for n, m in q4.named_modules() if isinstance(m, Linear)}
    assert all(n in formats for n in heads), sorted(formats)
    for name, fmt in formats.items():
        held = default.get_submodule(name).format
        assert held == explicit.get_submodule(name).format
        if name in heads:
            assert type(held) is Int8PerChannel and fmt == Int4Grouped(group_size=32, layout=fmt.layout,
                                                                       integer_zero=True), (name, fmt)
        else:
            assert fmt == held, name                                     # every other tensor as the default plan
    dense = _load(bf16_checkpoint.path)
    _quantise_like_the_loader(dense, q4)                                # whole-model reference, same formats
    ids = torch.randint(0, q4.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = q4(ids).logits, dense(ids).logits
    assert torch.equal(got, want), f"max diff {(got - want).abs().max():.3e}"
    head_bytes = {m: sum(t.numel() * t.element_size() for t in m.get_submodule("lm_head").state_dict().values())
                  for m in (default, q4)}
    v, h = q4.config.vocab_size, q4.config.hidden_size
    assert head_bytes[default] == v * h + 4 * v                         # int8 codes, an fp32 scale per row
    assert head_bytes[q4] == v * h // 2 + (h // 32) * v * 2 * 2, head_bytes   # 4 bits + bf16 scale, zero per group


def test_fp8_kept_with_quantization_quantises_only_what_is_not_fp8(fp8_checkpoint: Published) -> None:
    kept = _load(fp8_checkpoint.path, fp8="keep")
    both = _load(fp8_checkpoint.path, quantization="int8", fp8="keep")
    fp8 = {n for n, m in kept.named_modules() if isinstance(m, Linear) and isinstance(m.format, Fp8Blocks)}
    assert fp8 and all(isinstance(both.get_submodule(n).format, Fp8Blocks) for n in fp8)   # held as stored
    assert not isinstance(kept.lm_head, Linear) and type(both.lm_head.format) is Int8PerChannel   # bf16 head: int8
    ids = torch.randint(0, kept.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = kept(ids).logits, both(ids).logits
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 0.01, f"int8 head vs bf16 head: relative logit error {rel:.2%}"


def test_cli_generates_with_quantized_weights(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv3 import cli, modeling

    chosen: list[object] = []
    original = loader.load_pretrained

    def spy(*args: object, **kwargs: object) -> torch.nn.Module:
        chosen.append(kwargs.get("quantization"))
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "load_pretrained", spy)
    assert cli.main(["generate", "def ", "--quantization", "int8", "--max-new-tokens", "8", "--seed", "0"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("def ") and len(out.strip()) > len("def")
    assert chosen == ["int8"]
    with pytest.raises(SystemExit, match="--quantization applies while loading a checkpoint"):
        cli.main(["generate", "def ", "--preset", "tiny", "--quantization", "int4"])
    with pytest.raises(SystemExit, match="--fp8 applies while loading a checkpoint"):
        cli.main(["generate", "def ", "--preset", "tiny", "--fp8", "keep"])


def test_cli_passes_the_weight_flags_to_from_pretrained(capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv3 import cli, modeling

    seen: list[dict[str, object]] = []

    def spy(*args: object, **kwargs: object) -> torch.nn.Module:
        seen.append({k: kwargs.get(k) for k in ("quantization", "head_quantization", "fp8", "kernels")})
        return original(*args, **kwargs)

    original = loader.load_pretrained
    monkeypatch.setattr(modeling, "load_pretrained", spy)
    assert cli.main(["generate", "def ", "--quantization", "int4", "--head-quantization", "int4", "--kernels", "off",
                     "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert seen[-1] == dict(quantization="int4", head_quantization="int4", fp8="dequantize", kernels="off")
    capsys.readouterr()
    for command in (["generate", "x"], ["chat"], ["serve"]):          # the same flags on all three
        args = cli.build_parser().parse_args([*command, "--fp8", "keep", "--quantization", "int8"])
        assert cli.weight_kwargs(args) == dict(quantization="int8", head_quantization=None, fp8="keep",
                                               kernels="auto"), command
    # a bad combination is the library's clear error, as one line and exit code 2 (no traceback)
    assert cli.main(["generate", "def ", "--head-quantization", "int4", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "head_quantization='int4' applies to a quantised load" in err[0], err

