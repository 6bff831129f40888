"""Checkpoint I/O as a fresh install runs it and as sharded loading will use it.

* Without numpy: loading (bf16 and block-FP8, dequantised and kept), saving, `convert`, slices and the
  tokenizer all run in a subprocess where `import numpy` fails — numpy is not a dsv3 dependency.
* The writer holds one tensor at a time (peak RSS measured in a subprocess), never the shard.
* `read_slice` / `read_fp8_slice` return exactly the rows/columns of the whole tensor, FP8 scale block rows
  included, and touch only the bytes of those rows (file mapping RSS and read() bytes measured).
* Written files get the permissions the umask gives (0644 under umask 022), not mkstemp's 0600.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
from dsv3.checkpoint.atomic import atomic_write_text
from dsv3.checkpoint.convert import convert_checkpoint
from dsv3.checkpoint.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks, read_fp8_slice
from dsv3.checkpoint.safetensors_io import INDEX_NAME, CheckpointReader, save_safetensors_sharded
from tests.published import RAGGED_32, Published, build_published

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, *args: str, prelude: str = "") -> str:
    """Run `prelude` + `code` in a fresh interpreter with the worktree on the path; its stdout (fails with its
    stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return build_published(tmp_path_factory.mktemp("fp8"), RAGGED_32, (32, 32), seed=4)


# ---- no numpy ----------------------------------------------------------------------------------------------
NO_NUMPY = """
import sys
sys.modules["numpy"] = None                      # `import numpy` raises ImportError from here on
try:
    import numpy  # noqa: F401
    raise SystemExit("numpy is importable")
except ImportError:
    pass
import warnings
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
"""


def test_load_save_convert_and_tokenize_without_numpy(fp8_checkpoint: Published, tmp_path: Path) -> None:
    out = run_python("""
    import json
    from pathlib import Path
    import torch
    from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
    from dsv3.checkpoint.convert import convert_checkpoint
    from dsv3.checkpoint.safetensors_io import CheckpointReader
    from dsv3.tokenizer import AutoTokenizer

    fp8, work = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny()).eval()
    model.save_pretrained(work / "saved")                                   # writer
    back = DeepseekV3ForCausalLM.from_pretrained(work / "saved", torch_dtype=torch.float32)   # pread reader
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    deq = DeepseekV3ForCausalLM.from_pretrained(fp8, torch_dtype=torch.float32)
    keep = DeepseekV3ForCausalLM.from_pretrained(fp8, torch_dtype=torch.float32, fp8="keep")
    fp8_diff = (deq(ids).logits - keep(ids).logits).abs().max().item()
    convert_checkpoint(fp8, work / "bf16", progress=False)                  # streaming writer + FP8 dequant
    conv = DeepseekV3ForCausalLM.from_pretrained(work / "bf16", torch_dtype=torch.float32)
    with CheckpointReader(work / "saved") as r:
        key = "model.embed_tokens.weight"
        sliced = torch.equal(r.read_slice(key, rows=(2, 7)), model.state_dict()[key][2:7])
    tok = AutoTokenizer.from_pretrained()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    print(json.dumps({"same": same, "fp8_diff": fp8_diff, "conv": list(conv(ids).logits.shape), "sliced": sliced,
                      "decoded": tok.decode(enc.input_ids[0]) == text, "numpy": "numpy" in sys.modules and
                      sys.modules["numpy"] is not None}))
    """, str(fp8_checkpoint.path), str(tmp_path), prelude=NO_NUMPY)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["same"] and result["sliced"] and result["decoded"] and not result["numpy"]
    assert result["fp8_diff"] < 1e-4                     # FP8 kept == dequantised on load, as in test_checkpoint
    assert result["conv"] == [1, 5, fp8_checkpoint.config["vocab_size"]]


# ---- writer memory -----------------------------------------------------------------------------------------
def test_writer_holds_one_tensor_not_the_shard(tmp_path: Path) -> None:
    """8 lazily produced 32 MiB tensors into one 256 MiB file: the peak RSS grows by about one tensor (a
    writer copying each tensor to bytes would add a second; one holding the shard, eight)."""
    out = run_python("""
    import resource, sys
    import torch
    from dsv3.checkpoint.safetensors_io import LazyTensor, write_safetensors_file

    shape = (2048, 4096)                                   # 32 MiB of fp32
    def entry(i):
        return f"t{i}", LazyTensor(torch.float32, shape, lambda: torch.full(shape, float(i)))
    torch.full((64, 64), 0.0).sum()                        # warm the op (not the 32 MiB allocation)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    write_safetensors_file(sys.argv[1], [entry(i) for i in range(8)])
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """, str(tmp_path / "big.safetensors"))
    grew = int(out.strip().splitlines()[-1])
    tensor = 2048 * 4096 * 4
    print(f"peak RSS grew by {grew / 2**20:.1f} MiB writing a {8 * tensor / 2**20:.0f} MiB shard")
    assert grew < 1.5 * tensor, f"peak RSS grew by {grew / 2**20:.1f} MiB for 32 MiB tensors"
    with CheckpointReader(tmp_path / "big.safetensors") as r:
        assert r.keys() == [f"t{i}" for i in range(8)]
        assert torch.equal(r.read_slice("t5", rows=(100, 102)), torch.full((2, 4096), 5.0))


# ---- slices ------------------------------------------------------------------------------------------------
def _mapped_rss_and_reads(path: Path) -> tuple[int, int]:
    """(bytes of `path` mapped into this process and resident, bytes this process has read() so far)."""
    rss, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):          # a mapping's header line
                current = line.rstrip().endswith(str(path))
            elif current and first == "Rss:":
                rss += int(line.split()[1]) * 1024
    with open("/proc/self/io") as f:
        rchar = next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    return rss, rchar


