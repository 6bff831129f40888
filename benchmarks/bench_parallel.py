"""Decode tokens/s of the bench shape sharded over 1 and 2 CPU processes, and the share of a step spent in
collectives.

    python benchmarks/bench_parallel.py            # world 1 (1 and 2 threads), world 2 (torchrun, 1 thread/rank)
    python benchmarks/bench_parallel.py --quick    # the tiny shape, few steps (smoke)

Each configuration runs in its own process(es): world 1 as `python bench_parallel.py --worker`, world 2 as
`torchrun --nproc_per_node=2 bench_parallel.py --worker` (gloo). A worker builds the bench shape
(configs/bench.json, no MTP module) with random bf16 weights: on the meta device, sharded there by
`dsv3.model.parallel.shard_model` for its rank, then materialised and filled from one seed (so the replicated
tensors — router, norms, latent projections — are the same on every rank, and no rank ever holds the whole
model). It fills a static latent cache with random latents for `--context` tokens and times single-token
decode steps (`DecodeStep`, eager), median step. `ParallelContext(stats=CollectiveStats())` times every
collective (waiting on its result); the share is collective seconds / step seconds over the timed steps.
Random weights: the tokens are meaningless, the step costs are real. Prints a table and a final JSON line;
`--save FILE` also writes the report there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from common import bench_config, random_model  # noqa: E402

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from dsv3.generation.generate import DecodeStep, make_cache  # noqa: E402
from dsv3.parallel import CollectiveStats, ParallelContext  # noqa: E402

WARMUP = 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def random_sharded_model(config: DeepseekV3Config, parallel: ParallelContext, dtype: torch.dtype,
                         seed: int = 0) -> DeepseekV3ForCausalLM:
    """This rank's shard of a random-weight model, never the whole model (built on meta, sharded, filled)."""
    return random_model(config, dtype, seed, parallel)


