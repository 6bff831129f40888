"""The `dsv3` command: thin subcommands that parse flags and call library functions.

    dsv3 generate "prompt"            stream a completion (or --chat for one chat turn), then tokens/s
    dsv3 chat                         interactive chat with history; /reset, /exit
    dsv3 convert SRC DST              FP8 -> bf16 and (re)sharding
    dsv3 train ...                    train with next-token + MTP losses and aux-loss-free balancing
    dsv3 serve                        OpenAI-compatible HTTP server (dsv3.serving)

Without --model, generate and chat use the model that ships with dsv3 (--preset tiny builds a
random tiny model instead, for smoke tests). `python -m dsv3 ...` runs the same command, also sharded:

    torchrun --nproc_per_node=N -m dsv3 generate "..."     (or chat; --nnodes/--node_rank/--rdzv-* for nodes)

loads the model split over the N processes (dsv3.parallel); rank 0 reads the input (the prompt, stdin, chat
lines) and hands it to the others, rank 0 alone prints, and the output is the same as one process's. A
sampling run without --seed draws one seed on rank 0 for all. A collective that waits longer than --timeout
(a rank died or hung) ends every rank with one line; in chat, Ctrl-C or a failed reply ends a sharded session
(the ranks cannot agree where they were stopped).

Failures end with one line on stderr, `error: ...`, and a non-zero exit code, never a traceback (-v adds
it for unexpected errors): 2 for bad input (flags, files, checkpoints, text that is not UTF-8), 1 for
an unexpected error, 130 for Ctrl-C (SIGINT), 141 when stdout is closed early (`dsv3 generate | head`).
In `dsv3 chat` an error or Ctrl-C during a reply ends that reply only: the prompt returns with the
history as it was, and when the history outgrows the context the oldest exchanges are dropped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from dsv3.parallel.context import SINGLE, ParallelContext
from dsv3.parallel.launch import ParallelError, peer_failure_message, start_parallel, stop_parallel

T = TypeVar("T")
logger = logging.getLogger("dsv3")

SHIPPED_MODEL = Path(__file__).resolve().parent / "assets" / "dsv3-pystd"


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
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.add_argument("--timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others in a collective before failing")
    _add_weight_arguments(p)


def _add_weight_arguments(p: argparse.ArgumentParser) -> None:
    """How the weights are held and computed with (generate, chat, serve): from_pretrained's arguments."""
    p.add_argument("--kernels", choices=["auto", "on", "off"], default="auto",
                   help="C++ CPU decode kernels for bf16, FP8 and int8/int4 weights (auto, as from_pretrained: on "
                        "the CPU, hidden size >= 1024 or quantised weights, where they build)")
    p.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="quantise linear and expert weights while loading (weight-only; int8 per channel, int4 "
                        "per group of 128 inputs); the LM head becomes int8 (see --head-quantization)")
    p.add_argument("--head-quantization", choices=["int8", "int4"], default=None,
                   help="with --quantization: the LM head's format (default int8; int4 reads fewer bytes per token "
                        "where the head is a large part of the model, at some cost in perplexity)")
    p.add_argument("--fp8", choices=["dequantize", "keep"], default="dequantize",
                   help="FP8 checkpoints: dequantise to --dtype while loading (default), or keep the FP8 bytes and "
                        "compute with them as stored (half the memory; with --quantization only the non-FP8 "
                        "weights, DeepSeek's bf16 head, are quantised)")


def weight_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """from_pretrained keywords of _add_weight_arguments' flags."""
    return dict(kernels=args.kernels, quantization=args.quantization, head_quantization=args.head_quantization,
                fp8=args.fp8)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    from dsv3.training.trainer import positive_int as parse

    return parse(text)


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def _check_json_object(path: Path) -> None:
    """A JSON file the loader will read must hold an object ({...}); name the file otherwise."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a JSON file")
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected an object {{...}}; fix or replace "
                         "the file")


INPUT_WAIT = datetime.timedelta(days=7)
"""How long the other ranks wait for rank 0's next input: a person typing is no failure (collectives keep
--timeout; a rank 0 that dies takes its launcher's store down or is killed with its peers, ending the wait)."""


