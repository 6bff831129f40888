"""CheckpointReader and save_safetensors_sharded: round trips against safetensors itself, every broken-file
case naming the file (and tensor), and atomic saves that never leave a mixed or half-written directory."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3.checkpoint import safetensors_io
from dsv3.checkpoint.errors import CheckpointError
from dsv3.checkpoint.safetensors_io import (
    INDEX_NAME,
    CheckpointReader,
    LazyTensor,
    read_safetensors_header,
    save_safetensors_sharded,
    write_safetensors_file,
)


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": torch.randn(40, 32, generator=g).to(torch.float8_e4m3fn),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv": torch.rand(1, 1, generator=g),
        "model.layers.0.mlp.gate.weight": torch.randn(8, 32, generator=g),
        "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(8, generator=g),
        "model.layers.1.input_layernorm.weight": torch.randn(32, generator=g).half(),
        "model.norm.weight": torch.randn(32, generator=g).double(),
        "positions": torch.arange(10),
        "step": torch.tensor(3, dtype=torch.int32),                # 0-dim
        "mask": torch.rand(7, generator=g) > 0.5,                 # bool
        "empty": torch.empty(0, 4),
        "lm_head.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
    }


def assert_same(a: torch.Tensor, b: torch.Tensor, key: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{key}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{key}: bytes differ"


def assert_reads_back(directory: Path, expected: dict[str, torch.Tensor]) -> None:
    with CheckpointReader(directory) as reader:
        assert sorted(reader.keys()) == sorted(expected)
        for key, t in expected.items():
            assert reader.shape(key) == t.shape and reader.dtype(key) == t.dtype
            assert_same(reader.get(key), t, key)
        assert reader.total_bytes() == sum(t.nbytes for t in expected.values())


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def write_raw(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = sample_tensors()
    save_safetensors_sharded(tensors, tmp_path, max_shard_bytes=3000)
    return tmp_path, tensors


# -- round trips ----------------------------------------------------------------------------------------------------
def test_single_file_round_trip(tmp_path: Path) -> None:
    tensors = sample_tensors()
    files = save_safetensors_sharded(tensors, tmp_path)
    assert files == [str(tmp_path / "model.safetensors")]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert_reads_back(tmp_path, tensors)
    for key, t in load_file(tmp_path / "model.safetensors").items():       # safetensors itself agrees
        assert_same(t, tensors[key], key)
    with CheckpointReader(tmp_path) as reader:
        assert reader.metadata() == {"format": "pt"}
        assert reader.file_of("step") == str(tmp_path / "model.safetensors")


def test_sharded_layout_is_what_transformers_reads(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, tensors = sharded
    index = json.loads((directory / INDEX_NAME).read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"] == {"total_size": sum(t.nbytes for t in tensors.values())}
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(directory)) == sorted([*shards, INDEX_NAME])
    assert sorted(index["weight_map"]) == sorted(tensors)
    for shard in shards:
        loaded = load_file(directory / shard)
        assert sorted(loaded) == sorted(k for k, f in index["weight_map"].items() if f == shard)
        for key, t in loaded.items():
            assert_same(t, tensors[key], key)
    assert_reads_back(directory, tensors)
    with CheckpointReader(directory) as reader:
        for key, shard in index["weight_map"].items():
            assert reader.file_of(key) == str(directory / shard)


def test_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(10), "big": torch.zeros(1000), "b": torch.zeros(10)}
    save_safetensors_sharded(tensors, tmp_path, max_shard_bytes=100)
    weight_map = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    assert len({weight_map["a"], weight_map["big"], weight_map["b"]}) == 3
    assert_reads_back(tmp_path, tensors)


def test_reader_on_files_written_by_safetensors(tmp_path: Path) -> None:
    tensors = {k: v for k, v in sample_tensors().items() if v.dim() > 0}
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    assert_reads_back(single, tensors)

    anyname = tmp_path / "anyname"                 # exactly one *.safetensors, not called model.safetensors
    anyname.mkdir()
    save_file(tensors, anyname / "consolidated.safetensors")
    assert_reads_back(anyname, tensors)
    assert_reads_back(anyname / "consolidated.safetensors", tensors)

    shards = tmp_path / "shards"
    shards.mkdir()
    keys = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": keys[:4], "model-00002-of-00002.safetensors": keys[4:]}
    for name, part in parts.items():
        save_file({k: tensors[k] for k in part}, shards / name)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: name for name, part in parts.items() for k in part}}
    (shards / INDEX_NAME).write_text(json.dumps(index))
    assert_reads_back(shards, tensors)


def test_shared_storage_and_non_contiguous_tensors(tmp_path: Path) -> None:
    base = torch.randn(8, 6)
    tensors = {"base": base, "transposed": base.t(), "row": base[2], "cols": base[:, 1:3],
               "strided": base[::2, ::3], "expanded": torch.randn(1, 6).expand(4, 6)}
    with pytest.raises(RuntimeError):                         # what safetensors itself does with these
        save_file(tensors, tmp_path / "refused.safetensors")
    (tmp_path / "refused.safetensors").unlink(missing_ok=True)
    for max_bytes in (10**9, 100):
        out = tmp_path / str(max_bytes)
        save_safetensors_sharded(tensors, out, max_shard_bytes=max_bytes)
        assert_reads_back(out, {k: v.contiguous() for k, v in tensors.items()})


def test_generator_input_and_duplicates(tmp_path: Path) -> None:
    tensors = sample_tensors()
    save_safetensors_sharded(((k, v) for k, v in tensors.items()), tmp_path / "gen", max_shard_bytes=2000)
    assert_reads_back(tmp_path / "gen", tensors)
    with pytest.raises(CheckpointError, match="given twice"):
        save_safetensors_sharded([("a", torch.zeros(1)), ("a", torch.ones(1))], tmp_path / "dup")
    with pytest.raises(CheckpointError, match="meta"):
        save_safetensors_sharded({"m": torch.empty(3, device="meta")}, tmp_path / "meta")


def test_reshard_to_smaller_shards_gives_identical_tensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    save_safetensors_sharded(tensors, tmp_path / "one")
    previous, counts = tmp_path / "one", []
    for max_bytes in (6000, 2000, 200):
        out = tmp_path / f"max{max_bytes}"
        with CheckpointReader(previous) as reader:
            save_safetensors_sharded(((k, reader.get(k)) for k in reader.keys()), out, max_shard_bytes=max_bytes)
        assert_reads_back(out, tensors)
        counts.append(len(list(out.glob("*.safetensors"))))
        previous = out
    assert 1 < counts[0] < counts[1] < counts[2]


def test_resave_in_place_removes_stale_shards(tmp_path: Path) -> None:
    first = sample_tensors(0)
    save_safetensors_sharded(first, tmp_path, max_shard_bytes=1000)
    n_first = len(list(tmp_path.glob("model-*.safetensors")))
    second = sample_tensors(1)
    save_safetensors_sharded(second, tmp_path, max_shard_bytes=3000)   # fewer shards, new names
    weight_map = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(set(weight_map.values()))
    assert len(set(weight_map.values())) < n_first
    assert_reads_back(tmp_path, second)

    third = sample_tensors(2)
    save_safetensors_sharded(third, tmp_path)                         # back to a single file
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert_reads_back(tmp_path, third)

    save_safetensors_sharded(first, tmp_path, max_shard_bytes=1000)   # and sharded again
    assert "model.safetensors" not in os.listdir(tmp_path)
    assert_reads_back(tmp_path, first)


def test_get_is_mmap_backed_and_slices_are_lazy(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, tensors = sharded
    key = "model.layers.0.mlp.gate.weight"
    with CheckpointReader(directory) as reader:
        a, b = reader.get(key), reader.get(key)
        assert a.data_ptr() == b.data_ptr()              # both views of the same mapping, not copies
        s = reader.get_slice(key)
        assert_same(s[2:5], tensors[key][2:5], key)
        assert "tensors" in repr(reader) and key in reader and "nope" not in reader and len(reader) == len(tensors)


def test_read_copies_without_mmap_into_a_destination(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, tensors = sharded
    with CheckpointReader(directory) as reader:
        for key, t in tensors.items():
            copy = reader.read(key)
            assert_same(copy, t, key)
            if t.numel():
                assert copy.data_ptr() != reader.get(key).data_ptr()
        # Into a slice of a larger tensor (a stacked parameter's rows), nothing else touched.
        key = "model.embed_tokens.weight"
        big = torch.zeros(3, 64, 32, dtype=torch.bfloat16)
        reader.read(key, out=big[1])
        assert_same(big[1], tensors[key], key) and not big[0].any() and not big[2].any()
        with pytest.raises(ValueError, match="contiguous CPU torch.bfloat16"):
            reader.read(key, out=torch.zeros(64, 32))
        with pytest.raises(ValueError, match="2048 elements"):
            reader.read(key, out=big[:, 0])


def test_lazy_writer_produces_one_tensor_at_a_time(tmp_path: Path) -> None:
    events: list[str] = []

    def lazy(i: int) -> LazyTensor:
        def produce() -> torch.Tensor:
            events.append("produce")
            return torch.full((i + 1, 3), float(i))
        return LazyTensor(torch.float32, (i + 1, 3), produce)

    write_safetensors_file(tmp_path / "a.safetensors", [(f"t{i}", lazy(i)) for i in range(5)], {"format": "pt"},
                           on_bytes=lambda n: events.append("write"))
    assert events == ["produce", "write"] * 5                   # each tensor is made just before it is written
    got = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(got[f"t{i}"], torch.full((i + 1, 3), float(i))) for i in range(5))
    wrong = LazyTensor(torch.float32, (2, 3), lambda: torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="declared torch.float32 \\[2, 3\\] but produced as torch.bfloat16"):
        write_safetensors_file(tmp_path / "b.safetensors", [("x", wrong)])


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_safetensors_sharded(sample_tensors(), tmp_path, max_shard_bytes=2000, progress=True)
    assert "Saving" in capsys.readouterr().err


# -- broken checkpoints ------------------------------------------------------------------------------------------------
def test_unknown_key_is_named_with_suggestion(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, _ = sharded
    with CheckpointReader(directory) as reader:
        for call in (reader.get, reader.shape, reader.dtype, reader.file_of):
            with pytest.raises(CheckpointError, match="model.norm.weigth") as e:
                call("model.norm.weigth")
            assert "model.norm.weight" in str(e.value)          # did you mean


def test_missing_shard(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, _ = sharded
    weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
    shard = "model-00002-of-" + sorted(set(weight_map.values()))[0][-17:]
    (directory / shard).unlink()
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(directory)
    msg = str(e.value)
    assert shard in msg and INDEX_NAME in msg
    assert next(k for k, f in weight_map.items() if f == shard) in msg


def test_truncated_file(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, _ = sharded
    shard = sorted(directory.glob("model-*.safetensors"))[0]
    infos, _ = read_safetensors_header(shard)
    last = max(infos, key=lambda k: infos[k].end)
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(directory)
    msg = str(e.value)
    assert str(shard) in msg and "truncated" in msg and last in msg and f"{len(data) - 3} bytes" in msg

    shard.write_bytes(data[:5])                           # not even the 8-byte length survives
    with pytest.raises(CheckpointError, match=str(shard.name)):
        CheckpointReader(directory)
    shard.write_bytes(data[:100])                         # cut inside the header
    with pytest.raises(CheckpointError, match="header length") as e:
        CheckpointReader(directory)
    assert str(shard) in str(e.value)


def test_corrupt_header(tmp_path: Path) -> None:
    save_safetensors_sharded(sample_tensors(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff\x00garbage!" * 3 + b"\x00" * 2
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not valid JSON") as e:
        CheckpointReader(tmp_path)
    assert str(path) in str(e.value)

    path.write_bytes(os.urandom(4096))                     # garbage throughout: absurd header length
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(tmp_path)
    assert str(path) in str(e.value) and "4096 bytes" in str(e.value)


def test_malformed_header_entries(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    cases = [
        ({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, 1, "'F4'"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, "needs 8 bytes"),
        ({"w": {"dtype": "F32", "shape": [1]}}, 4, "malformed"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "back to back"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 6, "trailing"),
        ({"__metadata__": {"format": 1}}, 0, "__metadata__"),
        ([1, 2], 0, "expected an object"),
    ]
    for header, nbytes, expected in cases:
        write_raw(path, header, b"\x00" * nbytes)
        with pytest.raises(CheckpointError, match=expected) as e:
            CheckpointReader(tmp_path)
        assert str(path) in str(e.value)
        if isinstance(header, dict) and "w" in header:
            assert "tensor w" in str(e.value) or "trailing" in expected


def test_malformed_index(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, _ = sharded
    index = directory / INDEX_NAME
    good = index.read_text()
    for bad in ('{"weight_map": {"a": "model-00001', "[]", '{"weight_map": []}', '{"weight_map": {}}',
                '{"weight_map": {"a": 3}}'):
        index.write_text(bad)
        with pytest.raises(CheckpointError) as e:
            CheckpointReader(directory)
        assert str(index) in str(e.value) and "weight_map" in str(e.value)
    index.write_text(json.dumps({"weight_map": {"a": "../model.safetensors"}}))
    with pytest.raises(CheckpointError, match="plain file names"):
        CheckpointReader(directory)
    index.write_text(good)
    CheckpointReader(directory).close()


def test_index_names_tensor_absent_from_shard(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, _ = sharded
    index_path = directory / INDEX_NAME
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    index["weight_map"]["model.layers.9.ghost.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(directory)
    msg = str(e.value)
    assert str(directory / shard) in msg and "model.layers.9.ghost.weight" in msg


def test_directory_without_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        CheckpointReader(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(tmp_path)
    save_file({"a": torch.zeros(1)}, tmp_path / "x.safetensors")
    save_file({"b": torch.zeros(1)}, tmp_path / "y.safetensors")
    with pytest.raises(CheckpointError, match="x.safetensors, y.safetensors") as e:
        CheckpointReader(tmp_path)
    assert INDEX_NAME in str(e.value)


def test_extra_tensors_in_a_shard_are_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_file({"a": torch.zeros(2), "stray": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.ones(3)}, tmp_path / "s2.safetensors")
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with caplog.at_level("WARNING"), CheckpointReader(tmp_path) as reader:
        assert sorted(reader.keys()) == ["a", "b"]
    assert "stray" in caplog.text


# -- atomic saves -----------------------------------------------------------------------------------------------------
def failing_writer(fail_on: int) -> object:
    real = safetensors_io._write_safetensors_file
    calls = {"n": 0}

    def write(path: Path, items: list, metadata: dict, on_bytes: object = None) -> None:
        calls["n"] += 1
        if calls["n"] == fail_on:
            path.write_bytes(b"half a shard")             # a partial file exists when the failure hits
            raise OSError(28, "No space left on device")
        real(path, items, metadata)

    return write


@pytest.mark.parametrize("previous_max", [None, 10**9, 1000])   # empty dir, a single file, shards
def test_failed_save_leaves_previous_save_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 previous_max: int | None) -> None:
    old = sample_tensors(0)
    if previous_max is not None:
        save_safetensors_sharded(old, tmp_path, max_shard_bytes=previous_max)
    before = listing(tmp_path)
    monkeypatch.setattr(safetensors_io, "_write_safetensors_file", failing_writer(fail_on=2))
    with pytest.raises(OSError, match="No space left"):
        save_safetensors_sharded(sample_tensors(1), tmp_path, max_shard_bytes=2500)
    assert listing(tmp_path) == before                  # byte for byte: nothing added, removed or changed
    if previous_max is not None:
        assert_reads_back(tmp_path, old)


def test_failing_input_leaves_nothing_behind(tmp_path: Path) -> None:
    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for i in range(6):
            yield f"t{i}", torch.randn(100)
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        save_safetensors_sharded(tensors(), tmp_path, max_shard_bytes=900)
    assert os.listdir(tmp_path) == []


def test_killed_save_leftovers_are_ignored_then_cleaned(tmp_path: Path) -> None:
    tensors = sample_tensors()
    save_safetensors_sharded(tensors, tmp_path, max_shard_bytes=2000)
    leftover = tmp_path / ".dsv3-tmp-shard00001-abc.tmp"          # what a SIGKILL mid-save leaves
    leftover.write_bytes(b"partial")
    assert_reads_back(tmp_path, tensors)
    save_safetensors_sharded(tensors, tmp_path, max_shard_bytes=2000)
    assert not leftover.exists()
    assert_reads_back(tmp_path, tensors)
