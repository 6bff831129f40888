"""Peak memory of `from_pretrained` on a checkpoint of a few GB: does loading hold one copy of the weights?

Writes, in a temporary directory on disk, checkpoints of the bench shape (configs/bench.json: 2.36 B
parameters, 4 layers, 64 experts) in the published layout — per-expert keys, 1 GB shards + index:
  - bf16       every tensor bf16 (router bias fp32): ≈4.7 GB
  - fp8        the published FP8 format: linear projections float8_e4m3fn + fp32 `weight_scale_inv`
               (128×128 blocks; kv_a_proj_with_mqa has 576 rows, a ragged block), the rest bf16: ≈2.9 GB
Then loads each in a fresh subprocess and reports its peak RSS (VmHWM) against the bytes
of the loaded weights in the requested dtype (target: peak ≤ 1.2× weights), plus the RSS of the bare
process after importing torch and dsv3 (the floor any load starts from). transformers 5.23 loads the
bf16 checkpoint in the same way, as the reference (it cannot load the FP8 one: the 576-row ragged block).

Quantised (`--cases quant` or `all`): from_pretrained(quantization="int8"/"int4") of the bf16 and FP8
checkpoints (quantised while loading; target: peak ≤ 1.2 × the quantised model), `dsv3 convert --quantize
int4` of the bf16 checkpoint (its peak RSS), and from_pretrained of that int4 checkpoint (held as stored).
`--shape small` (vocab 32768, 16 experts of 704: ≈0.9 GB bf16) is quicker than the bench shape.

Random weights (values do not matter for memory); each tensor is generated, written and dropped, so
writing holds one tensor. The checkpoints are deleted at the end unless --keep.

    python benchmarks/load_memory.py                 # all cases (~5 min on a 2-core CPU, ~8 GB of disk)
    python benchmarks/load_memory.py --no-reference  # skip transformers
    python benchmarks/load_memory.py --shape small --cases quant --no-reference   # quantised loads (~2 min)

The human table goes to stdout, progress to stderr, and the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import BENCH_CONFIG, bench_config  # noqa: E402

from dsv3 import DeepseekV3ForCausalLM  # noqa: E402
from dsv3.checkpoint.fp8 import fp8_scale_shape  # noqa: E402
from dsv3.checkpoint.keys import split_stacked  # noqa: E402
from dsv3.checkpoint.safetensors_io import save_safetensors_sharded  # noqa: E402

QUANTISED = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
             "gate_proj", "up_proj", "down_proj")
BLOCK = (128, 128)
SHAPES = {"bench": {}, "small": {"vocab_size": 32768, "n_routed_experts": 16, "moe_intermediate_size": 704}}
log = logging.getLogger("load_memory")


def checkpoint_tensors(fp8: bool, seed: int = 0, shape: str = "bench") -> Iterator[tuple[str, torch.Tensor]]:
    """The bench model's tensors under published names, generated one at a time."""
    config = bench_config(num_nextn_predict_layers=0, **SHAPES[shape])
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    for name, meta in model.state_dict().items():
        for key, piece in split_stacked(name, meta):
            shape = tuple(piece.shape)
            if key.endswith("e_score_correction_bias"):
                yield key, torch.rand(shape, generator=gen) * 0.02 - 0.01
            elif fp8 and key.endswith(".weight") and key.split(".")[-2] in QUANTISED:
                # Random e4m3 bytes below 0x7f (no NaN patterns), and plausible per-block scales.
                yield key, torch.randint(0, 0x7E, shape, dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
                yield key + "_scale_inv", torch.rand(fp8_scale_shape(shape, BLOCK), generator=gen) * 1e-4
            elif key.endswith("norm.weight"):
                yield key, torch.ones(shape, dtype=torch.bfloat16)
            else:
                yield key, torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16)


def write_checkpoint(directory: Path, fp8: bool, shape: str = "bench") -> int:
    directory.mkdir(parents=True)
    files = save_safetensors_sharded(checkpoint_tensors(fp8, shape=shape), directory, max_shard_bytes=10**9,
                                     progress=True)
    config = {**json.loads(BENCH_CONFIG.read_text()), **SHAPES[shape]}
    config["num_nextn_predict_layers"] = 0
    if fp8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": list(BLOCK)}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return sum(os.path.getsize(f) for f in files)


def peak_rss_gb() -> float:
    """This process's peak RSS: /proc's VmHWM (reset at exec — getrusage's ru_maxrss is not: a child started by
    a parent that once held more reports the parent's peak), ru_maxrss where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def rss_now_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def child(path: str, dtype: str, fp8: str, impl: str, quantization: str | None = None,
          convert_to: str | None = None) -> None:
    """Runs in a fresh process: load (or `dsv3 convert --quantize` into `convert_to`), then print one JSON line
    with the measurements."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if impl == "transformers":
        from transformers import DeepseekV3ForCausalLM as HFModel
    floor = rss_now_gb()
    t = time.perf_counter()
    if convert_to is not None:
        from dsv3.checkpoint.convert import convert_checkpoint

        result = convert_checkpoint(path, convert_to, quantize=quantization, progress=False)
        print(json.dumps({"peak_rss_gb": peak_rss_gb(),
                          "floor_rss_gb": floor, "weights_gb": result.total_bytes / 1e9,
                          "after_load_rss_gb": rss_now_gb(), "load_s": time.perf_counter() - t}))
        return
    if impl == "transformers":
        model = HFModel.from_pretrained(path, dtype=getattr(torch, dtype))
    else:
        model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=dtype, fp8=fp8, device_map="cpu",
                                                      quantization=quantization)
    seconds = time.perf_counter() - t
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}
                  .values())
    peak = peak_rss_gb()
    print(json.dumps({"peak_rss_gb": peak, "floor_rss_gb": floor, "weights_gb": weights / 1e9,
                      "after_load_rss_gb": rss_now_gb(), "load_s": seconds}))