class FollowerExit(Exception):
    """On ranks other than 0: rank 0 failed on input only it sees (and said why); exit quietly with `code`."""

    def __init__(self, code: int) -> None:
        super().__init__(f"rank 0 failed (exit code {code})")
        self.code = code


@dataclass
class Run:
    """Where this process stands in a command that may run sharded under torchrun."""

    ctx: ParallelContext = SINGLE
    device: torch.device | None = None            # None: the --device flag decides (one process)
    store: Any = None                              # the process group's key-value store: rank 0's input
    timeout: datetime.timedelta = field(default_factory=lambda: datetime.timedelta(minutes=10))
    shared: int = 0                                # objects shared so far (their keys in the store)

    @property
    def first(self) -> bool:
        return self.ctx.is_first

    def share(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (pickled; the identity in one process). It travels through the process
        group's key-value store, not a collective: rank 0 never waits for the others (a hung rank then stops
        the next collective after --timeout), and the others may wait INPUT_WAIT for a person to type."""
        if not self.ctx.is_parallel:
            return obj
        import pickle

        key = f"dsv3/cli/input/{self.shared}"
        self.shared += 1
        if self.first:
            self.store.set(key, pickle.dumps(obj))
            return obj
        self.store.wait([key], INPUT_WAIT)
        return pickle.loads(self.store.get(key))

    def from_first(self, read: Callable[[], T]) -> T:
        """`read()` on rank 0 only (stdin, the terminal), its result on every rank. When it fails, rank 0
        raises its error and the other ranks FollowerExit (they never wait for input that is not coming)."""
        if not self.ctx.is_parallel:
            return read()
        value, error = None, None
        if self.first:
            try:
                value = read()
            except BaseException as e:   # re-raised below, after the others were told to stop
                error = e
        value, failed = self.share((value, error is not None))
        if error is not None:
            raise error
        if failed:
            raise FollowerExit(2)
        return value


def run_sharded(args: argparse.Namespace, body: Callable[[Run], int]) -> int:
    """Run `body` in one process, or, under torchrun, as one rank of a sharded run: start the process group,
    turn a collective that lost its peers into ParallelError, destroy the group at the end."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=args.timeout)
    owns_group = not (dist.is_available() and dist.is_initialized())
    started = start_parallel(args.device, None, timeout)
    if started is None:
        return body(Run(timeout=timeout))
    ctx, device = started
    args.rank_label = f"[rank {ctx.rank}/{ctx.world_size}] "
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return body(Run(ctx, device, _get_default_store(), timeout))
    except SystemExit as e:   # a flag error every rank finds alike: rank 0 says it
        if not ctx.is_first:
            raise FollowerExit(e.code if isinstance(e.code, int) else 2) from None
        raise
    except RuntimeError as e:
        message = None if isinstance(e, ParallelError) else peer_failure_message(e, ctx, timeout)
        if message is not None:
            raise ParallelError(message) from e
        raise
    finally:
        if owns_group:
            stop_parallel()


