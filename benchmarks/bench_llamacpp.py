"""dsv3 against llama.cpp on the same weights: decode batch 1 and prefill 512 in bf16, int8, int4 and FP8.

One run, one set of weights, side by side:
1. llama.cpp is built once (benchmarks/build_llamacpp.sh: the source distribution of llama-cpp-python, which
   vendors llama.cpp and its convert_hf_to_gguf.py; only llama-bench and llama-quantize, cached outside the
   repository, keyed by version).
2. A bench-shape checkpoint (configs/bench.json, no MTP layer) with random bf16 weights (benchmarks/common.py
   `random_model`, seed 0) is saved once into the work directory, with `scoring_func: sigmoid` and
   `topk_method: noaux_tc` in config.json (llama.cpp's converter routes with softmax without them) and the
   tokenizer shipped with dsv3 (dsv3/assets/dsv3-pystd: its vocabulary is padded to 129280 by the converter,
   and its pre-tokenizer — DeepSeek-V3's regexes — is named "deepseek-v3" for the converter, which only
   recognises known tokenizers by a hash of their output). The same checkpoint is written once more as
   DeepSeek block FP8 (128×128 e4m3 + scale_inv on every projection, as DeepSeek publishes V3).
3. llama.cpp: convert_hf_to_gguf.py -> GGUF bf16, llama-quantize -> Q8_0 and Q4_K_M, then llama-bench -t T
   -r R -o json: `-p 512 -n 0 -d 0` (prefill) and `-p 0 -n 64 -d 0,2048,8192` (decode; prefill at depth too with
   --prefill-depths), the quantised files with `--repack 0,1`
   (llama.cpp's CPU repacking of Q8_0/Q4_K weights into interleaved layouts; it needs care on AMX machines,
   where the stock build aborts unless `--repack 0`; the fastest configuration is the one compared).
4. dsv3 on the same weights: bf16, int8 (`from_pretrained(quantization="int8")`), int4 ("int4"), FP8 kept as
   stored (`fp8="keep"` on the FP8 checkpoint): decode batch 1 at contexts 128 / 2048 / 8192 (the latent
   cache filled with random values for the context, then single-token steps: bench_generate.decode_dsv3) and
   prefill 512 (bench_generate.prefill). Each precision as `from_pretrained` loads it by default ("default":
   whatever kernels the library picks on its own) and, when dsv3.kernels has `use_cpu_kernels`, after it
   ("kernels"), so the script runs today's stock paths and picks up new kernels when they land.
5. One table: tokens/s, ratio to dsv3 bf16, ratio to llama.cpp at the matching precision (bf16-BF16,
   int8-Q8_0, int4-Q4_K_M, FP8-Q8_0: the other 8-bit format), and % of the machine's rooflines:
   decode: bytes of weights one token reads (everything but the routed experts, plus k of E routed experts and
   one embedding row; dsv3: its tensors as held; llama.cpp: the GGUF's tensor sizes) × tokens/s ÷ the read
   bandwidth; prefill: the same matmul FLOPs for both (benchmarks/common.prefill_flops) ÷ the bf16 GEMM
   peak. Both rooflines come from benchmarks/probes.py, run at the start and at the end: the best of either.

Context 128 of dsv3 is compared with llama.cpp's depth 0 (tg64 at depth 0 averages positions 0-63).

    python benchmarks/bench_llamacpp.py                          # build if needed, everything
    python benchmarks/bench_llamacpp.py --quick                  # fewer reps and steps
    python benchmarks/bench_llamacpp.py --llama-bin DIR --llama-src DIR   # a llama.cpp built elsewhere

The human tables go to stdout, progress to stderr, and the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from bench_generate import decode_dsv3, kernels_module, prefill, rounded  # noqa: E402
from common import (  # noqa: E402
    BENCH_CONFIG,
    bench_config,
    decode_step_bytes,
    expected_distinct_experts,
    peak_rss_gb,
    prefill_flops,
    random_model,
    write_fp8_checkpoint,
)
from probes import format_probes, machine_probes  # noqa: E402

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from dsv3.generation.generate import DecodeStep  # noqa: E402

LLAMA_VERSION = "0.3.36"              # llama-cpp-python release whose sdist vendors llama.cpp (commit 0c1e570)
TOKENIZER_ASSETS = ROOT / "dsv3" / "assets" / "dsv3-pystd"
# q4_k_m_h4: Q4_K_M with its output matrix in q4_K too (llama-quantize --output-tensor-type q4_K; Q4_K_M keeps
# it at Q6_K), what dsv3's int4+h4 is compared with
GGUF_TYPES = ("bf16", "q8_0", "q4_k_m", "q4_k_m_h4")
LLAMA_LABEL = {"bf16": "BF16", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M", "q4_k_m_h4": "Q4_K_M+h4"}
QUANTIZE_ARGS = {"q4_k_m_h4": ["--output-tensor-type", "q4_K"]}   # llama-quantize flags beyond the type
# dsv3 precision -> the llama.cpp file it is compared with
MATCHING = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_k_m", "int4+h4": "q4_k_m_h4", "fp8": "q8_0",
            "fp8+int8": "q8_0"}
# fp8+int8: FP8 kept, the bf16 LM head int8; int4+h4: int4 with head_quantization="int4" (the head int4 too)
PRECISIONS = ("bf16", "int8", "int4", "int4+h4", "fp8", "fp8+int8")
CONTEXT_TO_DEPTH = {128: 0}           # dsv3 context -> llama.cpp depth (otherwise equal)
# --tiny: the bench layout at a fraction of the size (vocabulary above the shipped tokenizer's 8207 tokens)
TINY = dict(vocab_size=8448, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, q_lora_rank=128,
            kv_lora_rank=128, num_attention_heads=4, num_key_value_heads=4)
GOALS = "decode: dsv3 int8 >= llama.cpp Q8_0, dsv3 int4 >= llama.cpp Q4_K_M at every depth; prefill 512 >= " \
        "llama.cpp at each precision; int8 >= 1.7x, FP8 >= 1.6x, int4 >= 2.7x dsv3 bf16; prefill >= 40% of peak"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run `cmd`; on failure raise with the command and the last lines of its output."""
    shown = ["<shim>" if "\n" in str(c) else str(c) for c in cmd]      # the converter's shim is a script
    log(f"{what}: {' '.join(shown)}")
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(shown)}\n{tail}")
    return proc


