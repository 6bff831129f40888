"""Quantised checkpoints on disk (dsv3.checkpoint.quantized): `dsv3 convert --quantize int8|int4|fp8` and
`save_pretrained` of an int8/int4 model write compressed-tensors' pack-quantized layout; `from_pretrained`
holds it as stored — the same tensors and logits as quantising while loading, without re-quantising. The layout
is checked against a decoder written here from compressed-tensors' description, not with dsv3's own code."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dsv3 import DeepseekV3ForCausalLM
from dsv3.checkpoint import quantized
from dsv3.checkpoint.convert import convert_checkpoint
from dsv3.checkpoint.errors import CheckpointError
from dsv3.checkpoint.safetensors_io import CheckpointReader
from dsv3.model.weights import map_formats
from dsv3.quant import intq
from dsv3.quant.int_formats import Int4Grouped, Int8PerChannel
from tests.oracle import assert_close
from tests.published import RAGGED_128, Published, build_published


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return build_published(tmp_path_factory.mktemp("qc-bf16"), RAGGED_128, None, seed=6)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return build_published(tmp_path_factory.mktemp("qc-fp8"), RAGGED_128, (128, 128), seed=5)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, bf16_checkpoint: Published,
              fp8_checkpoint: Published) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("qc-out")
    out = {}
    for source, pub in (("bf16", bf16_checkpoint), ("fp8", fp8_checkpoint)):
        for q in ("int8", "int4"):
            out[source, q] = Path(convert_checkpoint(pub.path, root / f"{source}-{q}", quantize=q, progress=False)
                                  .directory)
    return out


def _load(path: Path, **kw: object) -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM.from_pretrained(path, **{"torch_dtype": torch.float32, **kw})


def _formats(model: torch.nn.Module) -> dict[str, object]:
    return {n: getattr(m, "format", None) or dict(getattr(m, "formats", {})) for n, m in model.named_modules()
            if hasattr(m, "format") or hasattr(m, "formats")}


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module, rounded: tuple[str, ...] = ()) -> None:
    """Identical tensors, except those whose names end with `rounded`: equal after rounding to bf16 (a plain
    tensor dequantised from FP8 is written to a converted checkpoint in bf16, loaded from the source in fp32)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))[:8]
    exact = [k for k in sa if not k.endswith(rounded)]
    differ = [k for k in exact if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not differ, differ[:8]
    near = [k for k in sa if k.endswith(rounded)]
    assert all(torch.equal(sa[k].bfloat16(), sb[k].bfloat16()) for k in near), near


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("source", ["bf16", "fp8"])
def test_converted_checkpoint_loads_as_quantising_while_loading(source: str, quantization: str, converted,  # noqa: ANN001
                                                                bf16_checkpoint: Published, fp8_checkpoint: Published,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = (bf16_checkpoint if source == "bf16" else fp8_checkpoint).path
    want = _load(src, quantization=quantization)

    def no_quantising(*args: object, **kwargs: object) -> None:
        raise AssertionError("a quantised checkpoint must load without re-quantising")

    for fn in ("quantize_int8", "quantize_int4", "quantize_int4_integer_zero"):
        monkeypatch.setattr(intq, fn, no_quantising)
    got = _load(converted[source, quantization])
    monkeypatch.undo()
    # identical tensors and dtypes; kv_b_proj (held as loaded, quantize.KEPT) of an FP8 source: bf16 in the file
    _assert_same_state(got, want, ("kv_b_proj.weight",) if source == "fp8" else ())
    assert _formats(got) == _formats(want)                                  # held in the same formats
    ids = torch.randint(0, got.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = got(ids).logits, want(ids).logits
    if source == "fp8":
        assert_close(a, b, 1e-2 * float(b.abs().max()), "converted FP8 source: kv_b_proj rounded to bf16")
    else:
        assert torch.equal(a, b), f"max diff {(a - b).abs().max():.3e}"
    # and the same under the model's default dtype (bf16 plain tensors, as converted)
    got16, want16 = _load(converted[source, quantization], torch_dtype="auto"), _load(src, quantization=quantization,
                                                                                      torch_dtype="auto")
    with torch.no_grad():
        assert torch.equal(got16(ids).logits, want16(ids).logits)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_int4_heads_convert_and_load_as_quantising_while_loading(quantize: str, bf16_checkpoint: Published,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    dst = convert_checkpoint(bf16_checkpoint.path, tmp_path / "q", quantize=quantize, quantize_head="int4",
                             progress=False).directory
    want = _load(bf16_checkpoint.path, quantization=quantize, head_quantization="int4")
    with CheckpointReader(Path(dst)) as reader:                       # the heads on disk: 8 int4 values a word
        v, h = want.config.vocab_size, want.config.hidden_size
        for head in ("lm_head", "model.layers.2.shared_head.head"):
            assert reader.shape(f"{head}.weight_packed") == (v, h // 8), head
            assert reader.shape(f"{head}.weight_scale") == (v, h // 32), head
    for fn in ("quantize_int8", "quantize_int4", "quantize_int4_integer_zero"):
        monkeypatch.setattr(intq, fn, lambda *a, **k: pytest.fail("a quantised checkpoint must not re-quantise"))
    got = _load(Path(dst))
    got_named = _load(Path(dst), head_quantization="int4")         # naming what is stored is accepted
    monkeypatch.undo()
    _assert_same_state(got, want)
    assert _formats(got) == _formats(want) == _formats(got_named)
    assert isinstance(got.lm_head.format, Int4Grouped)
    ids = torch.randint(0, v, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    with pytest.raises(ValueError, match="head_quantization='int8', but the LM head in .* is int4"):
        _load(Path(dst), head_quantization="int8")


def test_stored_int8_head_is_checked_against_head_quantization(converted) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="head_quantization='int4', but the LM head in .* is int8; load it without"):
        _load(converted["bf16", "int4"], head_quantization="int4")


# -- the layout, read by a decoder written from compressed-tensors' description ------------------------------
def _unpack_int32(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """compressed-tensors' unpack_from_int32 (packed_dim=1), in plain shifts: signed values [R, count]."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    w = words.to(torch.int64) & 0xFFFFFFFF
    values = torch.stack([(w >> (bits * i)) & mask for i in range(per_word)], dim=-1).flatten(-2)
    return values[:, :count] - (1 << (bits - 1))


def _reference_dense(tensors: dict[str, torch.Tensor], bits: int, group: int | None) -> torch.Tensor:
    out, cols = tensors["weight_shape"].tolist()
    q = _unpack_int32(tensors["weight_packed"], bits, cols).float()
    scale = tensors["weight_scale"].float()
    if bits == 8:
        return q * scale
    zp = _unpack_int32(tensors["weight_zero_point"].t(), 4, out).t().float()       # packed along the rows
    assert group is not None
    return ((q.view(out, -1, group) - zp[..., None]) * scale[..., None]).view(out, cols)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_disk_layout_is_compressed_tensors_pack_quantized(quantization: str, converted,  # noqa: ANN001
                                                          bf16_checkpoint: Published) -> None:
    path = converted["bf16", quantization]
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["format"], cfg["quantization_status"]) == (
        "compressed-tensors", "pack-quantized", "compressed")
    assert r"re:.*mlp\.gate$" in cfg["ignore"]
    schemes = quantized.parse_config(cfg)
    dense_model = _load(bf16_checkpoint.path)
    q_model = _load(path)
    cases = {"model.layers.0.self_attn.q_a_proj": dense_model.model.layers[0].self_attn.q_a_proj.weight,
             "model.layers.1.mlp.experts.3.up_proj": dense_model.model.layers[1].mlp.experts.gate_up_proj[3, 48:],
             "model.layers.0.mlp.down_proj": dense_model.model.layers[0].mlp.down_proj.weight,       # in=200: int8
             "lm_head": dense_model.lm_head.weight}
    with CheckpointReader(path) as reader:
        keys = set(reader.keys())
        for module, dense in cases.items():
            assert f"{module}.weight" not in keys
            scheme = schemes.of(module)
            bits = 8 if quantization == "int8" or module.endswith(("down_proj", "lm_head")) else 4
            assert scheme is not None and scheme.bits == bits, (module, scheme)
            t = {s: reader.read(f"{module}.{s}") for s in quantized.SUFFIXES if f"{module}.{s}" in keys}
            out, cols = dense.shape
            assert t["weight_shape"].tolist() == [out, cols] and t["weight_shape"].dtype == torch.int64
            assert t["weight_packed"].dtype == torch.int32
            assert tuple(t["weight_packed"].shape) == (out, cols * bits // 32)
            if bits == 4:
                group = scheme.group_size
                assert group == 32 and not scheme.symmetric                  # hidden 160: groups of 32
                assert t["weight_scale"].dtype == torch.bfloat16 and tuple(t["weight_scale"].shape) == (out, cols // 32)
                assert t["weight_zero_point"].dtype == torch.int32
                assert tuple(t["weight_zero_point"].shape) == (-(-out // 8), cols // 32)
                step = t["weight_scale"].float().repeat_interleave(32, dim=1)
            else:
                group = None
                assert "weight_zero_point" not in t and tuple(t["weight_scale"].shape) == (out, 1)
                step = t["weight_scale"].float().expand(out, cols)
            ref = _reference_dense(t, bits, group)
            # the decoded weights are the quantisation of the dense ones (within half a step, plus the bf16 scale)
            assert ((ref - dense.float()).abs() <= 0.55 * step + 1e-7).all(), module
            # and what the loaded model multiplies by (its bf16 zero (8 - zp)·s rounds once)
            layer = {"model.layers.0.self_attn.q_a_proj": lambda m: m.model.layers[0].self_attn.q_a_proj.matrix(
                         torch.float32),
                     "model.layers.1.mlp.experts.3.up_proj": lambda m: m.model.layers[1].mlp.experts.stacked_weights(
                         torch.tensor([3]), torch.float32)[0][0, 48:],
                     "model.layers.0.mlp.down_proj": lambda m: m.model.layers[0].mlp.down_proj.matrix(torch.float32),
                     "lm_head": lambda m: m.lm_head.matrix(torch.float32)}[module](q_model)
            assert_close(layer, ref, float(step.max()) * 2 ** -6, f"{module}: held vs compressed-tensors decode")


def test_save_pretrained_writes_what_convert_writes(converted, bf16_checkpoint: Published,  # noqa: ANN001
                                                    tmp_path: Path) -> None:
    model = _load(bf16_checkpoint.path, quantization="int4", torch_dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "saved")
    done = converted["bf16", "int4"]
    assert (json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
            == json.loads((done / "config.json").read_text())["quantization_config"])
    with CheckpointReader(tmp_path / "saved") as a, CheckpointReader(done) as b:
        assert set(a.keys()) == set(b.keys())
        packed = [k for k in a.keys() if k.endswith(quantized.SUFFIXES)]
        assert len(packed) > 50
        differ = [k for k in packed if a.dtype(k) != b.dtype(k) or not torch.equal(a.read(k), b.read(k))]
        assert not differ, differ[:8]
        # plain tensors: the same values (the saved model keeps its fp32 router in fp32, convert writes bf16)
        assert all(torch.equal(a.read(k).float(), b.read(k).float()) for k in set(a.keys()) - set(packed))
    _assert_same_state(_load(tmp_path / "saved", torch_dtype=torch.bfloat16), model)


def test_int4_with_float_zero_points_is_not_saved(bf16_checkpoint: Published, tmp_path: Path) -> None:
    model = _load(bf16_checkpoint.path, quantization="int4")
    changed = map_formats(model, lambda f: replace(f, integer_zero=False) if isinstance(f, Int4Grouped) else f)
    assert changed > 0
    with pytest.raises(ValueError, match="zero points are not integers"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["rows", "cpu"])
def test_memory_disk_memory_is_exact_for_both_int4_packings(layout: str) -> None:
    if layout == "cpu" and not intq.cpu_layout_supported():
        pytest.skip("PyTorch's int4 pack op does not write the 'cpu' layout here")
    fmt = Int4Grouped(group_size=32, layout=layout, integer_zero=True)
    holder = torch.nn.Module()
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(0))
    w[5, :32] = 0.0                                                         # an all-zero group
    w[7, 32:64] = torch.linspace(0.1, 0.9, 32)                              # a group above zero
    fmt.adopt(holder, "weight", w)
    canon = quantized.held_to_canonical(fmt, holder, "weight")
    disk = quantized.to_disk("x", canon)
    back = quantized.from_disk("x", quantized.Scheme(4, 32, False), disk.__getitem__, set(disk), "test")
    held = quantized.canonical_to_held(fmt, back)
    for name, t in zip(fmt.tensor_names("weight"), held, strict=True):
        assert torch.equal(getattr(holder, name), t), name
    assert quantized.disk_shapes("x", 4, 128, 96, 32) == {k: (v.dtype, tuple(v.shape)) for k, v in disk.items()}


def test_symmetric_int4_from_another_tool_loads_with_zero_point_zero() -> None:
    # vLLM's common W4A16: symmetric groups, no weight_zero_point; values q in -8..7, W = q·s
    q = torch.randint(-8, 8, (16, 64), generator=torch.Generator().manual_seed(1))
    scale = torch.rand(16, 2, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    words = quantized._pack_words((q + 8).to(torch.uint8), 4)
    tensors = {"x.weight_packed": words, "x.weight_scale": scale, "x.weight_shape": torch.tensor([16, 64])}
    w = quantized.from_disk("x", quantized.Scheme(4, 32, True), tensors.__getitem__, set(tensors), "test")
    dense = intq.dequantize_int4(w.q, w.scale, quantized._int4_zero(w.scale, w.zero_point.float()), torch.float32)
    want = (q.float().view(16, 2, 32) * scale.float()[..., None]).view(16, 64)
    assert torch.equal(dense, want)


# -- FP8 blocks, errors, CLI ----------------------------------------------------------------------------------
def test_convert_to_fp8_blocks_writes_the_published_layout(bf16_checkpoint: Published, tmp_path: Path) -> None:
    from dsv3.checkpoint.fp8 import quantize_fp8_blocks

    out = Path(convert_checkpoint(bf16_checkpoint.path, tmp_path / "fp8", quantize="fp8", progress=False).directory)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": [128, 128]}
    dense = _load(bf16_checkpoint.path)
    with CheckpointReader(out) as reader:
        assert reader.dtype("model.layers.1.mlp.experts.2.down_proj.weight") == torch.float8_e4m3fn
        assert reader.dtype("model.layers.0.self_attn.kv_a_proj_with_mqa.weight") == torch.float8_e4m3fn
        for plain in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.gate.weight",
                      f"model.layers.{dense.config.num_hidden_layers}.eh_proj.weight"):
            assert reader.dtype(plain) == torch.bfloat16, plain
        q, s = quantize_fp8_blocks(dense.model.layers[0].self_attn.kv_a_proj_with_mqa.weight, (128, 128))
        assert torch.equal(reader.read("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").view(torch.uint8),
                           q.view(torch.uint8))
        assert torch.equal(reader.read("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"), s)
    keep, dequantised = _load(out, fp8="keep"), _load(out)
    ids = torch.randint(0, keep.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = keep(ids).logits
        assert_close(got, dequantised(ids).logits, 1e-4, "fp8 held vs dequantised on load")
        # random toy weights: e4m3 keeps 3 mantissa bits, so logits move, on average by little
        assert float((got - dense(ids).logits).abs().mean()) < 0.05


def test_convert_quantize_errors(bf16_checkpoint: Published, converted, tmp_path: Path) -> None:  # noqa: ANN001
    src = bf16_checkpoint.path
    with pytest.raises(ValueError, match=r"quantize='int3': expected one of \('int8', 'int4', 'fp8'\)"):
        convert_checkpoint(src, tmp_path / "a", quantize="int3")
    with pytest.raises(ValueError, match="keep_fp8 with quantize='int4': choose one"):
        convert_checkpoint(src, tmp_path / "b", quantize="int4", keep_fp8=True)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write the output there"):
        convert_checkpoint(src, blocker / "out", quantize="int8")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        convert_checkpoint(src, blocker, quantize="int8")
    with pytest.raises(CheckpointError, match="already quantised"):
        convert_checkpoint(converted["bf16", "int4"], tmp_path / "c", quantize="int8")
    with pytest.raises(ValueError, match="quantize_head='int4' applies with quantize='int8' or 'int4' \\(got "
                                         "quantize='fp8'\\)"):
        convert_checkpoint(src, tmp_path / "d", quantize="fp8", quantize_head="int4")
    with pytest.raises(ValueError, match=r"quantize_head='int5': expected one of \('int8', 'int4'\)"):
        convert_checkpoint(src, tmp_path / "e", quantize="int4", quantize_head="int5")
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d",
                                        tmp_path / "e"))
    with pytest.raises(ValueError, match=r"already quantised \(int4, compressed-tensors\)"):
        _load(converted["bf16", "int4"], quantization="int8")
    assert isinstance(_load(converted["bf16", "int8"], quantization="int8").lm_head.format, Int8PerChannel)


def test_cli_convert_quantize(bf16_checkpoint: Published, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dsv3 import cli

    assert cli.main(["convert", str(bf16_checkpoint.path), str(tmp_path / "q4"), "--quantize", "int4",
                     "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert isinstance(_load(tmp_path / "q4").model.layers[1].mlp.experts.formats["gate_up_proj"], Int4Grouped)
    assert cli.main(["convert", str(bf16_checkpoint.path), str(tmp_path / "q8h4"), "--quantize", "int8",
                     "--quantize-head", "int4", "--no-progress"]) == 0
    q8h4 = _load(tmp_path / "q8h4")
    assert isinstance(q8h4.lm_head.format, Int4Grouped) and isinstance(q8h4.model.layers[0].mlp.up_proj.format,
                                                                         Int8PerChannel)
    assert cli.main(["convert", str(bf16_checkpoint.path), str(tmp_path / "h"), "--quantize-head", "int4"]) == 1
    assert "quantize_head='int4' applies with quantize='int8' or 'int4'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["convert", str(bf16_checkpoint.path), str(tmp_path / "file" / "q"), "--quantize", "int8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dsv3 convert: error:") and "cannot write the output there" in err and len(
        err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        cli.main(["convert", str(bf16_checkpoint.path), str(tmp_path / "x"), "--quantize", "int2"])
    assert "invalid choice: 'int2'" in capsys.readouterr().err


@pytest.mark.parametrize("quantize", ["int4", "fp8"])
def test_convert_reads_in_row_chunks_and_writes_the_same(quantize: str, fp8_checkpoint: Published, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv3.checkpoint import convert

    whole = convert_checkpoint(fp8_checkpoint.path, tmp_path / "whole", quantize=quantize, progress=False)
    reads: list[tuple[int, int]] = []
    original = CheckpointReader.read

    def spy(self: CheckpointReader, key: str, out: torch.Tensor | None = None,
            rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = original(self, key, out, rows)
        if key.endswith(".weight") and rows is not None:     # the quantised sources: read by rows
            reads.append(tuple(t.shape))
        return t

    monkeypatch.setattr(convert, "CHUNK_ELEMENTS", 128 * 160)
    monkeypatch.setattr(CheckpointReader, "read", spy)
    chunked = convert_checkpoint(fp8_checkpoint.path, tmp_path / "chunked", quantize=quantize, progress=False)
    monkeypatch.undo()
    # never more than a chunk of whole 128-row blocks: dense gate/up (200 rows) and kv_a (144) in two reads
    assert reads and all(r * c <= max(128 * 160, 128 * c) for r, c in reads), reads
    assert (128, 160) in reads and (72, 160) in reads
    with CheckpointReader(whole.directory) as a, CheckpointReader(chunked.directory) as b:
        assert set(a.keys()) == set(b.keys())
        differ = [k for k in a.keys() if a.dtype(k) != b.dtype(k) or not torch.equal(
            a.read(k).view(torch.uint8), b.read(k).view(torch.uint8))]
        assert not differ, differ[:8]


def test_quantised_checkpoint_loads_in_row_chunks(converted, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from dsv3.checkpoint import quantize

    whole = _load(converted["fp8", "int4"])
    reads: list[tuple[str, tuple[int, int]]] = []
    original = CheckpointReader.read

    def spy(self: CheckpointReader, key: str, out: torch.Tensor | None = None,
            rows: tuple[int, int] | None = None) -> torch.Tensor:
        if key.endswith("weight_packed"):
            reads.append((key, rows))
        return original(self, key, out, rows)

    monkeypatch.setattr(quantize, "LOAD_CHUNK_ELEMENTS", 128 * 160)
    monkeypatch.setattr(CheckpointReader, "read", spy)
    chunked = _load(converted["fp8", "int4"])
    monkeypatch.undo()
    assert reads and all(rows is not None for _, rows in reads)                     # never a whole tensor
    assert ("model.layers.0.mlp.gate_proj.weight_packed", (128, 200)) in reads       # 200 rows: two chunks
    _assert_same_state(chunked, whole)
