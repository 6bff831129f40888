"""The `dsv3` command: thin subcommands that parse flags and call library functions.

    dsv3 generate "prompt"            stream a completion (or --chat for one chat turn), then tokens/s
    dsv3 chat                         interactive chat with history; /reset, /exit
    dsv3 convert SRC DST              FP8 -> bf16 and (re)sharding
    dsv3 train ...                    train with next-token + MTP losses and aux-loss-free balancing

Without --model, generate and chat use the model that ships with dsv3 (--preset tiny builds a
random tiny model instead, for smoke tests).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("dsv3")

SHIPPED_MODEL = Path(__file__).resolve().parent / "assets" / "dsv3-pystd"
KERNELS_MIN_HIDDEN = 1024


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint directory (config.json, *.safetensors, tokenizer files); default: shipped model")
    p.add_argument("--preset", choices=["tiny"], default=None,
                   help="instead of --model, a random-weight tiny model with the DeepSeek tokenizer (smoke tests)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (overrides generation_config.json)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cache", choices=["dynamic", "static"], default="static")
    p.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--kernels", choices=["auto", "on", "off"], default="auto",
                   help="C++ CPU decode kernels for bf16 weights (auto: when on CPU in bf16 and they build)")


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any]:
    from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
    from dsv3.tokenizer import AutoTokenizer, tokenizer_for_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preset == "tiny":
        if args.model is not None:
            raise SystemExit("error: pass either --model or --preset, not both")
        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained()
        model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny(vocab_size=129280)).eval()
        return model, tokenizer
    path = args.model or SHIPPED_MODEL
    if not (path / "config.json").is_file():
        hint = "pass --model DIR" if args.model else "the shipped model is missing; pass --model DIR or --preset tiny"
        raise SystemExit(f"error: {path} is not a checkpoint directory (no config.json); {hint}")
    model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=args.dtype, device_map=args.device)
    _maybe_use_kernels(model, args.kernels)
    tokenizer = tokenizer_for_model(path, model.config.vocab_size)   # falls back (with a warning) when it fits
    return model, tokenizer


def _maybe_use_kernels(model: Any, choice: str) -> None:
    from dsv3.kernels import use_cpu_kernels

    if choice == "off":
        return
    # auto: only where weight reads dominate a step (bf16 on the CPU, a model of real width); on small models
    # such as the shipped one the custom-op call overhead outweighs the bandwidth gained (benchmarks/).
    if choice == "auto" and (model.device.type != "cpu" or model.dtype != torch.bfloat16
                             or model.config.hidden_size < KERNELS_MIN_HIDDEN):
        return
    if not use_cpu_kernels(model) and choice == "on":
        raise SystemExit("error: --kernels on, but the CPU kernels cannot be built here (need AVX-512 and g++)")


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                  cache_implementation=args.cache, compile=args.compile)
    if args.greedy:
        kwargs["do_sample"] = False
    elif args.temperature is not None or args.top_p is not None or args.top_k is not None:
        kwargs["do_sample"] = True
    if args.seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(args.seed)
    return {k: v for k, v in kwargs.items() if v is not None}


def _stream(model: Any, tokenizer: Any, input_ids: torch.Tensor, args: argparse.Namespace,
            default_new_tokens: int) -> torch.Tensor:
    from dsv3.generation.generate import generate
    from dsv3.generation.streamer import TextStreamer

    kwargs = _generation_kwargs(args)
    if "max_new_tokens" not in kwargs:
        gc = getattr(model, "generation_config", None)
        if gc is None or gc.max_new_tokens is None:
            kwargs["max_new_tokens"] = default_new_tokens
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = generate(model, input_ids, **kwargs, streamer=streamer)
    elapsed = time.perf_counter() - start
    n = out.shape[1] - input_ids.shape[1]
    print(f"[{n} tokens in {elapsed:.2f} s, {n / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return out[0, input_ids.shape[1]:]


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=False)
    else:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        if input_ids.shape[1] == 0:
            raise SystemExit("error: the prompt is empty")
    if not args.no_echo and not args.chat:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    _stream(model, tokenizer, input_ids, args, default_new_tokens=64)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    print("dsv3 chat — /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history.clear()
            print("[history cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        input_ids = tokenizer.apply_chat_template(system + history, add_generation_prompt=True,
                                                  return_tensors="pt", return_dict=False)
        reply_ids = _stream(model, tokenizer, input_ids, args, default_new_tokens=256)
        history.append({"role": "assistant", "content": tokenizer.decode(reply_ids.tolist(), skip_special_tokens=True)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in PyTorch")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt (streamed), report tokens/s")
    g.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    g.add_argument("--system", default=None, help="system prompt (with --chat)")
    g.add_argument("--no-echo", action="store_true", help="do not print the prompt before the completion")
    _add_model_arguments(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with history (/reset, /exit)")
    c.add_argument("--system", default=None)
    _add_model_arguments(c)
    c.set_defaults(func=cmd_chat)

    from dsv3.checkpoint.convert import add_convert_arguments, run_convert
    from dsv3.training.trainer import add_train_arguments, run_train

    conv = sub.add_parser("convert", help="FP8 -> bf16 and (re)sharding of a checkpoint")
    add_convert_arguments(conv)
    conv.set_defaults(func=run_convert)
    t = sub.add_parser("train", help="train with next-token + MTP losses and aux-loss-free balancing")
    add_train_arguments(t)
    t.set_defaults(func=run_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