# ----------------------------------------------------------------------------- llama.cpp build and files


def build_llamacpp(cache: Path, version: str) -> tuple[Path, Path]:
    """(vendored llama.cpp source, directory of llama-bench/llama-quantize), building them on first use."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = run(["bash", HERE / "build_llamacpp.sh", version, cache], "build llama.cpp (cached after the first run)",
               env=env)
    last = proc.stdout.strip().splitlines()[-1]
    fields = dict(part.split("=", 1) for part in last.split())
    return Path(fields["LLAMA_CPP_DIR"]), Path(fields["LLAMA_BIN_DIR"])


def checkpoint_key(config: DeepseekV3Config, seed: int) -> str:
    text = json.dumps(config.to_dict(), sort_keys=True, default=str) + f"seed={seed}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def make_checkpoint(directory: Path, config: DeepseekV3Config, seed: int) -> None:
    """The bf16 random-weight checkpoint llama.cpp and dsv3 both read (skipped when already complete)."""
    marker = directory / ".bench-complete"
    if marker.exists():
        return
    log(f"building the random bf16 checkpoint in {directory}")
    model = random_model(config, seed=seed)
    model.save_pretrained(directory)
    del model
    gc.collect()
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(scoring_func="sigmoid", topk_method="noaux_tc")   # else llama.cpp's converter routes with softmax
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_ASSETS / name, directory / name)
    marker.write_text(f"seed {seed}\n")


# The converter names a BPE pre-tokenizer by the hash of its output on a test string and refuses unknown ones;
# the tokenizer shipped with dsv3 uses DeepSeek-V3's pre-tokenizer regexes with a smaller vocabulary.
_CONVERT_SHIM = """
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "deepseek-v3"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def make_ggufs(src: Path, bin_dir: Path, checkpoint: Path, work: Path, types: list[str]) -> dict[str, Path]:
    """GGUF files of `checkpoint`: bf16 by the converter, the others by llama-quantize (cached by name)."""
    out = {t: work / f"bench-{t}.gguf" for t in types}
    bf16 = work / "bench-bf16.gguf"
    if not bf16.exists():
        tmp = bf16.with_suffix(".tmp")
        run([sys.executable, "-c", _CONVERT_SHIM, src, checkpoint, "--outtype", "bf16", "--outfile", tmp],
            "convert to GGUF bf16")
        tmp.rename(bf16)
    for t in types:
        if t != "bf16" and not out[t].exists():
            tmp = out[t].with_suffix(".tmp")
            run([bin_dir / "llama-quantize", *QUANTIZE_ARGS.get(t, []), bf16, tmp, t.upper().removesuffix("_H4"),
                 str(torch.get_num_threads())], f"quantise to {t}")
            tmp.rename(out[t])
    return out