@pytest.mark.skipif(not Path("/proc/self/smaps").exists() or not Path("/proc/self/io").exists(),
                    reason="needs Linux /proc accounting")
def test_read_slice_reads_only_its_rows(tmp_path: Path) -> None:
    w = torch.randn(8192, 4096).to(torch.bfloat16)                                 # 64 MiB
    save_safetensors_sharded({"w": w, "small": torch.arange(6.0).view(2, 3)}, tmp_path)
    path = tmp_path / "model.safetensors"
    with CheckpointReader(tmp_path) as r:
        rss0, read0 = _mapped_rss_and_reads(path)
        rows = r.read_slice("w", rows=(4096, 4224))                                # 1 MiB
        rss1, read1 = _mapped_rss_and_reads(path)
        assert torch.equal(rows, w[4096:4224]) and rows.is_contiguous()
        assert rows.untyped_storage().nbytes() == rows.numel() * 2                  # a copy of the slice only
        print(f"rows slice: {(rss1 - rss0) / 2**20:.2f} MiB mapped, {(read1 - read0) / 2**20:.2f} MiB read")
        assert rss1 - rss0 < 8 * 2**20 and read1 - read0 < 8 * 2**20                # of 64 MiB
        whole = r.read("w")                                                          # the reference: all of it
        _, read2 = _mapped_rss_and_reads(path)
        assert read2 - read1 >= 64 * 2**20 and torch.equal(whole, w)
        assert torch.equal(r.read_slice("w", cols=(128, 384)), w[:, 128:384])
        assert torch.equal(r.read_slice("w", rows=(5, 9), cols=(4000, 4096)), w[5:9, 4000:4096])
        out = torch.empty(3, 4096, dtype=torch.bfloat16)
        assert r.read_slice("w", rows=(0, 3), out=out) is out and torch.equal(out, w[:3])
        for bad in ((5, 3), (0, 8193), (-1, 2)):
            with pytest.raises(ValueError, match=r"rows=.*shape \[8192, 4096\]"):
                r.read_slice("w", rows=bad)
        with pytest.raises(ValueError, match="2 or more dims"):
            save_safetensors_sharded({"v": torch.ones(3)}, tmp_path / "v")
            CheckpointReader(tmp_path / "v").read_slice("v", rows=(0, 1))


