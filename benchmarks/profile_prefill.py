"""Where dsv3's bf16 prefill spends its time: seconds per part of the model and per aten op.

Builds the bench-shape model with random bf16 weights (configs/bench.json), runs an untimed prefill, then
`--reps` timed prefills of `--tokens` tokens (batch 1, fresh static cache, logits of the last position) and
reports, for the fastest rep:
- per part, exclusive of the parts nested in it: attention (MLA), dense MLP (layers before
  first_k_dense_replace), router, routed experts (sort + gather + grouped GEMMs + weighted index_add),
  shared experts, LM head, rest (embedding, norms, residual adds) — wall time from module hooks;
- the routed experts' own share that is matrix work (their grouped GEMMs) vs bookkeeping, and the top aten
  ops by self CPU time (torch.profiler, one more rep);
- GFLOP/s of the whole prefill and of the routed-expert GEMMs, as % of the bf16 GEMM peak measured in the
  same run (benchmarks/probes.py: best of many oneDNN matmuls; each % says which size it divides by).

    python benchmarks/profile_prefill.py                    # bench shape, 512 tokens
    python benchmarks/profile_prefill.py --tiny --tokens 64 # check the script (numbers meaningless)

The human tables go to stdout, and the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_generate import rounded  # noqa: E402
from common import bench_config, prefill_flops, random_model  # noqa: E402
from probes import gemm_peaks  # noqa: E402

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from dsv3.generation.generate import make_cache  # noqa: E402
from dsv3.kernels import KERNEL_CHOICES, select_kernels  # noqa: E402
from dsv3.model.attention import MultiHeadLatentAttention  # noqa: E402
from dsv3.model.moe import MoE, RoutedExperts, Router, SwiGLU  # noqa: E402

PARTS = ("attention", "dense MLP", "router", "routed experts", "shared experts", "LM head", "rest")


def part_of(model: DeepseekV3ForCausalLM) -> dict[torch.nn.Module, str]:
    """Module -> part name, for the modules whose forward is timed."""
    parts: dict[torch.nn.Module, str] = {model.lm_head: "LM head"}
    for layer in model.model.layers:
        parts[layer.self_attn] = "attention"
        if isinstance(layer.mlp, MoE):
            parts[layer.mlp.gate] = "router"
            parts[layer.mlp.experts] = "routed experts"
            if layer.mlp.shared_experts is not None:
                parts[layer.mlp.shared_experts] = "shared experts"
        else:
            parts[layer.mlp] = "dense MLP"
    for m in parts:
        assert isinstance(m, (MultiHeadLatentAttention, SwiGLU, Router, RoutedExperts, torch.nn.Module))
    return parts


class PartTimer:
    """Wall seconds inside each part's forward (none of the timed parts nest in another). The shared experts run
    through `SwiGLU.partial` (MoE adds their share before its one all-reduce), which the timer wraps per instance."""

    def __init__(self, parts: dict[torch.nn.Module, str]) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[torch.nn.Module, float] = {}
        self.handles = []
        self.wrapped: list[torch.nn.Module] = []
        for module, name in parts.items():
            if name == "shared experts":
                self._wrap_partial(module, name)
                continue
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(lambda m, a, o, name=name: self._post(m, name)))

    def _wrap_partial(self, module: torch.nn.Module, name: str) -> None:
        partial = module.partial

        def timed(x: torch.Tensor) -> torch.Tensor:
            t = time.perf_counter()
            y = partial(x)
            self.seconds[name] += time.perf_counter() - t
            return y

        module.partial = timed
        self.wrapped.append(module)

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self._start[module] = time.perf_counter()

    def _post(self, module: torch.nn.Module, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self._start.pop(module)

    def reset(self) -> None:
        self.seconds.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for module in self.wrapped:
            del module.partial   # the class's method again


def expert_gemm_flops(config: DeepseekV3Config, tokens: int) -> int:
    """FLOPs of the routed experts' two grouped GEMMs for `tokens` tokens (k experts each)."""
    rows = tokens * config.num_experts_per_tok
    per_row = 2 * (config.hidden_size * 2 * config.moe_intermediate_size + config.moe_intermediate_size
                   * config.hidden_size)
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return rows * per_row * moe_layers


