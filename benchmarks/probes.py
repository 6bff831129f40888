"""The machine's rooflines, measured so that repeated runs agree: memory bandwidth and the bf16 GEMM peak.

A one-shot probe is unstable on shared VMs (a neighbour's burst halves it), so every probe here runs many
times and reports the best (what the hardware can do when left alone: the roofline the benchmarks divide
by) next to the median (what this run typically saw: how noisy the machine was).

Memory bandwidth, each with 1 thread and with `threads` (default: torch's), over buffers far larger than
the caches:
- `read`:  s = x.sum() over a 1 GiB fp32 buffer — a read-only stream, what batch-1 decode does with the
           weights (fp32 because torch's fp32 reduction keeps up with memory; a bf16 sum is compute-bound);
- `triad`: a = b + 3·c (STREAM's triad) over three 512 MiB fp32 arrays (1.5 GiB), counted as STREAM
           counts it: 3 × 512 MiB moved per pass (two reads, one write; the write-allocate read not counted).
Decode "% of bandwidth" divides by the best `read` with the benchmark's thread count (`decode_roofline`).

bf16 GEMM peak: torch.matmul (oneDNN) of [M, K] @ [K, N] in bf16, best and median of many, at 2048³ (the
compute roofline prefill "% of peak" divides by) and at shapes prefill takes on the bench model.

    python benchmarks/probes.py            # print the probes (and one JSON line)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3 import DeepseekV3Config  # noqa: E402

READ_MIB = 1024
TRIAD_MIB = 512      # per array; three arrays
PEAK_KEY = "2048^3"  # the GEMM prefill "% of peak" divides by


@contextmanager
def num_threads(n: int):  # noqa: ANN201
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _summary(nbytes_or_flops: float, times: list[float], scale: float) -> dict[str, float]:
    return dict(best=nbytes_or_flops / min(times) / scale, median=nbytes_or_flops / statistics.median(times) / scale,
                runs=len(times))


def bandwidth(threads: int | None = None, repeats: int = 20, read_mib: int = READ_MIB,
              triad_mib: int = TRIAD_MIB) -> dict[str, dict[str, float]]:
    """GB/s of the read-only sum and the triad with 1 thread and with `threads`: {"read 2t": {best, median}}."""
    threads = threads or torch.get_num_threads()
    out: dict[str, dict[str, float]] = {}
    x = torch.ones(read_mib * 2**20 // 4, dtype=torch.float32)
    for n in sorted({1, threads}):
        with num_threads(n):
            out[f"read {n}t"] = _summary(x.numel() * 4, repeat(x.sum, repeats), 1e9)
    del x
    n_el = triad_mib * 2**20 // 4
    a, b, c = torch.empty(n_el), torch.ones(n_el), torch.ones(n_el)
    for n in sorted({1, threads}):
        with num_threads(n):
            out[f"triad {n}t"] = _summary(3 * n_el * 4, repeat(lambda: torch.add(b, c, alpha=3.0, out=a), repeats),
                                          1e9)
    return out


def gemm_shapes(config: DeepseekV3Config, tokens: int = 512) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of the bf16 GEMMs to probe: 2048³ and what a `tokens`-token prefill multiplies on `config`."""
    d, e = config.hidden_size, config.moe_intermediate_size
    rows_per_expert = max(1, tokens * config.num_experts_per_tok // config.n_routed_experts)
    return {
        PEAK_KEY: (2048, 2048, 2048),
        f"dense up {tokens}x{d}x{config.intermediate_size}": (tokens, d, config.intermediate_size),
        f"shared up {tokens}x{d}x{2 * e * config.n_shared_experts}": (tokens, d, 2 * e * config.n_shared_experts),
        f"expert gate_up {rows_per_expert}x{d}x{2 * e}": (rows_per_expert, d, 2 * e),
        f"expert down {rows_per_expert}x{e}x{d}": (rows_per_expert, e, d),
    }


def gemm_peaks(config: DeepseekV3Config | None = None, repeats: int = 15, tokens: int = 512,
               min_seconds: float = 0.02) -> dict[str, dict[str, float]]:
    """bf16 GFLOP/s of torch.matmul at 2048³ and the bench shapes: {name: {best_gflops, median_gflops, M, K, N}}.
    Small GEMMs are looped inside one timing so each timing lasts at least `min_seconds`."""
    shapes = gemm_shapes(config, tokens) if config is not None else {PEAK_KEY: (2048, 2048, 2048)}
    out: dict[str, dict[str, float]] = {}
    gen = torch.Generator().manual_seed(0)
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        b = torch.randn(k, n, generator=gen).to(torch.bfloat16)
        c = torch.empty(m, n, dtype=torch.bfloat16)
        once = repeat(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c), 1, warmup=2)[0]
        inner = max(1, int(min_seconds / max(once, 1e-6)))

        def run(a: torch.Tensor = a, b: torch.Tensor = b, c: torch.Tensor = c, inner: int = inner) -> None:
            for _ in range(inner):
                torch.matmul(a, b, out=c)

        times = repeat(run, repeats)
        s = _summary(2 * m * k * n * inner, times, 1e9)
        out[name] = dict(best_gflops=s["best"], median_gflops=s["median"], M=m, K=k, N=n, runs=repeats)
    return out


def machine_probes(config: DeepseekV3Config | None = None, threads: int | None = None,
                   quick: bool = False) -> dict[str, Any]:
    """Bandwidth (read and triad, 1 and `threads` threads) and bf16 GEMM peaks, with the figures the
    benchmarks divide by: `decode_roofline_gbs` (best read with `threads`) and `gemm_peak_gflops` (2048³)."""
    threads = threads or torch.get_num_threads()
    bw = bandwidth(threads, repeats=5 if quick else 20)
    peaks = gemm_peaks(config, repeats=3 if quick else 15)
    return dict(threads=threads, bandwidth_gbs=bw, gemm_gflops=peaks,
                decode_roofline_gbs=bw[f"read {threads}t"]["best"],
                decode_roofline_method=f"best of {bw[f'read {threads}t']['runs']} fp32 x.sum() over {READ_MIB} MiB, "
                                       f"{threads} threads",
                gemm_peak_gflops=peaks[PEAK_KEY]["best_gflops"],
                gemm_peak_method=f"best of {peaks[PEAK_KEY]['runs']} bf16 torch.matmul {PEAK_KEY}, {threads} threads")


def format_probes(p: dict[str, Any]) -> str:
    bw = "; ".join(f"{k} {v['best']:.1f} (median {v['median']:.1f})" for k, v in p["bandwidth_gbs"].items())
    gemm = "; ".join(f"{k} {v['best_gflops']:.0f} (median {v['median_gflops']:.0f})"
                     for k, v in p["gemm_gflops"].items())
    return (f"memory bandwidth GB/s, best of many (median): {bw}\n"
            f"bf16 GEMM GFLOP/s, best (median): {gemm}\n"
            f"decode % of bandwidth divides by {p['decode_roofline_gbs']:.1f} GB/s ({p['decode_roofline_method']}); "
            f"prefill % of peak divides by {p['gemm_peak_gflops']:.0f} GFLOP/s ({p['gemm_peak_method']})")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import bench_config

    probes = machine_probes(bench_config(), quick="--quick" in sys.argv)
    print(format_probes(probes))
    print(json.dumps(probes, separators=(",", ":")))