def gguf_bytes_per_token(src: Path, path: Path, config: DeepseekV3Config) -> int:
    """Bytes of weights one decode token reads from a GGUF: every tensor but the routed experts and the token
    embedding, plus k/E of the routed expert tensors and one embedding row."""
    sys.path.insert(0, str(src / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(path)
    total = 0
    for t in reader.tensors:
        n = int(t.n_bytes)
        if "_exps." in t.name:                           # routed experts stacked: ffn_{gate,up,down}_exps
            n = round(n * expected_distinct_experts(config, 1) / config.n_routed_experts)
        elif t.name.startswith("token_embd."):
            n //= config.vocab_size
        total += n
    return total


def llama_bench(bin_dir: Path, model: Path, threads: int, reps: int, depths: list[int], gen: int, prompt: int,
                repack: list[int] | None) -> list[dict[str, Any]]:
    cmd = [bin_dir / "llama-bench", "-m", model, "-t", threads, "-p", prompt, "-n", gen,
           "-d", ",".join(map(str, depths)), "-r", reps, "-o", "json"]
    if repack:
        cmd += ["--repack", ",".join(map(str, repack))]
    proc = run(cmd, f"llama-bench {model.name}")
    return json.loads(proc.stdout)


def llama_rows(results: list[dict[str, Any]], gguf: str, bytes_per_token: int) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        kind = "prefill" if r["n_prompt"] > 0 else "decode"
        tokens = r["n_prompt"] if kind == "prefill" else r["n_gen"]
        repack = r.get("repack")
        config = "repack" if repack else "no repack" if repack is not None else ""
        rows.append(dict(engine="llama.cpp", precision=LLAMA_LABEL[gguf], gguf=gguf, config=config, kind=kind,
                         tokens=tokens, context=r["n_depth"], tok_s=r["avg_ts"], stddev=r["stddev_ts"],
                         samples=r.get("samples_ts"), bytes_per_token=bytes_per_token,
                         model_bytes=r.get("model_size")))
    return rows


# ----------------------------------------------------------------------------- dsv3


def load_dsv3(precision: str, bf16_dir: Path, fp8_dir: Path) -> DeepseekV3ForCausalLM:
    kwargs: dict[str, Any] = dict(torch_dtype=torch.bfloat16)
    if precision in ("int8", "int4", "int4+h4"):
        kwargs["quantization"] = precision.removesuffix("+h4")
    if precision == "int4+h4":
        kwargs["head_quantization"] = "int4"
    if precision.startswith("fp8"):
        kwargs["fp8"] = "keep"
    if precision == "fp8+int8":       # FP8 weights as stored; what the checkpoint holds in bf16 (the head) int8
        kwargs["quantization"] = "int8"
    return DeepseekV3ForCausalLM.from_pretrained(fp8_dir if precision.startswith("fp8") else bf16_dir, **kwargs)


def weight_bytes_per_token(model: DeepseekV3ForCausalLM) -> int:
    """Bytes of weights one batch-1 decode token reads from `model` as held (k routed experts per MoE layer)."""
    return decode_step_bytes(model, batch=1, context=0).weights


def measure_dsv3(model: DeepseekV3ForCausalLM, precision: str, config_name: str, args: argparse.Namespace,
                 compile: bool = False) -> list[dict[str, Any]]:
    """Decode rows at each context, and a prefill row unless `compile` (the compiled decode step — what
    `generate(compile=True)` runs — changes decode only)."""
    rows: list[dict[str, Any]] = []
    bytes_tok = weight_bytes_per_token(model)
    if compile:
        torch._dynamo.reset()   # graphs of the models measured before count toward dynamo's recompile limit
    step = DecodeStep(model, compile=compile)
    for context in args.contexts:
        log(f"dsv3 {precision} ({config_name}) decode ctx {context}")
        times, _, _ = decode_dsv3(model, step, 1, context, args.steps, args.budget_s, record_experts=False)
        if compile and step.compiled_calls == 0:
            raise RuntimeError(f"dsv3 {precision}: the decode step did not compile (see the log); no compiled rows")
        med = statistics.median(times)
        rows.append(dict(engine="dsv3", precision=precision, config=config_name, kind="decode", tokens=1,
                         context=context, tok_s=1 / med, steps=len(times), bytes_per_token=bytes_tok))
    if compile:
        return rows
    log(f"dsv3 {precision} ({config_name}) prefill {args.prefill}")
    times = prefill("dsv3", model, args.prefill, args.prefill_reps)
    med = statistics.median(times)
    rows.append(dict(engine="dsv3", precision=precision, config=config_name, kind="prefill", tokens=args.prefill,
                     context=0, tok_s=args.prefill / med, steps=len(times), bytes_per_token=bytes_tok))
    return rows


def run_dsv3(precision: str, bf16_dir: Path, fp8_dir: Path, args: argparse.Namespace,
             notes: list[str]) -> list[dict[str, Any]]:
    log(f"loading dsv3 {precision}")
    t = time.perf_counter()
    model = load_dsv3(precision, bf16_dir, fp8_dir)
    log(f"  loaded in {time.perf_counter() - t:.0f} s")
    rows = measure_dsv3(model, precision, "default", args)
    if not args.no_compiled:
        rows += measure_dsv3(model, precision, "compiled", args, compile=True)
    if args.no_kernels or precision not in args.kernel_rows:
        kernels, why_not = None, "--no-kernels" if args.no_kernels else f"--kernel-rows {' '.join(args.kernel_rows)}"
    else:
        kernels, why_not = kernels_module()
    enabled = False
    if kernels is not None:
        try:
            enabled = kernels.use_cpu_kernels(model)
        except Exception as e:  # noqa: BLE001 - a kernel build failure must not lose the other rows
            why_not = f"use_cpu_kernels failed on {precision}: {type(e).__name__}: {e}"
            kernels = None
        if enabled:
            rows += measure_dsv3(model, precision, "kernels", args)
        elif kernels is not None:
            why_not = "use_cpu_kernels(model) returned False on this machine"
    if not enabled:
        if not any(why_not in n for n in notes):
            notes.append(f"no dsv3 kernels rows: {why_not}")
    del model
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- report


def summarise(rows: list[dict[str, Any]], probes: dict[str, Any], config: DeepseekV3Config) -> None:
    """Adds ratio and roofline columns to every row in place."""
    bw, peak = probes["decode_roofline_gbs"], probes["gemm_peak_gflops"]

    def best(engine: str, precision: str, kind: str, context: int) -> dict[str, Any] | None:
        cands = [r for r in rows if r["engine"] == engine and r["precision"] == precision and r["kind"] == kind
                 and r["context"] == context]
        return max(cands, key=lambda r: r["tok_s"]) if cands else None

    for r in rows:
        depth = CONTEXT_TO_DEPTH.get(r["context"], r["context"]) if r["kind"] == "decode" else 0
        ctx = r["context"] if r["engine"] == "dsv3" else next(
            (c for c, d in CONTEXT_TO_DEPTH.items() if d == r["context"]), r["context"])
        base = best("dsv3", "bf16", r["kind"], ctx if r["kind"] == "decode" else 0)
        r["x_dsv3_bf16"] = r["tok_s"] / base["tok_s"] if base else None
        if r["engine"] == "dsv3":
            ref = best("llama.cpp", LLAMA_LABEL[MATCHING[r["precision"]]], r["kind"], depth)
            r["vs"] = ref["precision"] + (f" ({ref['config']})" if ref and ref["config"] else "") if ref else None
            r["x_llamacpp"] = r["tok_s"] / ref["tok_s"] if ref else None
        else:
            r["vs"], r["x_llamacpp"] = None, None
        if r["kind"] == "decode":
            r["gb_s"] = r["bytes_per_token"] * r["tok_s"] / 1e9
            r["pct_roofline"] = 100 * r["gb_s"] / bw
        else:
            flops = prefill_flops(config, 1, r["tokens"])
            r["gflop_s"] = flops / (r["tokens"] / r["tok_s"]) / 1e9
            r["pct_roofline"] = 100 * r["gflop_s"] / peak


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\nbench_llamacpp — shape {result['shape']}, {m['threads']} threads on {m['cores']} cores, "
          f"torch {m['torch']}, llama.cpp {result['llamacpp']['version']}")
    print(f"load average during the run: {result['load']}")
    print(format_probes(result["probes"]))
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"method: {result['method']}")
    rows = result["rows"]
    for kind in ("decode", "prefill"):
        print(f"\n{kind} ({'batch 1, tokens/s' if kind == 'decode' else 'batch 1, tokens/s'})")
        unit = "% BW" if kind == "decode" else "% peak"
        rate = "GB/s" if kind == "decode" else "GFLOP/s"
        print(f"{'engine':<10}{'precision':<10}{'config':<11}{'context':>8}{'tok/s':>9}{'low':>9}{'x bf16':>8}"
              f"{'x llama':>9}  {'vs':<21}{rate:>8}{unit:>8}{'MB/token':>10}")
        for r in rows:
            if r["kind"] != kind:
                continue
            rate_v = r.get("gb_s") if kind == "decode" else r.get("gflop_s")
            print(f"{r['engine']:<10}{r['precision']:<10}{r['config']:<11}{r['context']:>8}{r['tok_s']:>9.2f}"
                  f"{r['low']:>9.2f}{fmt(r['x_dsv3_bf16'], '.2f'):>8}{fmt(r['x_llamacpp'], '.2f'):>9}  "
                  f"{r['vs'] or '':<21}"
                  f"{fmt(rate_v, '.1f'):>8}{fmt(r['pct_roofline'], '.1f'):>8}{r['bytes_per_token'] / 1e6:>10.0f}")
    print(f"\ngoals: {GOALS}")
    for g in result["goals"]:
        met = {True: "yes", False: "NO", None: "—"}[g["met"]]
        print(f"  {g['goal']:<58}{fmt(g['value'], '.2f'):>8}  need {g['need']:<6g} met {met}")
    print(f"\npeak RSS of this process {result['rss_gb']:.2f} GB\n")


