"""Decode and prefill throughput of dsv3 against transformers 5.23 on one random-weight checkpoint.

One process, one set of weights: the dsv3 model is built with random bf16 weights in the bench
shape (configs/bench.json), and the transformers model is built on the meta device from the
equivalent transformers config and given the *same* tensors (`load_state_dict(assign=True)`), so
the process holds one copy (≈4.7 GB) and both models compute with identical weights.

Measured, for each implementation (dsv3 eager / compiled / with CPU kernels, transformers):
- decode tokens/s at each batch size × context: both caches are filled directly with the same
  random latents for a context of T tokens (dsv3: StaticLatentCache.plan/update/commit; transformers:
  its DeepseekV3 cache holds the compressed latents, `update(kv_nope [B,1,T,r], k_rot [B,1,T,dr],
  layer)`), then single-token steps through each model's own forward are timed (median step);
  filling long contexts by prefill would take transformers minutes at 8192.
- achieved GB/s and % of the memory roofline: bytes a step must read (all dense weights, the
  routed experts the batch actually selects, the head, the whole latent cache) / step time, over
  the read bandwidth measured in the same run. transformers is charged the same "useful bytes",
  although it also re-expands the latent cache through kv_b_proj at every step.
- prefill tokens/s (batch 1, GFLOP/s and % of the measured bf16 matmul peak; prefill is compute-bound).
- end-to-end `generate` (batch 1, 128-token prompt) as a cross-check of the decode numbers.
- cache bytes per token and layer of both caches, and peak RSS.

    python benchmarks/bench_generate.py            # full run (< ~20 min on a 2-core CPU)
    python benchmarks/bench_generate.py --quick    # smoke: few steps, contexts 128 and 2048

The human tables go to stdout, progress to stderr, and the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    bench_config,
    decode_step_bytes,
    peak_rss_gb,
    prefill_flops,
    random_model,
)
from probes import format_probes, machine_probes  # noqa: E402

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from dsv3.generation.generate import DecodeStep, generate, make_cache  # noqa: E402

HF = "transformers"
HF_STATIC = "transformers (static cache)"
WARMUP = 2            # untimed decode steps per measurement (the compiled step compiles in the first)
MIN_STEPS = 3         # timed steps kept even past the time budget
TARGETS_BF16 = "decode b1 ctx128 >= 80% of roofline; b1 ctx2048 >= 5x and ctx8192 >= 10x transformers; " \
               "b8 >= 2x; prefill 512 >= 2x; cache 1152 B/token/layer"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models


def build_hf_model(ours: DeepseekV3ForCausalLM) -> Any:
    """transformers' DeepseekV3ForCausalLM holding our weight tensors (no copy), attention 'sdpa'."""
    from transformers import DeepseekV3Config as HFConfig
    from transformers import DeepseekV3ForCausalLM as HFModel
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    hf_config = HFConfig.from_dict(ours.config.to_dict())
    hf_config._attn_implementation = "sdpa"          # its default; set so the report cannot drift
    with torch.device("meta"):
        hf = HFModel(hf_config)
    result = hf.load_state_dict(ours.state_dict(), assign=True, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"dsv3 and transformers parameter names differ: missing in dsv3 {result.missing_keys[:5]}, "
                           f"unknown to transformers {result.unexpected_keys[:5]}")
    hf.model.rotary_emb = DeepseekV3RotaryEmbedding(hf.config)   # non-persistent buffers: build on CPU
    ours_ptrs = {t.data_ptr() for t in ours.state_dict().values()}
    copied = [n for n, t in hf.state_dict().items() if t.data_ptr() not in ours_ptrs and "rotary" not in n]
    if copied:
        raise RuntimeError(f"transformers model does not share these tensors with dsv3: {copied[:5]}")
    hf.generation_config.pad_token_id = ours.config.eos_token_ids[0] if ours.config.eos_token_ids else 0
    return hf.eval()


