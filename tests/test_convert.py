"""`dsv3 convert`: FP8 -> bf16 and re-sharding of published-format checkpoints; the output loads in dsv3 and in
transformers 5.23 with the same logits; interrupted runs resume; the CLI entry points."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from dsv3 import DeepseekV3ForCausalLM
from dsv3.checkpoint import convert as convert_module
from dsv3.checkpoint.convert import MARKER_NAME, add_convert_arguments, convert_checkpoint, run_convert
from dsv3.checkpoint.errors import CheckpointError
from dsv3.checkpoint.fp8 import dequantize_fp8_blocks
from dsv3.checkpoint.safetensors_io import INDEX_NAME, CheckpointReader, save_safetensors_sharded
from tests.oracle import compare_padded_logits, left_padded_batch, load_hf, yarn
from tests.published import OTHER_FILES, RAGGED_32, RAGGED_128, Published, build_published


@pytest.fixture(scope="module")
def fp8_128(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return build_published(tmp_path_factory.mktemp("fp8-128"), RAGGED_128, (128, 128), seed=11)


@pytest.fixture(scope="module")
def fp8_32(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return build_published(tmp_path_factory.mktemp("fp8-32"), {**RAGGED_32, "rope_scaling": yarn()}, (32, 32), seed=12)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as reader:
        return {k: reader.read(k) for k in reader.keys()}


def _parse(argv: list[str]) -> argparse.Namespace:
    return add_convert_arguments(argparse.ArgumentParser(prog="dsv3 convert")).parse_args(argv)


def test_fp8_to_bf16_loads_in_dsv3_and_transformers(fp8_128: Published, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:

    out = tmp_path / "bf16"
    assert run_convert(_parse([str(fp8_128.path), str(out), "--max-shard-size", "60KB"])) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "Converting" in captured.err             # summary + progress bar

    # Layout: sharded with an index, no scales, every other tensor (MTP layer included) dequantised to bf16.
    written = _tensors(out)
    assert len(set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values())) > 2
    source = fp8_128.stored
    assert set(written) == {k for k in source if not k.endswith("_scale_inv")}
    for key, t in written.items():
        if key + "_scale_inv" in source:
            want = dequantize_fp8_blocks(source[key], source[key + "_scale_inv"], (128, 128), torch.bfloat16)
        else:
            want = source[key]
        assert t.dtype == want.dtype and torch.equal(t, want), key
    assert written["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert config["auto_map"] == fp8_128.config["auto_map"]                     # everything else as published
    for name, text in OTHER_FILES.items():
        assert (out / name).read_text(encoding="utf-8") == text, name
    assert not [p for p in os.listdir(out) if p.startswith(".")]

    # dsv3 reads it as the FP8 original dequantised to bf16; transformers reads it with the same logits.
    ours = DeepseekV3ForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    from_fp8 = DeepseekV3ForCausalLM.from_pretrained(fp8_128.path, torch_dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(ours.state_dict().items(), from_fp8.state_dict().items(), strict=True):
        assert torch.equal(a, b.float()), name
    compare_padded_logits(ours, load_hf(out), [9, 4], 13, 1e-5, "convert: dsv3 vs transformers")


def test_reshard_and_dtypes(fp8_32: Published, tmp_path: Path) -> None:
    bf16 = convert_checkpoint(fp8_32.path, tmp_path / "bf16", max_shard_size="30KB", progress=False)
    assert len(bf16.files) > 2
    one = convert_checkpoint(tmp_path / "bf16", tmp_path / "one", dtype="auto", max_shard_size="1GB")
    assert [Path(f).name for f in one.files] == ["model.safetensors"] and not (tmp_path / "one" / INDEX_NAME).exists()
    a, b = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "one")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)    # re-sharding changes nothing

    fp32 = convert_checkpoint(tmp_path / "one", tmp_path / "fp32", dtype=torch.float32)
    c = _tensors(tmp_path / "fp32")
    assert all(t.dtype == torch.float32 and torch.equal(t, a[k].float()) for k, t in c.items())
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"
    assert fp32.tensors == len(c)

    kept = convert_checkpoint(fp8_32.path, tmp_path / "fp8", keep_fp8=True, max_shard_size="50KB")
    d = _tensors(tmp_path / "fp8")
    assert d.keys() == fp8_32.stored.keys() and len(kept.files) > 1
    assert all(torch.equal(d[k].view(torch.uint8), fp8_32.stored[k].contiguous().view(torch.uint8)) for k in d
               if d[k].dtype == torch.float8_e4m3fn)
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["weight_block_size"] == [
        32, 32]
    ids, _ = left_padded_batch(fp8_32.oracle.config.vocab_size, [6], seed=14)
    with torch.no_grad():
        want = DeepseekV3ForCausalLM.from_pretrained(fp8_32.path, torch_dtype=torch.float32)(ids).logits
        got = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp8", torch_dtype=torch.float32)(ids).logits
    assert torch.equal(got, want)


def test_interrupted_conversion_resumes(fp8_32: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = convert_module.write_safetensors_file
    written: list[str] = []

    def dies_on_third_shard(path, entries, metadata=None, on_bytes=lambda n: None):  # noqa: ANN001, ANN202
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        real(path, entries, metadata, on_bytes)
        written.append(str(path))

    monkeypatch.setattr(convert_module, "write_safetensors_file", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(fp8_32.path, out, max_shard_size="30KB")
    names = sorted(os.listdir(out))
    assert MARKER_NAME in names and "config.json" not in names                   # visibly unfinished
    assert len([n for n in names if n.endswith(".safetensors")]) == 2 and not [n for n in names if n.endswith(".tmp")]
    stamps = {n: (out / n).stat().st_mtime_ns for n in names if n.endswith(".safetensors")}
    with pytest.raises(ValueError, match="config.json"):                           # not loadable while unfinished
        DeepseekV3ForCausalLM.from_pretrained(out)

    monkeypatch.setattr(convert_module, "write_safetensors_file", real)
    result = convert_checkpoint(fp8_32.path, out, max_shard_size="30KB")
    assert result.reused_shards == 2
    assert all((out / n).stat().st_mtime_ns == t for n, t in stamps.items())      # kept, not rewritten
    assert not (out / MARKER_NAME).exists() and (out / "config.json").is_file()
    fresh = convert_checkpoint(fp8_32.path, tmp_path / "fresh", max_shard_size="30KB")
    a, b = _tensors(out), _tensors(tmp_path / "fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and fresh.reused_shards == 0


def test_refuses_to_clobber_and_reports_errors(fp8_32: Published, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_convert(_parse([str(fp8_32.path), str(out), "--no-progress"])) == 1
    assert "not empty" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    assert run_convert(_parse([str(fp8_32.path), str(out), "--overwrite", "--no-progress"])) == 0
    assert (out / "config.json").is_file()

    assert run_convert(_parse([str(fp8_32.path), str(fp8_32.path)])) == 1
    assert "is the source" in capsys.readouterr().err
    assert run_convert(_parse([str(tmp_path / "missing"), str(tmp_path / "x")])) == 1
    assert "no config.json" in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in fp8_32.path.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["moe_intermediate_size"] = 24                 # the source does not fit its config: caught before writing
    (broken / "config.json").write_text(json.dumps(config))
    assert run_convert(_parse([str(broken), str(tmp_path / "y")])) == 1
    err = capsys.readouterr().err
    assert "expert tensor model.layers." in err and ".safetensors" in err
    assert not (tmp_path / "y").exists()                 # nothing written
    with pytest.raises(ValueError, match="dtype='int8'"):
        convert_checkpoint(fp8_32.path, tmp_path / "z", dtype="int8")


def _interrupted(src: Path, out: Path, monkeypatch: pytest.MonkeyPatch, after: int = 2) -> None:
    """Run a conversion of `src` into `out` (30KB shards) that is killed while writing shard `after + 1`."""
    real = convert_module.write_safetensors_file
    written: list[str] = []

    def dies(path, entries, metadata=None, on_bytes=lambda n: None):  # noqa: ANN001, ANN202
        if len(written) == after:
            raise KeyboardInterrupt("killed")
        real(path, entries, metadata, on_bytes)
        written.append(str(path))

    with monkeypatch.context() as m:
        m.setattr(convert_module, "write_safetensors_file", dies)
        with pytest.raises(KeyboardInterrupt):
            convert_checkpoint(src, out, max_shard_size="30KB", progress=False)


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_resume_refuses_a_changed_source(fp8_32: Published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of an interrupted run must not be mixed with shards converted from different source files."""
    src, out = _copy_dir(fp8_32.path, tmp_path / "src"), tmp_path / "out"
    _interrupted(src, out, monkeypatch)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    st = shard.stat()                                  # e.g. re-downloaded: same size and header, new mtime
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match=rf"source changed since \({shard.name} changed.*--overwrite"):
        convert_checkpoint(src, out, max_shard_size="30KB", progress=False)
    assert "config.json" not in os.listdir(out)
    result = convert_checkpoint(src, out, max_shard_size="30KB", overwrite=True, progress=False)
    assert result.reused_shards == 0                   # converted from scratch
    fresh = convert_checkpoint(src, tmp_path / "fresh", max_shard_size="30KB", progress=False)
    a, b = _tensors(out), _tensors(tmp_path / "fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and fresh.reused_shards == 0


def test_resume_rewrites_kept_shards_that_changed(fp8_32: Published, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard the interrupted run finished is kept only if it is untouched since (size and mtime recorded
    in the marker when it was renamed into place); a damaged one is written again."""
    out = tmp_path / "out"
    _interrupted(fp8_32.path, out, monkeypatch)
    kept = sorted(out.glob("model-*.safetensors"))
    assert len(kept) == 2
    damaged = kept[0]
    data = bytearray(damaged.read_bytes())
    data[-2] ^= 0xFF                                   # header intact, one value flipped
    damaged.write_bytes(bytes(data))
    result = convert_checkpoint(fp8_32.path, out, max_shard_size="30KB", progress=False)
    assert result.reused_shards == 1
    convert_checkpoint(fp8_32.path, tmp_path / "fresh", max_shard_size="30KB", progress=False)
    a, b = _tensors(out), _tensors(tmp_path / "fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_refuses_non_finite_scales(fp8_32: Published, tmp_path: Path) -> None:
    src = _copy_dir(fp8_32.path, tmp_path / "src")
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    index = json.loads((src / INDEX_NAME).read_text())["weight_map"]
    shard = src / index[key]
    with CheckpointReader(shard) as r:
        tensors = {k: r.read(k) for k in r.keys()}
    tensors[key][1, 0] = float("nan")
    save_safetensors_sharded(tensors, tmp_path / "one")
    os.replace(tmp_path / "one" / "model.safetensors", shard)
    for keep in (False, True):
        with pytest.raises(CheckpointError, match=rf"{key}: 1 of \d+ FP8 block scales are not finite \(e\.g\. nan "
                                                  r"at block \[1, 0\]\)"):
            convert_checkpoint(src, tmp_path / f"out{keep}", keep_fp8=keep, progress=False)