@torch.no_grad()
def profile(model: DeepseekV3ForCausalLM, tokens: int, reps: int, top: int = 15) -> dict[str, Any]:
    ids = torch.randint(2, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))

    def run() -> None:
        cache = make_cache(model, "static", 1, tokens)
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1, check_inputs=False)

    run()                                                   # warm-up (oneDNN primitives, allocator)
    timer = PartTimer(part_of(model))
    best: tuple[float, dict[str, float]] | None = None
    totals: list[float] = []
    for _ in range(reps):
        timer.reset()
        t = time.perf_counter()
        run()
        total = time.perf_counter() - t
        totals.append(total)
        if best is None or total < best[0]:
            best = (total, dict(timer.seconds))
    timer.remove()
    assert best is not None
    total, seconds = best
    seconds["rest"] = total - sum(seconds.values())

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    prof_total = sum(e.self_cpu_time_total for e in ops) / 1e6
    op_rows = [dict(op=e.key, calls=e.count, self_s=e.self_cpu_time_total / 1e6,
                    pct=100 * e.self_cpu_time_total / 1e6 / prof_total) for e in ops[:top]]
    grouped = sum(e.self_cpu_time_total for e in ops if "grouped_mm" in e.key) / 1e6
    return dict(total_s=total, totals=totals, parts={p: seconds.get(p, 0.0) for p in PARTS},
                ops=op_rows, profiled_s=prof_total, grouped_mm_self_s=grouped)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="debug-size model (numbers meaningless)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                   help="dsv3.kernels.select_kernels: the CPU kernels as from_pretrained picks them (auto; on a CPU "
                        "with AMX the expert GEMMs run on AMX), required (on) or stock PyTorch ops (off)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = (DeepseekV3Config.tiny(num_nextn_predict_layers=0) if args.tiny
              else bench_config(num_nextn_predict_layers=0))
    peaks = gemm_peaks(config, repeats=7 if args.tiny else 15)
    model = random_model(config)
    chosen = select_kernels(model, args.kernels)
    r = profile(model, args.tokens, args.reps)
    r["kernels"] = repr(chosen) if chosen is not None else "stock PyTorch ops"
    flops = prefill_flops(config, 1, args.tokens)
    e_flops = expert_gemm_flops(config, args.tokens)
    peak = peaks["2048^3"]["best_gflops"]
    r.update(tokens=args.tokens, threads=torch.get_num_threads(), gemm_peaks=peaks,
             gflop_s=flops / r["total_s"] / 1e9, pct_peak=100 * flops / r["total_s"] / 1e9 / peak,
             expert_gemm_gflop_s=e_flops / r["parts"]["routed experts"] / 1e9)
    print(f"\nkernels: {r['kernels']}")
    print(f"prefill {args.tokens} tokens, batch 1, bf16, {r['threads']} threads: best of {args.reps} "
          f"{r['total_s']:.3f} s ({args.tokens / r['total_s']:.0f} tok/s), {r['gflop_s']:.0f} GFLOP/s = "
          f"{r['pct_peak']:.1f} % of the bf16 GEMM peak {peak:.0f} GFLOP/s (2048^3, best of many)")
    print("bf16 GEMM peaks: " + ", ".join(f"{k} {v['best_gflops']:.0f} (median {v['median_gflops']:.0f})"
                                          for k, v in peaks.items()))
    print(f"\n{'part':<18}{'s':>8}{'%':>7}")
    for name, s in r["parts"].items():
        print(f"{name:<18}{s:>8.3f}{100 * s / r['total_s']:>7.1f}")
    print(f"routed experts: {e_flops / 1e9:.1f} GFLOP in {r['parts']['routed experts']:.3f} s = "
          f"{r['expert_gemm_gflop_s']:.0f} GFLOP/s; grouped_mm self time {r['grouped_mm_self_s']:.3f} s")
    print(f"\ntop aten ops by self CPU time (one profiled rep, {r['profiled_s']:.3f} s)")
    for o in r["ops"]:
        print(f"  {o['op']:<40}{o['calls']:>6}{o['self_s']:>9.3f} s{o['pct']:>6.1f} %")
    print(json.dumps(rounded(r), separators=(",", ":")), flush=True)
    return r


if __name__ == "__main__":
    main()