def random_latent(config: Any, batch: int, context: int, layer: int, dtype: torch.dtype) -> torch.Tensor:
    """A deterministic random [B, T, r_kv + dr] latent (the same values for both models' caches)."""
    gen = torch.Generator().manual_seed(1_000_003 * layer + 7919 * batch + context)
    width = config.kv_lora_rank + config.qk_rope_head_dim
    return torch.randn(batch, context, width, generator=gen).to(dtype)


def fill_dsv3_cache(model: DeepseekV3ForCausalLM, batch: int, context: int, extra: int) -> Any:
    cache = make_cache(model, "static", batch, context + extra)
    step = cache.plan(batch, context, model.device)
    for layer in range(cache.num_layers):
        cache.update(layer, random_latent(model.config, batch, context, layer, model.dtype), step)
    cache.commit(step)
    return cache


def fill_hf_cache(hf: Any, kind: str, batch: int, context: int, extra: int) -> Any:
    from transformers import DynamicCache, StaticCache

    config = hf.config
    cache = (DynamicCache(config=config) if kind == HF else StaticCache(config=config, max_cache_len=context + extra))
    r = config.kv_lora_rank
    for layer in range(config.num_hidden_layers):
        latent = random_latent(config, batch, context, layer, hf.dtype)[:, None]    # [B, 1, T, r + dr]
        cache.update(latent[..., :r], latent[..., r:], layer)                       # kv_nope, k_rot
    return cache


# ----------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[int], Any], steps: int, budget_s: float) -> list[float]:
    """Per-call seconds of fn(0), fn(1), ...: up to `steps` calls, stopping after `budget_s` once MIN_STEPS ran."""
    times: list[float] = []
    start = time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
        if i + 1 >= MIN_STEPS and time.perf_counter() - start > budget_s:
            break
    return times


@torch.no_grad()
def decode_dsv3(model: DeepseekV3ForCausalLM, step: DecodeStep, batch: int, context: int, steps: int,
                budget_s: float, record_experts: bool) -> tuple[list[float], list[float] | None, float]:
    """(step seconds, distinct routed experts per MoE layer or None, warm-up seconds)."""
    # One spare slot: a compiled step re-specialises (recompiles) when the static cache becomes exactly full.
    cache = fill_dsv3_cache(model, batch, context, steps + WARMUP + 1)
    gen = torch.Generator().manual_seed(batch + context)
    tokens = torch.randint(2, model.config.vocab_size, (batch, steps + WARMUP), generator=gen)
    positions = [torch.full((batch, 1), context + i, dtype=torch.long) for i in range(steps + WARMUP)]
    touched: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(WARMUP):
        if record_experts:
            out = model(tokens[:, i:i + 1], position_ids=positions[i], past_key_values=cache, use_cache=True,
                        logits_to_keep=1, output_router_outputs=True, check_inputs=False)
            touched.append([int(r.indices.unique().numel()) for r in out.router_outputs])
        else:
            step(tokens[:, i:i + 1], positions[i], cache, None)
    warm = time.perf_counter() - t0
    times = time_calls(lambda i: step(tokens[:, WARMUP + i:WARMUP + i + 1], positions[WARMUP + i], cache, None),
                       steps, budget_s)
    experts = [statistics.mean(col) for col in zip(*touched)] if touched else None
    return times, experts, warm


@torch.no_grad()
def decode_hf(hf: Any, kind: str, batch: int, context: int, steps: int, budget_s: float) -> list[float]:
    cache = fill_hf_cache(hf, kind, batch, context, steps + WARMUP)
    gen = torch.Generator().manual_seed(batch + context)
    tokens = torch.randint(2, hf.config.vocab_size, (batch, steps + WARMUP), generator=gen)
    positions = [torch.full((batch, 1), context + i, dtype=torch.long) for i in range(steps + WARMUP)]

    def one(i: int) -> None:
        hf(input_ids=tokens[:, i:i + 1], past_key_values=cache, position_ids=positions[i], use_cache=True,
           logits_to_keep=1)

    for i in range(WARMUP):
        one(i)
    return time_calls(lambda i: one(WARMUP + i), steps, budget_s)


