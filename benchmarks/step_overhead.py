"""Where a compiled decode step spends the time that does not stream weights: dynamo's guard check.

A compiled `DecodeStep` call runs dynamo's guards (is the cached graph valid for these inputs?) before the graph.
By default the step checks dynamo's guards on the model once per `generate` call and leaves dynamo only the guards
on its inputs and cache (`model_guards="per_call"`, dsv3/generation/step_guards.py). This script times, in one
process, on the same weights, each step on its own cache:

1. in turn, step by step, nothing else between them (which goes first alternates):
   - `full`: the compiled step with every guard left to dynamo (`model_guards="per_step"`, torch.compile's way);
   - `dynamo`: the compiled step as `generate` calls it (`per_call`);
2. then, step by step: each step's guard check alone right after it ran (cache-cold, as in decoding: the step
   streamed the weights and evicted the guard's objects) and repeated at once (cache-warm); and `direct`: the
   `per_call` step's cached graph called without dynamo (the transformed code of the cache entry it hit), after
   checking that entry's guards ourselves on the same inputs — every `direct` step is one that dynamo would also
   have run; if the check fails the script stops with that fact. (The checks and calls between the steps of
   this loop change what the next step finds in the caches, hence the separate loop for 1.)

The `direct` call and the guard timings read dynamo internals (`_debug_get_cache_entry_list`, a cache entry's
`code` and `guard_manager`): a measurement tool for torch 2.13, not a code path of dsv3 — dropping the remaining
guards would let a cache-length-dependent branch (capacity and context-length checks) run the wrong graph.

    python benchmarks/step_overhead.py CHECKPOINT [--quantization int8|int4] [--context 128] [--steps 100]
    python benchmarks/step_overhead.py CHECKPOINT --evict-mb 1024   # many layers, small widths: 1 GiB read
                                                                    # between steps, as a big model's weights are

The human summary goes to stdout, the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_generate import fill_dsv3_cache  # noqa: E402

import dsv3.generation.generate as generate_module  # noqa: E402
from dsv3 import DeepseekV3ForCausalLM  # noqa: E402
from dsv3.generation.generate import DecodeStep  # noqa: E402

WARMUP = 3


class GuardTimingUnavailable(RuntimeError):
    """This torch lacks the dynamo internals the `direct` measurement reads."""


def cached_entry(step: DecodeStep) -> Any:
    """The cache entry dynamo ran last for the step's code (per_call: the model's own copy; per_step: _eager's)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError as e:
        raise GuardTimingUnavailable(f"torch {torch.__version__}: {e}") from e
    code = step.step_code.function.__code__ if step.step_code is not None else DecodeStep._eager.__code__
    entries = _debug_get_cache_entry_list(code)
    if not entries:
        raise RuntimeError("the compiled decode step has no cache entry: it did not compile (see the log)")
    entry = entries[0]
    if not hasattr(entry, "guard_manager") or not hasattr(entry, "code"):
        raise GuardTimingUnavailable(f"torch {torch.__version__}: cache entries lack guard_manager/code")
    return entry


def compiled_step(model: DeepseekV3ForCausalLM, model_guards: str) -> DecodeStep:
    step = DecodeStep(model, compile=True, model_guards=model_guards)
    if not step.compiled:
        raise RuntimeError("DecodeStep(compile=True) did not compile on this machine")
    if (step.step_code is not None) != (model_guards == "per_call"):
        raise GuardTimingUnavailable(f"torch {torch.__version__}: the step cannot check the model's guards per call")
    return step


def cold_and_warm_check(guards: Any, frame: dict[str, Any]) -> tuple[float, float, bool]:
    t = time.perf_counter()
    ok = guards.check(frame)
    t1 = time.perf_counter()
    guards.check(frame)
    return t1 - t, time.perf_counter() - t1, ok


