"""Decode speed of block-FP8 weights read as stored (fp8="keep" + CPU kernels) against bf16, side by side.

One process: a random-weight bf16 model in the bench shape (configs/bench.json) and the same weights quantised
to DeepSeek's block FP8 (128×128 e4m3 blocks + fp32 scale_inv; every linear and expert stack, as the published
checkpoints do; the LM head and embeddings stay bf16 like theirs unless --fp8-head) sharing every other tensor.
Rows, each a decode step (batch 1 by default) over a static cache filled with random latents:

    bf16 stock       PyTorch ops                        (kernels="off")
    bf16 kernels     C++ GEMV + MLA decode kernels      (what kernels="auto" picks on this machine)
    fp8 stock        FP8 dequantised per tile / expert  (the path before the FP8 kernels)
    fp8 kernels      FP8 bytes read in C++ + MLA decode kernel

Rounds alternate the rows (the machine is shared: a slow spell hits every row), and each row reports the median
over rounds of its median step, in wall time and in CPU time of the process (all threads: on a machine shared
with other jobs, CPU time per step is the steadier measure of what a step costs; `--threads 1` makes the two
comparable).

    python benchmarks/bench_fp8.py --contexts 128 8192
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_generate import fill_dsv3_cache  # noqa: E402
from common import bench_config, memory_bandwidth_gbs, random_model  # noqa: E402

from dsv3 import DeepseekV3ForCausalLM  # noqa: E402
from dsv3.generation.generate import DecodeStep  # noqa: E402
from dsv3.kernels import CpuKernels, fp8_available, use_cpu_kernels  # noqa: E402
from dsv3.model.attention import use_attention_kernels  # noqa: E402
from dsv3.model.moe import RoutedExperts  # noqa: E402
from dsv3.model.rope import RotaryEmbedding  # noqa: E402
from dsv3.model.weights import hold_formats, use_kernels  # noqa: E402
from dsv3.quant.formats import Fp8Blocks  # noqa: E402
from dsv3.quant.fp8 import quantize_fp8_blocks  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def fp8_twin(model: DeepseekV3ForCausalLM, fp8_head: bool) -> DeepseekV3ForCausalLM:
    """`model`'s weights in block FP8 (every linear and expert stack; lm_head only if fp8_head), the rest shared."""
    with torch.device("meta"):
        twin = DeepseekV3ForCausalLM(model.config)

    def choose(name: str, module: nn.Module) -> object:
        if isinstance(module, RoutedExperts):
            return Fp8Blocks(parts=1), Fp8Blocks()
        return Fp8Blocks() if fp8_head or name != "lm_head" else None

    hold_formats(twin, choose)
    source = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, t in list(twin.named_parameters()) + list(twin.named_buffers()):
        owner_name, _, attr = name.rpartition(".")
        owner = twin.get_submodule(owner_name)
        if attr.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            dense = source[name]
            pairs = [quantize_fp8_blocks(w) for w in (dense if dense.dim() == 3 else dense[None])]
            q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            if dense.dim() == 2:
                q, s = q[0], s[0]
            owner._parameters[attr] = nn.Parameter(q, requires_grad=False)
            owner._buffers[attr + "_scale_inv"] = s
        elif attr in owner._parameters:
            owner._parameters[attr] = source[name] if isinstance(source[name], nn.Parameter) else nn.Parameter(
                source[name], requires_grad=False)
        elif name in source:
            owner._buffers[attr] = source[name]
    twin.model.rotary_emb = RotaryEmbedding(model.config)
    leftover = [n for n, t in list(twin.named_parameters()) + list(twin.named_buffers()) if t.is_meta]
    assert not leftover, leftover
    return twin.eval()


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@torch.no_grad()
def decode_median(model: DeepseekV3ForCausalLM, batch: int, context: int, steps: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of one decode step."""
    step = DecodeStep(model, compile=False)
    cache = fill_dsv3_cache(model, batch, context, steps + 3)
    tokens = torch.randint(2, model.config.vocab_size, (batch, steps + 2), generator=torch.Generator().manual_seed(1))
    wall, cpu = [], []
    for i in range(steps + 2):
        pos = torch.full((batch, 1), context + i, dtype=torch.long)
        t, c = time.perf_counter(), time.process_time()
        step(tokens[:, i:i + 1], pos, cache, None)
        if i >= 2:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per row and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fp8-head", action="store_true", help="also hold the LM head in FP8 (DeepSeek's checkpoints "
                   "keep it bf16)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", nargs="+", default=["bf16 stock", "bf16 kernels", "fp8 stock", "fp8 kernels"],
                   help="rows to run (fp8 stock, the path before the FP8 kernels, takes seconds per step)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = bench_config(num_nextn_predict_layers=0)   # (MTP is not run by a decode step: 1.1 GB less)
    log("building the bf16 model and its FP8 twin")
    bf16 = random_model(config)
    fp8 = fp8_twin(bf16, args.fp8_head)
    log(f"FP8 kernels available: {fp8_available()}")
    kernels = CpuKernels()

    def setup(name: str) -> DeepseekV3ForCausalLM:
        model = bf16 if name.startswith("bf16") else fp8
        on = name.endswith("kernels")
        use_kernels(model, kernels if on else None)
        use_attention_kernels(model, kernels if on else None)
        return model

    names = args.rows
    results: dict[tuple[str, int], list[float]] = {}
    cpu_results: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for context in args.contexts:
            for name in names:
                log(f"round {r} ctx {context} {name}")
                wall, cpu = decode_median(setup(name), args.batch, context, args.steps)
                results.setdefault((name, context), []).append(wall)
                cpu_results.setdefault((name, context), []).append(cpu)
    use_cpu_kernels(bf16)   # (leave both as the default would)
    bw = memory_bandwidth_gbs()
    rows = []
    print(f"bench shape, batch {args.batch}, threads {torch.get_num_threads()}, read bandwidth {bw:.1f} GB/s, "
          f"LM head {'FP8' if args.fp8_head else 'bf16'}")
    print(f"{'row':<14}{'context':>8}{'tok/s':>9}{'ms/step':>9}{'CPU ms/step':>13}{'tok/CPU-s':>11}"
          f"{'vs bf16 kernels (CPU)':>23}")
    for context in args.contexts:
        ref = statistics.median(cpu_results[("bf16 kernels", context)]) if "bf16 kernels" in names else None
        for name in names:
            sec, cpu = statistics.median(results[(name, context)]), statistics.median(cpu_results[(name, context)])
            rel = ref / cpu if ref else float("nan")
            rows.append(dict(row=name, context=context, batch=args.batch, tok_s=args.batch / sec, ms=sec * 1e3,
                             cpu_ms=cpu * 1e3, tok_per_cpu_s=args.batch / cpu, vs_bf16_kernels_cpu=rel,
                             rounds_ms=[round(1e3 * x, 2) for x in results[(name, context)]],
                             rounds_cpu_ms=[round(1e3 * x, 2) for x in cpu_results[(name, context)]]))
            print(f"{name:<14}{context:>8}{args.batch / sec:>9.2f}{sec * 1e3:>9.1f}{cpu * 1e3:>13.1f}"
                  f"{args.batch / cpu:>11.2f}{rel:>22.2f}x")
    cpu_s = {key: statistics.median(v) for key, v in cpu_results.items()}
    ctx_ratio = {name: cpu_s[(name, args.contexts[0])] / cpu_s[(name, args.contexts[-1])] for name in names}
    for name, ratio in ctx_ratio.items():
        print(f"{name}: decode at context {args.contexts[-1]} = {ratio:.2f}x decode at {args.contexts[0]} (CPU time)")
    print(json.dumps(dict(bench="fp8", bandwidth_gbs=bw, fp8_head=args.fp8_head, weights_bf16_bytes=weight_bytes(bf16),
                          weights_fp8_bytes=weight_bytes(fp8), rows=rows, context_ratio=ctx_ratio)))


if __name__ == "__main__":
    main()