@torch.no_grad()
def prefill(impl: str, model: Any, length: int, reps: int) -> list[float]:
    ids = torch.randint(2, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    if impl == HF:
        def run(_: int) -> None:
            model(input_ids=ids, use_cache=True, logits_to_keep=1)   # its default DynamicCache
    else:
        def run(_: int) -> None:
            cache = make_cache(model, "static", 1, length)
            model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1, check_inputs=False)
    run(0)
    return time_calls(run, reps, budget_s=float("inf"))   # exactly `reps` timed calls (no budget cuts them short)


@torch.no_grad()
def run_generate(impl: str, model: Any, prompt: torch.Tensor, new: int, compile: bool) -> tuple[float, torch.Tensor]:
    """Seconds for one greedy generation of exactly `new` tokens (after an untimed warm-up call)."""
    def call(n: int) -> torch.Tensor:
        if impl == HF:
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False)
        return generate(model, prompt, max_new_tokens=n, eos_token_id=[], cache_implementation="static",
                        compile=compile)

    call(3)
    t = time.perf_counter()
    out = call(new)
    return time.perf_counter() - t, out[:, prompt.shape[1]:]


# ----------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps, contexts 128 and 2048, one prefill rep")
    p.add_argument("--contexts", type=int, nargs="+", help="decode contexts (default 128 2048 8192)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, help="timed decode steps per measurement (default 32; --quick 4)")
    p.add_argument("--budget-s", type=float, help="stop a decode measurement after this many seconds once "
                   f"{MIN_STEPS} steps ran (default 20; --quick 5)")
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--prefill-reps", type=int, help="timed prefills per length (default 3; --quick 1)")
    p.add_argument("--new-tokens", type=int, help="tokens per end-to-end generate (default 32; --quick 8)")
    p.add_argument("--skip-hf", action="store_true", help="dsv3 only (no ratios)")
    p.add_argument("--hf-static", action="store_true", help="also time transformers with its StaticCache")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled dsv3 decode step")
    p.add_argument("--no-kernels", action="store_true", help="skip dsv3.kernels even if importable")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--tiny", action="store_true", help="debug-size model to check the script (numbers meaningless)")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    args = p.parse_args(argv)
    quick = args.quick
    args.contexts = args.contexts or ([128, 2048] if quick else [128, 2048, 8192])
    args.steps = args.steps or (4 if quick else 32)
    args.budget_s = args.budget_s if args.budget_s is not None else (5.0 if quick else 20.0)
    args.prefill_reps = args.prefill_reps or (1 if quick else 3)
    args.new_tokens = args.new_tokens or (8 if quick else 32)
    return args


def kernels_module() -> tuple[Any, str]:
    try:
        import dsv3.kernels as kernels
    except ImportError as e:
        return None, f"dsv3.kernels not importable ({e})"
    if not hasattr(kernels, "use_cpu_kernels"):
        return None, "dsv3.kernels has no use_cpu_kernels"
    return kernels, ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    log(f"torch {torch.__version__}, {threads} threads; measuring memory bandwidth and matmul peak")
    # benchmarks/probes.py: read and triad with 1 and `threads` threads, bf16 GEMM peaks, best and median of many;
    # decode % of roofline divides by the best read, prefill % of peak by the best bf16 2048^3 GEMM.
    probes = machine_probes(None if args.tiny else bench_config(), threads, quick=args.quick)
    bandwidth, bw_method = probes["decode_roofline_gbs"], probes["decode_roofline_method"]
    gemm_peak = probes["gemm_peak_gflops"]
    log(f"read bandwidth {bandwidth:.1f} GB/s; bf16 matmul peak {gemm_peak:.0f} GFLOP/s")

    # No MTP module: plain decoding never runs it and transformers has none (the bench shape is 2.36 B params).
    config = (DeepseekV3Config.tiny(num_nextn_predict_layers=0, max_position_embeddings=16384) if args.tiny
              else bench_config(num_nextn_predict_layers=0))
    t = time.perf_counter()
    model = random_model(config)
    params_b = sum(p.numel() for p in model.parameters()) / 1e9
    log(f"dsv3 model: {params_b:.2f} B params in {model.dtype}, "
        f"built in {time.perf_counter() - t:.0f} s")
    hf = None
    notes: list[str] = []
    if not args.skip_hf:
        import transformers

        hf = build_hf_model(model)
        notes.append(f"transformers {transformers.__version__}: attn_implementation={hf.config._attn_implementation}, "
                     f"experts_implementation={hf.config._experts_implementation}, DynamicCache (its default); "
                     "weights shared with dsv3 (router gate.weight kept fp32 in both)")
        ids = torch.randint(2, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = model(ids).logits.float()
            b = hf(input_ids=ids).logits.float()
        parity = float((a - b).abs().max()) / float(b.abs().max())
        notes.append(f"parity: max|logits dsv3 - transformers| / max|logits| = {parity:.2e} (bf16, 16 tokens)")
        log(notes[-1])
    rss_loaded = peak_rss_gb()

    kernels, why_not = kernels_module() if not args.no_kernels else (None, "--no-kernels")
    impls: list[tuple[str, bool, bool]] = [("dsv3 (eager)", False, False)]   # (name, kernels, compile)
    if not args.no_compile:
        impls.append(("dsv3 (compiled)", False, True))
    hf_impls = [] if hf is None else [HF] + ([HF_STATIC] if args.hf_static else [])
    if kernels is None:
        notes.append(f"no kernels row: {why_not}")

    decode: list[dict[str, Any]] = []
    prefills: list[dict[str, Any]] = []
    generates: list[dict[str, Any]] = []
    experts_touched: dict[int, list[float]] = {}
    prompt = torch.randint(2, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))

    def bytes_for(batch: int, context: int) -> int:
        return decode_step_bytes(model, batch, context, experts_touched.get(batch)).total

    def add_decode(impl: str, batch: int, context: int, times: list[float], note: str = "") -> None:
        med = statistics.median(times)
        step_bytes = bytes_for(batch, context)
        decode.append(dict(impl=impl, batch=batch, context=context, steps=len(times), step_ms=med * 1e3,
                           tok_s=batch / med, gb_s=step_bytes / med / 1e9, pct_roofline=100 * step_bytes / med / 1e9
                           / bandwidth, roofline_tok_s=bandwidth * 1e9 * batch / step_bytes, note=note))
        log(f"  {impl} b{batch} ctx{context}: {batch / med:.2f} tok/s ({len(times)} steps)")

    def add_prefill_and_generate(impl: str, impl_model: Any) -> None:
        for length in args.prefill_lengths:
            log(f"prefill {impl} {length} tokens")
            med = statistics.median(prefill(impl, impl_model, length, args.prefill_reps))
            prefills.append(dict(impl=impl, batch=1, tokens=length, seconds=med, tok_s=length / med,
                                 gflop_s=prefill_flops(config, 1, length) / med / 1e9))
        add_generate(impl, impl_model, compile=False)

    def add_generate(impl: str, impl_model: Any, compile: bool) -> None:
        log(f"generate {impl}")
        secs, out = run_generate(impl, impl_model, prompt, args.new_tokens, compile=compile)
        generates.append(dict(impl=impl, prompt=prompt.shape[1], new_tokens=args.new_tokens, seconds=secs,
                              tok_s=args.new_tokens / secs, tokens=out[0].tolist()))

    def run_dsv3(name: str, use_kernels: bool, compile: bool) -> None:
        if compile:
            # Dynamo caches graphs per code object: start each compiled implementation from a clean slate, so
            # one implementation's shapes do not use up the other's recompile budget.
            torch._dynamo.reset()
        step = DecodeStep(model, compile=compile)
        for batch in args.batch_sizes:
            for context in args.contexts:
                log(f"decode {name} b{batch} ctx{context}")
                record = name == "dsv3 (eager)" and batch not in experts_touched
                times, touched, warm = decode_dsv3(model, step, batch, context, args.steps, args.budget_s, record)
                if touched is not None:
                    experts_touched[batch] = touched
                note = ""
                if compile:
                    note = f"warm-up {warm:.0f} s" if step.compiled else "compile failed: eager"
                add_decode(name, batch, context, times, note)
        if compile:
            return   # prefill and generate's prefill are eager whatever the decode step is
        add_prefill_and_generate(name, model)

    for name, use_kernels, compile in impls:
        run_dsv3(name, use_kernels, compile)
    if not args.no_compile:
        add_generate("dsv3 (compiled)", model, compile=True)

    for name in hf_impls:
        for batch in args.batch_sizes:
            for context in args.contexts:
                log(f"decode {name} b{batch} ctx{context}")
                add_decode(name, batch, context, decode_hf(hf, name, batch, context, args.steps, args.budget_s))
        if name != HF:
            continue
        add_prefill_and_generate(HF, hf)

    # Kernels last: use_cpu_kernels edits the model in place, and transformers shares its weights.
    if kernels is not None:
        try:
            enabled = kernels.use_cpu_kernels(model)
        except Exception as e:  # noqa: BLE001 - a kernel build failure must not lose the other rows
            enabled, why_not = False, f"use_cpu_kernels failed: {type(e).__name__}: {e}"
        if enabled:
            run_dsv3("dsv3 (kernels)", True, False)
            if not args.no_compile:
                run_dsv3("dsv3 (kernels+compiled)", True, True)
        else:
            notes.append(f"no kernels row: {why_not or 'use_cpu_kernels(model) returned False on this machine'}")

    cache_bytes = cache_bytes_per_token_layer(model, hf)
    result = summarise(args, config, bandwidth, bw_method, gemm_peak, threads, decode, prefills, generates,
                       experts_touched, cache_bytes, notes, rss_loaded, params_b)
    result["machine"]["probes"] = probes
    print_report(result)
    line = json.dumps(rounded(result), separators=(",", ":"))
    if args.out:
        args.out.write_text(line + "\n")
    print(line, flush=True)
    return result


def cache_bytes_per_token_layer(model: DeepseekV3ForCausalLM, hf: Any) -> dict[str, Any]:
    """Measured from filled caches (batch 2, 64 tokens): bytes held per token per layer."""
    batch, context = 2, 64
    cache = fill_dsv3_cache(model, batch, context, 0)
    out: dict[str, Any] = {"dsv3 StaticLatentCache": cache.memory_bytes() / (batch * context * cache.num_layers)}
    if hf is not None:
        hc = fill_hf_cache(hf, HF, batch, context, 0)
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in hc.layers)
        out["transformers DynamicCache"] = held / (batch * context * len(hc.layers))
        c = hf.config
        out["transformers per-step expansion (transient)"] = (
            c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
            * torch.empty(0, dtype=hf.dtype).element_size())
    return out


