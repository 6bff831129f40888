"""Decode tokens/s on the shipped model (dsv3/assets/dsv3-pystd) at batch 1: int8 weights with MTP speculation
against bf16 plain greedy decoding — the figure issue 12 asks for — with the two other corners (bf16 + MTP,
int8 plain) and int4, all in one process on the same prompts.

Each row generates `--new-tokens` greedy tokens (no EOS stop) for each held-out prompt, batch 1, through the
library's `generate` (`--kernels auto`, default: the path `from_pretrained` + `generate` gives a library user, the
stock PyTorch ops on this small model; `--kernels on`: the CPU kernels); the time of
the best of `--repeats` runs per prompt is summed (a warm-up run first). MTP rows report the draft acceptance
and the main-model forwards per token; their greedy output is checked equal to the same weights' plain output.

    python benchmarks/bench_quant_mtp.py                 # 8 prompts x 64 tokens, best of 3 (~2 min, 2 cores)

The human table goes to stdout, progress to stderr, and the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3 import DeepseekV3ForCausalLM  # noqa: E402
from dsv3.cli import SHIPPED_MODEL  # noqa: E402
from dsv3.generation.generate import generate  # noqa: E402
from dsv3.tokenizer import AutoTokenizer  # noqa: E402
from recipes import pystd  # noqa: E402

log = logging.getLogger("bench_quant_mtp")
ROWS = (("bf16", None, False), ("bf16", None, True), ("int8", "int8", False), ("int8", "int8", True),
        ("int4", "int4", False), ("int4", "int4", True))


def run(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, mtp: bool, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` greedy generations, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = generate(model, ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], use_mtp=mtp,
                       return_dict_in_generate=True)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts (default 8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N per prompt (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                        help="from_pretrained's kernels= (default auto: what a library user gets)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    _, held_files = pystd.split_files(pystd.stdlib_files())
    prompts = pystd.held_out_prompts(pystd.read_texts(held_files), args.prompts)
    encoded = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
    models = {q: DeepseekV3ForCausalLM.from_pretrained(SHIPPED_MODEL, torch_dtype=torch.bfloat16, quantization=q,
                                                       kernels=args.kernels)
              for q in (None, "int8", "int4")}
    path = {q: "stock PyTorch ops" if m.kernels is None else "CPU kernels" for q, m in models.items()}

    results = []
    plain_sequences: dict[str, list[torch.Tensor]] = {}
    for name, quantization, mtp in ROWS:
        model = models[quantization]
        log.info("%s%s: %d prompts x %d tokens", name, " + MTP" if mtp else "", len(encoded), args.new_tokens)
        run(model, encoded[0], 8, mtp, 1)                                     # warm-up
        seconds, tokens, drafts, accepted, forwards, identical = 0.0, 0, 0, 0, 0, True
        for i, ids in enumerate(encoded):
            t, out = run(model, ids, args.new_tokens, mtp, args.repeats)
            seconds += t
            tokens += out.new_tokens
            if mtp:
                stats = out.speculative
                drafts, accepted = drafts + stats.drafts, accepted + stats.accepted
                forwards += stats.main_forwards
                identical &= torch.equal(out.sequences, plain_sequences[name][i])
            else:
                plain_sequences.setdefault(name, []).append(out.sequences)
                forwards += out.new_tokens
        results.append({"weights": name, "mtp": mtp, "tokens": tokens, "seconds": seconds,
                        "tokens_per_s": tokens / seconds, "acceptance": accepted / drafts if drafts else None,
                        "main_forwards_per_token": forwards / tokens, "same_as_plain": identical if mtp else None})

    base = next(r for r in results if r["weights"] == "bf16" and not r["mtp"])["tokens_per_s"]
    print(f"\nShipped model ({SHIPPED_MODEL.name}), batch 1, {len(encoded)} held-out prompts x {args.new_tokens} "
          f"greedy tokens, best of {args.repeats}, {torch.get_num_threads()} threads, kernels={args.kernels!r} "
          f"(bf16: {path[None]}, int8: {path['int8']}, int4: {path['int4']})")
    print(f"{'weights':<8}{'MTP':<6}{'tokens/s':>10}{'vs bf16 plain':>15}{'acceptance':>12}{'fwd/token':>11}"
          f"{'= plain':>9}")
    for r in results:
        r["vs_bf16_plain"] = r["tokens_per_s"] / base
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        same = "" if r["same_as_plain"] is None else ("yes" if r["same_as_plain"] else "NO")
        print(f"{r['weights']:<8}{'yes' if r['mtp'] else 'no':<6}{r['tokens_per_s']:>10.1f}{r['vs_bf16_plain']:>14.2f}x"
              f"{acc:>12}{r['main_forwards_per_token']:>11.2f}{same:>9}")
    headline = next(r for r in results if r["weights"] == "int8" and r["mtp"])["vs_bf16_plain"]
    print(f"int8 + MTP vs bf16 plain: {headline:.2f}x")
    print(json.dumps({"benchmark": "quant_mtp", "model": SHIPPED_MODEL.name, "batch": 1, "prompts": len(encoded),
                      "new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "kernels": args.kernels,
                      "paths": {str(q): v for q, v in path.items()},
                      "int8_mtp_vs_bf16_plain": headline, "rows": results}))


if __name__ == "__main__":
    main()