@pytest.mark.parametrize("stacked", [False, True])
def test_read_fp8_slice_equals_slice_of_whole(tmp_path: Path, stacked: bool) -> None:
    """A rank's rows/columns of a block-FP8 weight plus its scale block rows dequantise to exactly the same
    slice of the whole dequantised weight — ragged edge blocks (300 = 2·128 + 44 rows) included."""
    torch.manual_seed(0)
    n = 3 if stacked else 1
    pairs = [quantize_fp8_blocks(torch.randn(300, 200)) for _ in range(n)]
    weight = torch.stack([p[0] for p in pairs]) if stacked else pairs[0][0]
    scale = torch.stack([p[1] for p in pairs]) if stacked else pairs[0][1]
    save_safetensors_sharded({"x.weight": weight, "x.weight_scale_inv": scale}, tmp_path)
    full = [dequantize_fp8_blocks(w, s, dtype=torch.float32) for w, s in pairs]
    with CheckpointReader(tmp_path) as r:
        for rows, cols in (((128, 256), None), ((256, 300), None), (None, (128, 200)), ((0, 128), (0, 128))):
            w, s = read_fp8_slice(r, "x.weight", rows, cols)
            r0, r1 = rows or (0, 300)
            c0, c1 = cols or (0, 200)
            assert w.dtype == torch.float8_e4m3fn and tuple(w.shape[-2:]) == (r1 - r0, c1 - c0)
            for e in range(n):
                got = dequantize_fp8_blocks(w[e] if stacked else w, s[e] if stacked else s, dtype=torch.float32)
                assert torch.equal(got, full[e][r0:r1, c0:c1]), (rows, cols, e)
        with pytest.raises(ValueError, match=r"rows=\[100, 228\).*block size 128"):
            read_fp8_slice(r, "x.weight", rows=(100, 228))


# ---- permissions -------------------------------------------------------------------------------------------
@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir() if p.is_file()}


def test_written_files_follow_the_umask(tmp_path: Path, fp8_checkpoint: Published, umask: None) -> None:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny()).eval()
    model.save_pretrained(tmp_path / "saved", max_shard_size="200KB")               # shards + index + configs
    modes = _modes(tmp_path / "saved")
    assert INDEX_NAME in modes and "config.json" in modes and len(modes) > 3
    assert set(modes.values()) == {0o644}, modes
    convert_checkpoint(fp8_checkpoint.path, tmp_path / "converted", max_shard_size="30KB", progress=False)
    modes = _modes(tmp_path / "converted")
    assert INDEX_NAME in modes and "tokenizer_config.json" in modes and set(modes.values()) == {0o644}, modes
    os.umask(0o027)
    atomic_write_text(tmp_path / "group.json", "{}")
    save_safetensors_sharded({"a": torch.ones(2)}, tmp_path / "group")
    assert (tmp_path / "group.json").stat().st_mode & 0o777 == 0o640
    assert set(_modes(tmp_path / "group").values()) == {0o640}


def test_readme_command_runs_without_numpy() -> None:
    """Issue 8's first finding: `dsv3 generate "def "` in a fresh venv (torch, no numpy) ended in
    `RuntimeError: Numpy is not available`. The same CLI entry point, numpy unimportable."""
    out = run_python("""
    from dsv3.cli import main
    code = main(["generate", "def ", "--max-new-tokens", "4", "--greedy"])
    assert "numpy" not in sys.modules or sys.modules["numpy"] is None
    sys.exit(code)
    """, prelude=NO_NUMPY)
    assert out.startswith("def ") and len(out) > len("def ")