def summarise(args: argparse.Namespace, config: DeepseekV3Config, bandwidth: float, bw_method: str,
              gemm_peak: float, threads: int, decode: list[dict[str, Any]], prefills: list[dict[str, Any]],
              generates: list[dict[str, Any]], experts_touched: dict[int, list[float]],
              cache_bytes: dict[str, Any], notes: list[str], rss_loaded: float, params_b: float) -> dict[str, Any]:
    def ref(rows: list[dict[str, Any]], keys: tuple[str, ...], row: dict[str, Any]) -> float | None:
        for r in rows:
            if r["impl"] == HF and all(r[k] == row[k] for k in keys):
                return r["tok_s"]
        return None

    for rows, keys in ((decode, ("batch", "context")), (prefills, ("batch", "tokens")), (generates, ("prompt",))):
        for row in rows:
            base = ref(rows, keys, row)
            row["x_hf"] = row["tok_s"] / base if base else None
    hf_gen = next((g["tokens"] for g in generates if g["impl"] == HF), None)
    for g in generates:
        if hf_gen is not None:
            same = next((i for i, (a, b) in enumerate(zip(g["tokens"], hf_gen)) if a != b), len(hf_gen))
            g["same_prefix_as_hf"] = same
        del g["tokens"]
    for row in prefills:
        row["pct_matmul_peak"] = 100 * row["gflop_s"] / gemm_peak

    def best(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
        mine = [r for r in rows if r["impl"].startswith("dsv3") and all(r[k] == v for k, v in match.items())]
        return max(mine, key=lambda r: r["tok_s"]) if mine else None

    def hf_row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
        return next((r for r in rows if r["impl"] == HF and all(r[k] == v for k, v in match.items())), None)

    targets: list[dict[str, Any]] = []
    r, dr = config.kv_lora_rank, config.qk_rope_head_dim

    def target(name: str, row: dict[str, Any] | None, key: str, goal: float, reference: dict[str, Any] | None,
               exact: bool = False) -> None:
        if row is None:
            return
        value = row[key]
        met = None if value is None else (value == goal if exact else value >= goal)
        targets.append(dict(target=name, best=row.get("impl"), value=value, goal=goal, met=met,
                            transformers=reference.get(key) if reference else None))

    b1 = best(decode, batch=1, context=128)
    target("decode b1 ctx128: % of memory roofline", b1, "pct_roofline", 80.0, hf_row(decode, batch=1, context=128))
    target("decode b1 ctx2048: x transformers", best(decode, batch=1, context=2048), "x_hf", 5.0, None)
    target("decode b1 ctx8192: x transformers", best(decode, batch=1, context=8192), "x_hf", 10.0, None)
    for context in args.contexts:
        target(f"decode b8 ctx{context}: x transformers", best(decode, batch=8, context=context), "x_hf", 2.0, None)
    target("prefill 512: x transformers", best(prefills, tokens=512), "x_hf", 2.0, None)
    dsv3_cache = cache_bytes["dsv3 StaticLatentCache"]
    goal = config.kv_cache_dim * 2    # 1152 for the V3 shapes in bf16
    targets.append(dict(target="cache bytes/token/layer (bf16)", best="dsv3 StaticLatentCache", value=dsv3_cache,
                        goal=goal, met=dsv3_cache == goal,
                        transformers=cache_bytes.get("transformers DynamicCache")))

    return dict(
        bench="generate",
        shape="tiny" if args.tiny else "bench (configs/bench.json)",
        dtype="bfloat16",
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), threads=threads,
                     read_bandwidth_gbs=bandwidth, bandwidth_method=bw_method, bf16_matmul_gflops=gemm_peak,
                     torch=torch.__version__),
        method=(f"decode: both caches filled directly with the same random latents for T tokens (dsv3 "
                f"StaticLatentCache.plan/update/commit; transformers DynamicCache.update(kv_nope [B,1,T,{r}], "
                f"k_rot [B,1,T,{dr}], layer)), then single-token steps through each model's own forward, "
                f"{WARMUP} untimed, median of up to {args.steps} timed (time budget {args.budget_s:g} s, at least "
                f"{MIN_STEPS}); GB/s = bytes a step must read (weights incl. the distinct routed experts selected, "
                "head, whole latent cache) / median step, the same bytes for transformers; roofline tok/s = "
                "bandwidth / those bytes per token. prefill: batch 1, fresh cache, logits of the last position "
                "only. generate: batch 1, greedy, exactly N new tokens, wall time incl. prefill, after an untimed "
                "warm-up call."),
        params_b=params_b,
        experts_touched={str(b): v for b, v in experts_touched.items()},
        decode=decode, prefill=prefills, generate=generates, cache_bytes_per_token_layer=cache_bytes,
        targets=targets, targets_text=TARGETS_BF16, notes=notes,
        rss_gb=dict(after_load=rss_loaded, peak=peak_rss_gb()),
    )