def goals(rows: list[dict[str, Any]], contexts: list[int]) -> list[dict[str, Any]]:
    out = []

    def best(engine: str, precision: str, kind: str, context: int) -> dict[str, Any] | None:
        cands = [r for r in rows if r["engine"] == engine and r["precision"] == precision and r["kind"] == kind
                 and r["context"] == context]
        return max(cands, key=lambda r: r["tok_s"]) if cands else None

    def add(name: str, value: float | None, need: float) -> None:
        out.append(dict(goal=name, value=value, need=need, met=None if value is None else value >= need))

    for prec, need in (("int8", 1.7), ("fp8", 1.6), ("fp8+int8", 1.6), ("int4", 2.7), ("int4+h4", 2.7)):
        for c in contexts:
            r = best("dsv3", prec, "decode", c)
            add(f"dsv3 {prec} / dsv3 bf16 decode ctx {c}", r and r["x_dsv3_bf16"], need)
    for prec in ("int8", "int4", "int4+h4"):
        for c in contexts:
            r = best("dsv3", prec, "decode", c)
            add(f"dsv3 {prec} / llama.cpp {LLAMA_LABEL[MATCHING[prec]]} decode ctx {c}", r and r["x_llamacpp"], 1.0)
    for c in contexts:      # the all-int4 model against llama.cpp's Q4_K_M as it ships (a 6-bit head)
        r, q = best("dsv3", "int4+h4", "decode", c), best("llama.cpp", "Q4_K_M", "decode", CONTEXT_TO_DEPTH.get(c, c))
        add(f"dsv3 int4+h4 / llama.cpp Q4_K_M decode ctx {c}", r and q and r["tok_s"] / q["tok_s"], 1.0)
    for prec in PRECISIONS:
        r = best("dsv3", prec, "prefill", 0)
        add(f"dsv3 {prec} / llama.cpp {LLAMA_LABEL[MATCHING[prec]]} prefill", r and r["x_llamacpp"], 1.0)
    r = best("dsv3", "bf16", "prefill", 0)
    add("dsv3 bf16 prefill: % of bf16 GEMM peak", r and r["pct_roofline"], 40.0)
    for prec in PRECISIONS:
        a, b = best("dsv3", prec, "decode", contexts[-1]), best("dsv3", prec, "decode", contexts[0])
        add(f"dsv3 {prec} decode ctx {contexts[-1]} / ctx {contexts[0]}",
            a["tok_s"] / b["tok_s"] if a and b else None, 0.9)
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cache = Path.home() / ".cache" / "dsv3-llamacpp"
    p.add_argument("--cache", type=Path, default=cache, help="where llama.cpp is built (per version)")
    p.add_argument("--workdir", type=Path, default=cache / "work", help="checkpoints and GGUF files (reused)")
    p.add_argument("--llama-version", default=LLAMA_VERSION, help="llama-cpp-python release to build from")
    p.add_argument("--llama-src", type=Path, help="a llama.cpp source tree (with convert_hf_to_gguf.py)")
    p.add_argument("--llama-bin", type=Path, help="a directory with llama-bench and llama-quantize")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 2048, 8192])
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--gen", type=int, default=64, help="llama-bench -n")
    p.add_argument("--prefill-depths", type=int, nargs="+", default=[0], help="llama-bench -d of its prefill runs")
    p.add_argument("--llama-reps", type=int, default=3, help="llama-bench -r")
    p.add_argument("--steps", type=int, default=16, help="timed dsv3 decode steps per context")
    p.add_argument("--budget-s", type=float, default=10.0, help="stop a dsv3 decode measurement after this long "
                   "once 3 steps ran")
    p.add_argument("--prefill-reps", type=int, default=5, help="timed dsv3 prefills (after an untimed one)")
    p.add_argument("--no-repack", action="store_true", help="llama.cpp with its default repack setting only")
    p.add_argument("--no-kernels", action="store_true", help="no dsv3 'kernels' rows")
    p.add_argument("--no-compiled", action="store_true",
                   help="no dsv3 'compiled' rows (decode through generate(compile=True)'s compiled step)")
    p.add_argument("--kernel-rows", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                   help="precisions that get a 'kernels' row beside the default one")
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--skip-dsv3", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer reps and steps (numbers noisier)")
    p.add_argument("--rounds", type=int, default=1, help="measure everything this many times, the engines in "
                   "turn, and keep each row's best (a host whose memory bandwidth drifts over minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="threads for both engines (default: torch's default)")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    p.add_argument("--tiny", action="store_true", help="a small model of the bench layout to check the script "
                   "(numbers meaningless)")
    args = p.parse_args(argv)
    if args.quick:
        args.llama_reps, args.steps, args.budget_s, args.prefill_reps = 1, 6, 5.0, 1
    return args


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    loads = [load_average()]
    config = bench_config(num_nextn_predict_layers=0, **(TINY if args.tiny else {}))
    log(f"load average {loads[0]}; probing bandwidth and GEMM peak ({threads} threads)")
    probes_start = machine_probes(config, threads, quick=args.quick)
    log(format_probes(probes_start))

    work = args.workdir / f"bench-{checkpoint_key(config, args.seed)}"
    bf16_dir, fp8_dir = work / "hf-bf16", work / "hf-fp8"
    make_checkpoint(bf16_dir, config, args.seed)
    if any(p.startswith("fp8") for p in args.precisions) and not (fp8_dir / "config.json").exists():
        log("writing the FP8 (128x128 blocks) copy of the checkpoint")
        write_fp8_checkpoint(bf16_dir, fp8_dir)

    notes: list[str] = [f"weights: random, seed {args.seed}, configs/bench.json without MTP "
                        f"({BENCH_CONFIG.name}); checkpoints and GGUFs in {work.name} under --workdir"]
    rows: list[dict[str, Any]] = []
    llama_info: dict[str, Any] = dict(version=f"llama-cpp-python {args.llama_version}")
    llama: tuple[Path, Path, list[str], dict[str, Path]] | None = None
    if not args.skip_llamacpp:
        if args.llama_src and args.llama_bin:
            src, bin_dir = args.llama_src, args.llama_bin
        else:
            src, bin_dir = build_llamacpp(args.cache, args.llama_version)
        commit = subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h"], capture_output=True,
                                text=True).stdout.strip()
        llama_info.update(src=str(src), commit=commit or "unknown")
        if commit:
            llama_info["version"] += f" (llama.cpp {commit})"
        types = sorted({MATCHING[p] for p in args.precisions}, key=GGUF_TYPES.index)
        llama = src, bin_dir, types, make_ggufs(src, bin_dir, bf16_dir, work, types)
    if not args.skip_dsv3:
        from dsv3.checkpoint.loader import load_pretrained

        auto = "kernels" in inspect.signature(load_pretrained).parameters
        notes.append("dsv3 'default' rows: from_pretrained as it loads by default (" + (
            "its kernels= argument left at its default" if auto else "no kernels= argument in this dsv3: stock "
            "PyTorch paths") + "), decoding eagerly as generate() does by default; 'compiled' rows: the same "
            "model through generate(compile=True)'s compiled decode step; 'kernels' rows: the same model after "
            "dsv3.kernels.use_cpu_kernels(model)")
    if args.rounds > 1:
        notes.append(f"{args.rounds} rounds, the engines in turn (llama.cpp first in even rounds, dsv3 first in odd "
                     "ones): each row is its best round; 'low' is its worst")
    for round_ in range(args.rounds):
        engines = ["llama.cpp", "dsv3"] if round_ % 2 == 0 else ["dsv3", "llama.cpp"]
        for engine in engines:
            if engine == "llama.cpp" and llama is not None:
                rows += [dict(r, round=round_) for r in run_llamacpp(*llama, config, threads, args, loads)]
            elif engine == "dsv3" and not args.skip_dsv3:
                for precision in args.precisions:
                    loads.append(load_average())
                    rows += [dict(r, round=round_) for r in run_dsv3(precision, bf16_dir, fp8_dir, args, notes)]
    rows = best_of_rounds(rows)

    loads.append(load_average())
    log("probing bandwidth and GEMM peak again")
    probes_end = machine_probes(config, threads, quick=args.quick)
    probes = best_probes(probes_start, probes_end)
    summarise(rows, probes, config)
    result = dict(
        bench="llamacpp", shape="tiny bench layout (--tiny)" if args.tiny else "bench (configs/bench.json, no MTP)",
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), threads=threads,
                     torch=torch.__version__),
        llamacpp=llama_info, load=" | ".join(loads), probes=probes, probes_start=probes_start, probes_end=probes_end,
        method=("llama.cpp: llama-bench -t {t} -p {p} -n 0 -d {pd} and -p 0 -n {n} -d {d}, -r {r} -o json (avg of "
                "its reps; Q8_0/Q4_K_M {rp}); dsv3: decode = median of up to {s} single-token steps "
                "after the latent cache is filled with random values for the context (context 128 vs llama.cpp "
                "depth 0), prefill = median of {pr} prefills of {p} tokens (after an untimed one) into a fresh static "
                "cache, logits of the last position. % BW = weight bytes per token x tok/s / best read bandwidth; "
                "% peak = prefill matmul FLOPs / s / best bf16 GEMM 2048^3; both probes run at start and end, best "
                "of either.").format(
            t=threads, p=args.prefill, n=args.gen, pd=",".join(map(str, args.prefill_depths)),
            d=",".join(str(CONTEXT_TO_DEPTH.get(c, c)) for c in args.contexts),
            r=args.llama_reps, s=args.steps, pr=args.prefill_reps,
            rp="at llama.cpp's default repack setting (--no-repack)" if args.no_repack else "with --repack 0,1"),
        notes=notes, rows=rows, goals=goals(rows, args.contexts), rss_gb=peak_rss_gb(),
    )
    print_report(result)
    line = json.dumps(rounded(result), separators=(",", ":"))
    if args.out:
        args.out.write_text(line + "\n")
    print(line, flush=True)
    return result