def load_model_and_tokenizer(args: argparse.Namespace, run: Run | None = None) -> tuple[Any, Any]:
    from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
    from dsv3.kernels import select_kernels
    from dsv3.tokenizer import AutoTokenizer, tokenizer_for_model

    run = run or Run()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preset == "tiny":
        if args.model is not None:
            raise SystemExit("error: pass either --model or --preset, not both")
        for flag, value, default in (("--quantization", args.quantization, None),
                                     ("--head-quantization", args.head_quantization, None), ("--fp8", args.fp8,
                                                                                            "dequantize")):
            if value != default:
                raise SystemExit(f"error: {flag} applies while loading a checkpoint; drop it with --preset tiny")
        torch.manual_seed(0)   # the same random weights on every rank, then each keeps its shard
        tokenizer = AutoTokenizer.from_pretrained()
        model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny(vocab_size=129280)).eval()
        if run.ctx.is_parallel:
            from dsv3.model.parallel import shard_model

            shard_model(model, run.ctx)
        select_kernels(model, args.kernels)       # from_pretrained's rule (a tiny model keeps the stock ops)
        return model, tokenizer
    path = args.model or SHIPPED_MODEL
    if not (path / "config.json").is_file():
        hint = "pass --model DIR" if args.model else "the shipped model is missing; pass --model DIR or --preset tiny"
        raise SystemExit(f"error: {path} is not a checkpoint directory (no config.json); {hint}")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        _check_json_object(path / name)
    sharded = dict(device_map=run.device, parallel=run.ctx) if run.ctx.is_parallel else dict(device_map=args.device)
    model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=args.dtype, **weight_kwargs(args), **sharded)
    tokenizer = tokenizer_for_model(path, model.config.vocab_size)   # falls back (with a warning) when it fits
    return model, tokenizer


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
            default_new_tokens: int, run: Run | None = None) -> torch.Tensor:
    """Generate from `input_ids` [1, T]; rank 0 streams the text to stdout and the speed to stderr, the
    other ranks compute the same tokens silently. Returns the new token ids [N]."""
    from dsv3.generation.generate import generate
    from dsv3.generation.streamer import TextStreamer

    kwargs = _generation_kwargs(args)
    if "max_new_tokens" not in kwargs:
        gc = getattr(model, "generation_config", None)
        if gc is None or gc.max_new_tokens is None:
            kwargs["max_new_tokens"] = default_new_tokens
    first = run is None or run.first
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if first else None
    start = time.perf_counter()
    out = generate(model, input_ids, **kwargs, streamer=streamer)
    elapsed = time.perf_counter() - start
    n = out.shape[1] - input_ids.shape[1]
    if first:
        print(f"[{n} tokens in {elapsed:.2f} s, {n / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return out[0, input_ids.shape[1]:]


def _utf8_text(text: str, what: str) -> str:
    """`text` from argv or a text stream: undecodable bytes arrive as surrogates (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise ValueError(f"{what} is not valid UTF-8 ({byte} at position {e.start}); pass UTF-8 text") from None
    return text


def _decode_utf8(data: bytes | str, what: str) -> str:
    if isinstance(data, str):
        return _utf8_text(data, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "pass UTF-8 text") from None


def _stdin() -> Any:
    if sys.stdin is None:
        raise ValueError("stdin is closed; pass the prompt as an argument or open stdin")
    return sys.stdin


def _read_stdin() -> str:
    """All of stdin as UTF-8 text."""
    stream = _stdin()
    try:
        data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
    except OSError as e:
        raise ValueError(f"cannot read the prompt from stdin ({e.strerror or e})") from None
    return _decode_utf8(data, "stdin")


def _read_line() -> str | None:
    """One line of stdin as UTF-8 text, or None at the end of input."""
    stream = _stdin()
    try:
        data = stream.buffer.readline() if hasattr(stream, "buffer") else stream.readline()
    except OSError as e:
        raise ValueError(f"cannot read from stdin ({e.strerror or e})") from None
    return _decode_utf8(data, "the input line") if data else None


def _check_stdout() -> None:
    if sys.stdout is None:
        raise ValueError("stdout is closed; nowhere to write the reply (redirect it to a file or /dev/null)")


def _shared_seed(args: argparse.Namespace, run: Run) -> None:
    """Sharded and no --seed: rank 0 draws one for all ranks, so that sampling picks the same tokens on each."""
    if run.ctx.is_parallel and args.seed is None:
        args.seed = run.share(int.from_bytes(os.urandom(8), "little") >> 1 if run.first else None)


def cmd_generate(args: argparse.Namespace) -> int:
    return run_sharded(args, lambda run: _generate(args, run))


def _generate(args: argparse.Namespace, run: Run) -> int:
    def read_prompt() -> str:
        _check_stdout()
        return _utf8_text(args.prompt, "the prompt") if args.prompt is not None else _read_stdin()

    prompt = run.from_first(read_prompt)
    _shared_seed(args, run)
    model, tokenizer = load_model_and_tokenizer(args, run)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=False)
    else:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        if input_ids.shape[1] == 0:
            raise SystemExit("error: the prompt is empty")
    if not args.no_echo and not args.chat and run.first:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    _stream(model, tokenizer, input_ids, args, default_new_tokens=64, run=run)
    return 0


CHAT_NEW_TOKENS = 256


def _max_new_tokens(model: Any, args: argparse.Namespace, default: int) -> int:
    """The max_new_tokens a reply gets: --max-new-tokens, else generation_config.json's, else `default`."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    gc = getattr(model, "generation_config", None)
    return gc.max_new_tokens if gc is not None and gc.max_new_tokens is not None else default


def chat_input_ids(tokenizer: Any, system: list[dict[str, str]], history: list[dict[str, str]],
                   max_prompt_tokens: int, report: bool = True) -> torch.Tensor:
    """The chat prompt [1, T] for system + history, T <= max_prompt_tokens: the oldest exchanges (user +
    assistant) are removed from `history` until it fits (said on stderr). Raises ValueError, history
    untouched, when the last message alone does not fit."""
    def render(turns: list[dict[str, str]]) -> torch.Tensor:
        return tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=False)

    alone = render(history[-1:])
    if alone.shape[1] > max_prompt_tokens:
        raise ValueError(f"the message is {alone.shape[1]} tokens with the chat template, more than the "
                         f"{max_prompt_tokens} the context leaves for a prompt; shorten it (or lower "
                         "--max-new-tokens)")
    dropped = 0
    while True:
        ids = render(history)
        if ids.shape[1] <= max_prompt_tokens or len(history) <= 1:
            break
        del history[:2]   # history alternates user, assistant, ..., user: drop the oldest exchange
        dropped += 1
    if dropped and report:
        print(f"[context full: dropped the {dropped} oldest exchange(s) from the history]", file=sys.stderr)
    return ids