def rounded(value: Any, digits: int = 4) -> Any:
    """Floats to `digits` significant digits, recursively (a compact JSON line)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_report(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"\nbench_generate — shape {r['shape']}, {r['dtype']}, {m['threads']} threads on {m['cores']} cores, "
          f"torch {m['torch']}")
    print(f"memory read bandwidth {m['read_bandwidth_gbs']:.1f} GB/s ({m['bandwidth_method']}); "
          f"bf16 matmul peak {m['bf16_matmul_gflops']:.0f} GFLOP/s")
    if "probes" in m:
        print(format_probes(m["probes"]))
    for note in r["notes"]:
        print(f"note: {note}")
    print(f"method: {r['method']}")
    if r["experts_touched"]:
        touched = ", ".join(f"b{b}: {[round(x, 1) for x in v]}" for b, v in r["experts_touched"].items())
        print(f"distinct routed experts read per MoE layer (measured): {touched}")

    print(f"\ndecode\n{'impl':<28}{'batch':>6}{'context':>8}{'tok/s':>10}{'ms/step':>10}{'GB/s':>8}"
          f"{'% roof':>8}{'roof tok/s':>11}{'x hf':>8}{'steps':>6}  note")
    for d in r["decode"]:
        print(f"{d['impl']:<28}{d['batch']:>6}{d['context']:>8}{d['tok_s']:>10.2f}{d['step_ms']:>10.1f}"
              f"{d['gb_s']:>8.1f}{d['pct_roofline']:>8.1f}{d['roofline_tok_s']:>11.1f}{fmt(d['x_hf'], '.2f'):>8}"
              f"{d['steps']:>6}  {d['note']}")
    print(f"\nprefill (batch 1)\n{'impl':<28}{'tokens':>7}{'tok/s':>10}{'s':>8}{'GFLOP/s':>9}{'% peak':>8}{'x hf':>8}")
    for p in r["prefill"]:
        print(f"{p['impl']:<28}{p['tokens']:>7}{p['tok_s']:>10.1f}{p['seconds']:>8.2f}{p['gflop_s']:>9.0f}"
              f"{p['pct_matmul_peak']:>8.1f}{fmt(p['x_hf'], '.2f'):>8}")
    print(f"\ngenerate (batch 1, greedy, wall time incl. prefill)\n{'impl':<28}{'prompt':>7}{'new':>5}{'tok/s':>9}"
          f"{'s':>8}{'x hf':>8}  same tokens as hf")
    for g in r["generate"]:
        same = g.get("same_prefix_as_hf")
        agree = "—" if same is None else f"first {same}/{g['new_tokens']}"
        print(f"{g['impl']:<28}{g['prompt']:>7}{g['new_tokens']:>5}{g['tok_s']:>9.2f}{g['seconds']:>8.2f}"
              f"{fmt(g['x_hf'], '.2f'):>8}  {agree}")
    print("\ncache bytes per token and layer")
    for k, v in r["cache_bytes_per_token_layer"].items():
        print(f"  {k:<46}{v:>8.0f}")
    print(f"\ntargets (bf16): {r['targets_text']}")
    for t in r["targets"]:
        met = {True: "yes", False: "NO", None: "—"}[t["met"]]
        print(f"  {t['target']:<42}{fmt(t['value'], '.2f'):>9}  goal {t['goal']:<6g} met {met:<4}"
              f" transformers {fmt(t['transformers'], '.2f')}  [{t['best']}]")
    rss = r["rss_gb"]
    print(f"\npeak RSS {rss['peak']:.2f} GB (after loading both models: {rss['after_load']:.2f} GB)\n")


if __name__ == "__main__":
    main()