@torch.no_grad()   # as generate runs (grad mode is one of the guards)
def measure(model: DeepseekV3ForCausalLM, context: int, steps: int, evict_mb: int = 0) -> dict[str, Any]:
    step, full = compiled_step(model, "per_call"), compiled_step(model, "per_step")
    cache = fill_dsv3_cache(model, 1, context, WARMUP + 3 * steps + 2)
    cache_full = fill_dsv3_cache(model, 1, context, WARMUP + 2 * steps + 1)
    ids = torch.randint(2, model.config.vocab_size, (1, 1))
    pos = pos_full = context
    for _ in range(WARMUP):
        step(ids, torch.full((1, 1), pos), cache, None)
        full(ids, torch.full((1, 1), pos_full), cache_full, None)
        pos, pos_full = pos + 1, pos_full + 1
    if step.compiled_calls != WARMUP or full.compiled_calls != WARMUP:
        raise RuntimeError("the compiled decode step fell back to eager (see the log)")
    entry, entry_full = cached_entry(step), cached_entry(full)
    direct = types.FunctionType(entry.code, vars(generate_module))
    t_full, t_dynamo, t_check, t_direct, g_cold, g_warm, f_cold, f_warm = [], [], [], [], [], [], [], []
    # read between steps (untimed), so that a small model's guard check starts as cold as a big model's does
    evict = torch.ones(evict_mb * 2**18) if evict_mb > 0 else None

    def timed(s: DecodeStep, position: int, c: Any) -> tuple[float, dict[str, Any]]:
        """One step through dynamo (memory read before and after, untimed); the frame of the next step."""
        if evict is not None:
            evict.sum()
        t = time.perf_counter()
        s._fn(ids, torch.full((1, 1), position), c, None)
        seconds = time.perf_counter() - t
        if evict is not None:
            evict.sum()
        return seconds, {"self": s, "ids": ids, "positions": torch.full((1, 1), position + 1), "cache": c,
                         "attention_mask": None}

    # 1. the two steps alone, in turn (which goes first alternates): nothing else runs between them
    for i in range(steps):
        for which in ("full", "per_call") if i % 2 == 0 else ("per_call", "full"):
            if which == "full":
                seconds, _ = timed(full, pos_full, cache_full)
                t_full.append(seconds)
                pos_full += 1
            else:
                seconds, _ = timed(step, pos, cache)
                t_dynamo.append(seconds)
                pos += 1
    # 2. each step's guard check after it ran; the per_call step's graph called directly after our own check
    for _ in range(steps):
        _, frame = timed(full, pos_full, cache_full)
        pos_full += 1
        cold, warm, _ = cold_and_warm_check(entry_full.guard_manager, frame)
        f_cold.append(cold)
        f_warm.append(warm)
        seconds, frame = timed(step, pos, cache)
        t_check.append(seconds)
        pos += 1
        cold, warm, ok = cold_and_warm_check(entry.guard_manager, frame)
        if not ok:
            raise RuntimeError(f"the cached graph's guards fail at position {pos}: dynamo would recompile; "
                               "the direct measurement stops here")
        t = time.perf_counter()
        direct(step, ids, frame["positions"], cache, None)
        t_direct.append(time.perf_counter() - t + cold)   # the direct step pays one (cold) check
        g_cold.append(cold)
        g_warm.append(warm)
        pos += 1
    med = statistics.median
    return {"context": context, "steps": steps,
            "full_guards_ms": med(t_full) * 1e3, "dynamo_ms": med(t_dynamo) * 1e3, "direct_ms": med(t_direct) * 1e3,
            "per_call_saving_ms": med([a - b for a, b in zip(t_full, t_dynamo, strict=True)]) * 1e3,
            "saving_ms": med([a - b for a, b in zip(t_check, t_direct, strict=True)]) * 1e3,
            "guard_cold_us": med(g_cold) * 1e6, "guard_warm_us": med(g_warm) * 1e6,
            "full_guard_cold_us": med(f_cold) * 1e6, "full_guard_warm_us": med(f_warm) * 1e6,
            "guards_per_step": step.step_code.guards.kept, "guards_per_call": len(step.step_code.guards.deferred),
            "tensor_inputs": sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers()),
            "layers": model.config.num_hidden_layers, "evict_mb": evict_mb}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--quantization", choices=["int8", "int4"], default=None)
    parser.add_argument("--head-quantization", choices=["int8", "int4"], default=None)
    parser.add_argument("--fp8", choices=["dequantize", "keep"], default="dequantize")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--evict-mb", type=int, default=0,
                        help="MiB read between steps (untimed): a small model's guards then start cache-cold")
    args = parser.parse_args(argv)
    if args.context < 1 or args.steps < 1 or args.evict_mb < 0:
        parser.error(f"--context and --steps must be >= 1 and --evict-mb >= 0 (got {args.context}, {args.steps}, "
                     f"{args.evict_mb})")
    if not args.checkpoint.is_dir():
        parser.error(f"checkpoint {args.checkpoint} is not a directory; pass a dsv3/HF checkpoint folder")
    kwargs: dict[str, Any] = {"torch_dtype": torch.bfloat16, "fp8": args.fp8}
    if args.quantization:
        kwargs["quantization"] = args.quantization
    if args.head_quantization:
        kwargs["head_quantization"] = args.head_quantization
    model = DeepseekV3ForCausalLM.from_pretrained(args.checkpoint, **kwargs)
    try:
        result = measure(model, args.context, args.steps, args.evict_mb)
    except GuardTimingUnavailable as e:
        print(f"guard timing unavailable: {e}")
        result = {"unavailable": str(e)}
    else:
        print(f"context {result['context']}, {result['steps']} steps each: compiled step with every guard checked "
              f"by dynamo {result['full_guards_ms']:.2f} ms, with the model's guards checked per call (generate's "
              f"default) {result['dynamo_ms']:.2f} ms (saving {result['per_call_saving_ms']:.3f} ms; "
              f"{result['guards_per_step']} of {result['guards_per_step'] + result['guards_per_call']} guards left "
              f"per step), the same graph called directly after our own guard check {result['direct_ms']:.2f} ms "
              f"(saving {result['saving_ms']:.3f} ms more); guard check {result['full_guard_cold_us']:.0f} -> "
              f"{result['guard_cold_us']:.0f} µs cache-cold, {result['full_guard_warm_us']:.0f} -> "
              f"{result['guard_warm_us']:.0f} µs warm ({result['layers']} layers, {result['tensor_inputs']} "
              f"parameters and buffers{f', {args.evict_mb} MiB read between steps' if args.evict_mb else ''})")
    result.update(quantization=args.quantization, head_quantization=args.head_quantization, fp8=args.fp8,
                  torch=torch.__version__, threads=torch.get_num_threads())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