@torch.no_grad()
def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One rank: build, fill the cache, time decode steps; returns its measurements."""
    from dsv3.parallel.launch import start_parallel, stop_parallel

    torch.set_num_threads(args.threads)
    started = start_parallel("cpu", tp_plan="auto")
    rank, world = (started[0].rank, started[0].world_size) if started else (0, 1)
    stats = CollectiveStats()
    parallel = ParallelContext(rank, world, stats=stats)
    config = (DeepseekV3Config.tiny(num_nextn_predict_layers=0) if args.quick
              else bench_config(num_nextn_predict_layers=0))
    t = time.perf_counter()
    model = random_sharded_model(config, parallel, torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    built = time.perf_counter() - t
    step = DecodeStep(model, compile=False)
    rows = []
    for batch in args.batch:
        cache = make_cache(model, "static", batch, args.context + args.steps + WARMUP + 1)
        plan = cache.plan(batch, args.context, model.device)
        gen = torch.Generator().manual_seed(batch)
        for layer in range(cache.num_layers):
            width = config.kv_lora_rank + config.qk_rope_head_dim
            cache.update(layer, torch.randn(batch, args.context, width, generator=gen).to(model.dtype), plan)
        cache.commit(plan)
        tokens = torch.randint(2, config.vocab_size, (batch, args.steps + WARMUP), generator=gen)
        times, comm, calls, sent = [], [], [], []
        for i in range(args.steps + WARMUP):
            pos = torch.full((batch, 1), args.context + i, dtype=torch.long)
            stats.reset()
            start = time.perf_counter()
            step(tokens[:, i:i + 1], pos, cache, None)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
                comm.append(stats.seconds)
                calls.append(stats.calls)
                sent.append(stats.bytes)
        median = statistics.median(times)
        rows.append(dict(batch=batch, context=args.context, steps=len(times), step_ms=median * 1e3,
                         tok_s=batch / median, comm_share=sum(comm) / sum(times), collectives=calls[0],
                         collective_bytes=sent[0]))
    if started:
        stop_parallel()
    return dict(rank=rank, world=world, threads=args.threads, weight_gb=weight_bytes / 1e9, build_s=built,
                rows=rows)


def launch(world: int, threads: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the workers of one configuration; each rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank"
        worker_args = ["--worker", "--out", str(out), "--threads", str(threads), "--context", str(args.context),
                       "--steps", str(args.steps), "--batch", *map(str, args.batch)] + (["--quick"] if args.quick
                                                                                      else [])
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
        if world == 1:
            cmd = [sys.executable, __file__, *worker_args]
        else:
            torchrun = Path(sys.executable).parent / "torchrun"
            launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
            cmd = [*launcher, f"--nproc_per_node={world}", "--master-port", str(free_port()), __file__, *worker_args]
        log(f"world {world}, {threads} thread(s) per rank: {' '.join(cmd[:3])} ...")
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"world {world} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny shape, few steps")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--save", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps = min(args.steps, 4)
    if args.worker:
        result = worker(args)
        Path(f"{args.out}.{result['rank']}").write_text(json.dumps(result))
        return

    load_before = os.getloadavg()
    configs = [(1, 1), (1, 2), (2, 1)]    # (world, threads per rank)
    results = {f"world {w} x {t} thread": launch(w, t, args) for w, t in configs}
    load_after = os.getloadavg()
    shape = "tiny (DeepseekV3Config.tiny)" if args.quick else "bench (configs/bench.json)"
    lines = [f"bench_parallel — shape {shape}, bfloat16, random "
             f"weights, eager, {os.cpu_count()} cores, torch {torch.__version__}, {platform.machine()}",
             f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min; other work on the "
             "machine shares the cores)",
             f"method: decode steps at context {args.context} (static cache filled with random latents), median "
             f"of {args.steps} after {WARMUP} warm-up; collectives timed by CollectiveStats (result waited for); "
             "world 2 = torchrun --nproc_per_node=2, gloo",
             "",
             f"{'configuration':<22} {'batch':>5} {'tok/s':>8} {'ms/step':>8} {'x w1x1':>7} {'comm %':>7} "
             f"{'coll/step':>9} {'KB/step':>8} {'GB/rank':>8}"]
    base = {row["batch"]: row["tok_s"] for row in results["world 1 x 1 thread"][0]["rows"]}
    table = []
    for name, ranks in results.items():
        for i, row in enumerate(ranks[0]["rows"]):
            slowest = max((r["rows"][i] for r in ranks), key=lambda x: x["step_ms"])
            share = statistics.mean(r["rows"][i]["comm_share"] for r in ranks)
            table.append(dict(configuration=name, batch=row["batch"], tok_s=row["batch"] * 1e3 / slowest["step_ms"],
                              step_ms=slowest["step_ms"], speedup=row["batch"] * 1e3 / slowest["step_ms"]
                              / base[row["batch"]], comm_share=share, collectives=row["collectives"],
                              collective_kb=row["collective_bytes"] / 1e3, weight_gb=ranks[0]["weight_gb"]))
            t = table[-1]
            lines.append(f"{name:<22} {t['batch']:>5} {t['tok_s']:>8.2f} {t['step_ms']:>8.1f} {t['speedup']:>7.2f} "
                         f"{100 * t['comm_share']:>6.1f}% {t['collectives']:>9} {t['collective_kb']:>8.1f} "
                         f"{t['weight_gb']:>8.3f}")
    lines.append("")
    lines.append("tok/s = batch / the slowest rank's median step; comm % = mean over ranks of collective time / "
                 "step time; KB/step = bytes each rank hands to collectives per step; GB/rank = weights held")
    report = "\n".join(lines)
    print(report)
    summary = dict(benchmark="bench_parallel", load_before=load_before[0], load_after=load_after[0], rows=table)
    print(json.dumps(summary))
    if args.save:
        tmp = args.save.with_suffix(args.save.suffix + ".tmp")
        tmp.write_text(report + "\n" + json.dumps(summary) + "\n")
        tmp.replace(args.save)


if __name__ == "__main__":
    main()