def measure(path: Path, dtype: str, fp8: str = "dequantize", impl: str = "dsv3", quantization: str | None = None,
            convert_to: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--dtype", dtype, "--fp8", fp8, "--impl", impl]
    cmd += ["--quantization", quantization] if quantization else []
    cmd += ["--convert-to", str(convert_to)] if convert_to else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} load of {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="skip transformers")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench", help="checkpoint shape (default: bench)")
    parser.add_argument("--cases", choices=("all", "plain", "quant"), default="all",
                        help="plain loads, quantised loads and conversion, or all (default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quantization", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--convert-to", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--fp8", default="dequantize", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="dsv3", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dtype, args.fp8, args.impl, args.quantization, args.convert_to)
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    root = Path(tempfile.mkdtemp(prefix="dsv3-load-memory-", dir=args.dir))
    rows = []
    try:
        sizes = {}
        for kind in ("bf16", "fp8"):
            log.info("writing the %s checkpoint to %s", kind, root / kind)
            sizes[kind] = write_checkpoint(root / kind, fp8=kind == "fp8", shape=args.shape)
        cases: list[tuple] = []
        if args.cases in ("all", "plain"):
            cases += [("bf16", "bfloat16", "dequantize", "dsv3", None), ("fp8", "bfloat16", "dequantize", "dsv3", None),
                      ("fp8", "bfloat16", "keep", "dsv3", None)]
            if args.reference:
                cases.append(("bf16", "bfloat16", "dequantize", "transformers", None))
        if args.cases in ("all", "quant"):
            cases += [("bf16", "bfloat16", "dequantize", "dsv3", "int8"),
                      ("bf16", "bfloat16", "dequantize", "dsv3", "int4"),
                      ("fp8", "bfloat16", "dequantize", "dsv3", "int4"),
                      ("bf16", "bfloat16", "convert", "dsv3", "int4"),       # dsv3 convert --quantize int4
                      ("int4", "bfloat16", "dequantize", "dsv3", None)]       # its output, held as stored
        for kind, dtype, fp8, impl, quantization in cases:
            log.info("%s %s with %s (dtype %s, fp8=%s, quantization=%s)", "converting" if fp8 == "convert" else
                     "loading", kind, impl, dtype, fp8, quantization)
            if fp8 == "convert":
                m = measure(root / kind, dtype, impl=impl, quantization=quantization, convert_to=root / quantization)
                sizes[quantization] = sum(p.stat().st_size for p in (root / quantization).glob("*.safetensors"))
            else:
                m = measure(root / kind, dtype, fp8, impl, quantization)
            rows.append({"impl": impl, "checkpoint": kind, "checkpoint_gb": sizes[kind] / 1e9, "dtype": dtype,
                         "fp8": fp8 if kind == "fp8" or fp8 == "convert" else None, "quantization": quantization,
                         **m, "ratio": m["peak_rss_gb"] / m["weights_gb"],
                         "ratio_above_floor": (m["peak_rss_gb"] - m["floor_rss_gb"]) / m["weights_gb"]})
    finally:
        if args.keep:
            log.info("checkpoints kept in %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\nPeak RSS of from_pretrained, {args.shape} shape ({BENCH_CONFIG.name} {SHAPES[args.shape] or ''}), "
          f"{os.cpu_count()} CPU cores")
    print(f"{'loader':<13}{'checkpoint':<18}{'loaded as':<16}{'weights GB':>11}{'floor GB':>10}{'peak GB':>9}"
          f"{'peak/weights':>14}{'(peak-floor)/w':>16}{'load s':>8}")
    for r in rows:
        loaded = r["dtype"] + (" fp8-held" if r["fp8"] == "keep" else "")
        if r["quantization"]:
            loaded = f"convert {r['quantization']}" if r["fp8"] == "convert" else f"{r['quantization']} on load"
        elif r["checkpoint"] == "int4":
            loaded = "int4 as stored"
        ckpt = "{} {:.2f} GB".format(r["checkpoint"], r["checkpoint_gb"])
        print(f"{r['impl']:<13}{ckpt:<18}{loaded:<16}"
              f"{r['weights_gb']:>11.2f}{r['floor_rss_gb']:>10.2f}{r['peak_rss_gb']:>9.2f}{r['ratio']:>14.3f}"
              f"{r['ratio_above_floor']:>16.3f}{r['load_s']:>8.1f}")
    print("target: peak ≤ 1.2 × weights in the requested dtype (quantised: the quantised model); floor = RSS after "
          "importing torch + dsv3; convert rows: weights = bytes written")
    print(json.dumps({"benchmark": "load_memory", "config": BENCH_CONFIG.name, "shape": args.shape,
                      "target_ratio": 1.2, "cases": rows}))


if __name__ == "__main__":
    main()