def cmd_chat(args: argparse.Namespace) -> int:
    return run_sharded(args, lambda run: _chat(args, run))


def _chat(args: argparse.Namespace, run: Run) -> int:
    """The chat loop. Sharded, rank 0 reads each line (bad lines are said and skipped there) and hands it to
    the others; every rank keeps the same history; only rank 0 writes."""
    def check_streams() -> bool:
        _check_stdout()
        _stdin()
        return sys.stdin.isatty()

    interactive = run.from_first(check_streams)
    _shared_seed(args, run)
    model, tokenizer = load_model_and_tokenizer(args, run)
    system = [{"role": "system", "content": _utf8_text(args.system, "--system")}] if args.system else []
    history: list[dict[str, str]] = []
    context = model.config.max_context_length
    max_prompt = max(1, context - _max_new_tokens(model, args, CHAT_NEW_TOKENS))
    failed = False

    def say(text: str) -> None:
        if run.first:
            print(text, file=sys.stderr)

    def next_line() -> str | None:   # rank 0: the next decodable line of stdin, None at its end
        nonlocal failed
        while True:
            if interactive:
                print(">>> ", end="", flush=True, file=sys.stderr)
            try:
                return _read_line()
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                failed = True

    say("dsv3 chat — /reset clears the history, /exit quits; Ctrl-C stops a reply")
    while True:
        line = run.from_first(next_line)
        if line is None:
            return 1 if failed else 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 1 if failed else 0
        if text == "/reset":
            history.clear()
            say("[history cleared]")
            continue
        kept = list(history)
        history.append({"role": "user", "content": text})
        try:
            input_ids = chat_input_ids(tokenizer, system, history, max_prompt, report=run.first)
        except ValueError as e:   # the same on every rank: this message cannot be answered; the chat goes on
            history[:] = kept
            say(f"error: {_one_line(e)}")
            failed = True
            continue
        try:
            reply_ids = _stream(model, tokenizer, input_ids, args, default_new_tokens=CHAT_NEW_TOKENS, run=run)
        except KeyboardInterrupt:
            if run.ctx.is_parallel:   # the ranks may have stopped at different steps: end the session
                raise
            history[:] = kept
            print("", flush=True)
            print("[interrupted: reply discarded, history kept]", file=sys.stderr)
            continue
        except (ValueError, TypeError, RuntimeError) as e:   # this reply failed; the chat goes on (one process)
            if run.ctx.is_parallel:
                raise
            history[:] = kept
            print(f"error: {_one_line(e)}", file=sys.stderr)
            failed = True
            continue
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
    s = sub.add_parser("serve", help="OpenAI-compatible server (continuous batching, paged latent cache)")
    s.add_argument("--model", type=Path, default=None, help="checkpoint directory; default: the shipped model")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    s.add_argument("--device", default="auto")
    s.add_argument("--max-batch", type=positive_int, default=32, help="most sequences in the running batch")
    s.add_argument("--max-queue", type=int, default=256, help="most waiting requests; more get 429")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument("--served-model-name", default=None, help="the model id clients name (default: the directory)")
    s.add_argument("--block-size", type=positive_int, default=16, help="tokens per latent-cache block")
    s.add_argument("--num-blocks", type=positive_int, default=None,
                   help="cache blocks (default: max-batch full contexts)")
    s.add_argument("--token-budget", type=positive_int, default=256, help="tokens per engine step (prefill chunks)")
    s.add_argument("--no-prefix-caching", action="store_true")
    s.add_argument("--speculative", choices=["mtp"], default=None,
                   help="MTP speculative decoding for greedy requests (needs a checkpoint with an MTP layer)")
    _add_weight_arguments(s)
    s.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from dsv3.serving.server import serve

    serve(args.model or SHIPPED_MODEL, host=args.host, port=args.port, dtype=args.dtype, device=args.device,
          max_batch=args.max_batch, max_queue=args.max_queue, api_key=args.api_key,
          served_model_name=args.served_model_name or ("dsv3-pystd" if args.model is None else None),
          block_size=args.block_size, num_blocks=args.num_blocks, token_budget=args.token_budget,
          prefix_caching=not args.no_prefix_caching, speculative=args.speculative,
          log_level="info" if args.verbose else "warning", weights=weight_kwargs(args))
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _report(message: str, args: argparse.Namespace | None = None) -> None:
    """`error: ...` on stderr; in a sharded run prefixed with the rank (`[rank 1/2]`), since any rank may fail."""
    label = getattr(args, "rank_label", "")
    try:
        print(f"error: {label}{message}", file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):   # stderr closed too: the exit code is all that is left
        pass


def _detach_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the dsv3 command line; returns the exit code (argparse exits 2 on bad flags)."""
    verbose = False
    args = argparse.Namespace()
    try:
        args = build_parser().parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        return int(args.func(args) or 0)
    except FollowerExit as e:   # rank 0 said what went wrong
        return e.code
    except KeyboardInterrupt:
        _report("interrupted (Ctrl-C)", args)
        return 130
    except ParallelError as e:   # could not start or lost a rank: the message names the rank, why and what to do
        if verbose:
            logger.exception("details")
        _report(_one_line(e))
        return 1
    except BrokenPipeError:
        _detach_stdout()
        _report("the output was closed before the command finished (broken pipe)", args)
        return 141
    except (ValueError, TypeError, KeyError, OSError) as e:   # bad input: flags, files, checkpoints, text
        if verbose:
            logger.exception("details")
        _report(_one_line(e), args)
        return 2
    except Exception as e:   # the command-line boundary: one line, never a traceback (-v logs it)
        if verbose:
            logger.exception("details")
        _report(f"{type(e).__name__}: {_one_line(e)} (run with -v for the traceback)", args)
        return 1


if __name__ == "__main__":
    sys.exit(main())