def run_llamacpp(src: Path, bin_dir: Path, types: list[str], ggufs: dict[str, Path], config: DeepseekV3Config,
                 threads: int, args: argparse.Namespace, loads: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for t in types:
        loads.append(load_average())
        repack = None if args.no_repack or t == "bf16" else [0, 1]
        # Two calls: prefill at the --prefill-depths (default 0 only: what the comparison uses), decode at
        # every context's depth (llama-bench fills each depth once and restores it for every rep).
        results = llama_bench(bin_dir, ggufs[t], threads, args.llama_reps, args.prefill_depths, 0, args.prefill,
                              repack)
        results += llama_bench(bin_dir, ggufs[t], threads, args.llama_reps, [CONTEXT_TO_DEPTH.get(c, c)
                               for c in args.contexts], args.gen, 0, repack)
        new_rows = llama_rows(results, t, gguf_bytes_per_token(src, ggufs[t], config))
        if repack is None:                       # llama.cpp's default (repack on where it has a layout)
            for r in new_rows:
                r["config"] = "default"
        rows += new_rows
        for r in new_rows:
            log(f"  llama.cpp {r['precision']} {r['config']} {r['kind']} d{r['context']}: {r['tok_s']:.2f} tok/s")
    return rows


def best_of_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per measurement (engine, precision, config, kind, context): its fastest round, with `low` (the
    slowest) and `rounds` (every round's tok/s, in order)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["engine"], r["precision"], r["config"], r["kind"], r["context"]), []).append(r)
    out = []
    for group in groups.values():
        best = dict(max(group, key=lambda r: r["tok_s"]))
        best.update(low=min(r["tok_s"] for r in group), rounds=[r["tok_s"] for r in group])
        out.append(best)
    return out


def best_probes(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The start and end probes merged: the best of either for every figure, medians from the start."""
    out = json.loads(json.dumps(a))
    for k, v in b["bandwidth_gbs"].items():
        out["bandwidth_gbs"][k]["best"] = max(v["best"], out["bandwidth_gbs"][k]["best"])
    for k, v in b["gemm_gflops"].items():
        out["gemm_gflops"][k]["best_gflops"] = max(v["best_gflops"], out["gemm_gflops"][k]["best_gflops"])
    out["decode_roofline_gbs"] = max(a["decode_roofline_gbs"], b["decode_roofline_gbs"])
    out["gemm_peak_gflops"] = max(a["gemm_peak_gflops"], b["gemm_peak_gflops"])
    out["decode_roofline_method"] += " (start and end of the run, best of either)"
    out["gemm_peak_method"] += " (start and end of the run, best of either)"
    return out


if __name__ == "__main__":
    main()
