"""`generate()`: prefill with the expanded MLA path, then decode one token at a time over the latent
cache with the absorbed path, optionally as one compiled graph.

The loop keeps everything on the device: the next token, the finished flags and the repetition
"seen" mask are tensors, and the only host read per step is the stop check (`finished.all()`),
plus the streamer's copy when one is attached. Left-padded batches keep one shared write position
in the cache; padding positions stay masked for the whole generation.

Argument names and defaults follow transformers' `generate` (max_length 20 when neither length is
given, pad_token_id falling back to the first eos id, a generation_config.json read from the
checkpoint directory and overridden by explicit arguments). As in transformers 5.23:
- max_new_tokens wins over max_length (with transformers' warning when both are set);
- min_new_tokens / min_length ban the eos ids until enough tokens exist (min_length counts the padded
  prompt), no_repeat_ngram_size bans tokens that would repeat an n-gram of the row (padding included);
  both act after the repetition penalty and before the sampling warpers (`sampling.process_logits`);
- num_return_sequences (sampling only) repeats each prompt n times, copies adjacent;
- stop_strings (with tokenizer=) stop a row when a stop string overlaps its last token;
- output_scores / output_logits with return_dict_in_generate: one fp32 [B, V] tensor per step,
  processed / raw;
- without attention_mask, a pad_token_id that is set, present and not an eos id gives the mask
  `ids != pad`; a batch whose mask cannot be inferred gets transformers' warning.
Sampling below `MIN_SAMPLING_TEMPERATURE` decodes greedily (logged); beam search is not implemented.
"""

from __future__ import annotations

import json
import logging
import os
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv3.cache import DynamicLatentCache, LatentCache, StaticLatentCache
from dsv3.generation import step_guards
from dsv3.generation.sampling import (
    MIN_SAMPLING_TEMPERATURE,
    SamplingParams,
    no_repeat_ngram_mask,
    pick_next_token,
    process_logits,
    seen_mask,
    update_seen_mask,
)
from dsv3.model.attention import MultiHeadLatentAttention
from dsv3.parallel.context import SINGLE

logger = logging.getLogger(__name__)

CACHE_IMPLEMENTATIONS = ("dynamic", "static")
_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclass
class GenerationConfig:
    """The generation_config.json keys dsv3 reads; unknown keys are kept in `extra`."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int | None = None
    min_length: int | None = None
    no_repeat_ngram_size: int | None = None
    num_return_sequences: int | None = None
    num_beams: int | None = None
    stop_strings: str | list[str] | None = None
    output_scores: bool | None = None
    output_logits: bool | None = None
    return_dict_in_generate: bool | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        names = set(cls.__dataclass_fields__) - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GenerationConfig | None:
        path = Path(directory) / "generation_config.json"
        if path.is_dir():
            raise ValueError(f"{path} is a directory; expected a JSON file of generation settings (or none)")
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); fix or delete the file") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: holds a JSON {type(data).__name__}, expected an object such as "
                             '{"max_new_tokens": 64}; fix or delete the file')
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}


def _as_id_list(value: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def make_cache(model: torch.nn.Module, kind: str, batch_size: int, max_len: int) -> LatentCache:
    """A latent cache with a slot for every attention layer of the model (MTP layers included)."""
    if kind not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation={kind!r}: expected one of {CACHE_IMPLEMENTATIONS}")
    config = model.config
    num_layers = getattr(model, "num_cache_layers", config.num_hidden_layers)
    if kind == "dynamic":
        return DynamicLatentCache(num_layers)
    return StaticLatentCache(config, batch_size, max_len, dtype=model.dtype, device=model.device,
                             num_layers=num_layers)


def compile_options(model: torch.nn.Module, sharded: bool) -> dict[str, Any]:
    """Inductor options for a CPU decode step (none elsewhere).

    - "cpp_wrapper": the C++ wrapper calls the step's ~100 kernels without a Python line each: decode 4 % faster
      on the bench shape (int4, 23.5 -> 22.5 ms, steps interleaved with the Python wrapper's), compile time level
      (~45 s cold). Not for a sharded model: it cannot call the functional collectives ("arg type Any is not
      yet supported by custom_op_wrapper").
    - "cpp.threads": 1 where every MLA layer runs the one-pass decode kernel (CpuKernels.latent_decode): then
      the graph's own kernels are only the glue around the weight products (norms, RoPE, routing, the MoE
      combine — [batch, hidden]-sized), and an OpenMP fork/join per kernel (inductor parallelises any kernel
      of ≥ 1024 values, ~50 per step) cost more than it bought: int4 on the bench shape 25.9 -> 24.8 ms per
      step (steps interleaved). The weight and attention kernels keep torch's threads (at::parallel_for). A step
      the kernel does not take (a padded batch, rows at their own slots, more than 8 tokens) runs its attention
      as matmuls inside the graph, single-threaded.
    """
    if model.device.type != "cpu" or sharded:
        return {}
    options: dict[str, Any] = {"cpp_wrapper": True}
    layers = [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)]
    if layers and all(getattr(m.kernels, "attention", False) for m in layers):
        options["cpp.threads"] = 1
    return options


class DecodeStep:
    """One decode step (new tokens [B, S] -> last-position logits [B, V]), eager or compiled.

    Compilation uses `torch.compile(fullgraph=True, dynamic=True)`: the cache length is a symbolic
    int, so one graph serves every step. `moe_dispatch` is passed to the model; "auto" under compile
    picks "gather" when the weights are not bf16, because torch's grouped_mm has only a bf16 fake
    kernel and cannot be traced in fp32/fp16. Only the compile failures named in
    `COMPILE_FAILURES` (a graph break under fullgraph, a backend that cannot build the graph) fall
    back to eager, once and logged; any other error is raised. `compiled_calls` counts the steps
    the compiled graph ran, so callers and tests can tell which path produced the tokens.

    With `model_guards="per_call"` (the default) dynamo's guards on the model and on module globals are checked
    once, when the step is built (once per `generate` call), and dynamo checks only the guards on the step's
    inputs and cache before each step (`step_guards`; `step_code` is then set). "per_step" leaves every guard
    to dynamo, for a model that changes while it decodes.
    """

    # Graph break under fullgraph=True; backend (inductor/C++ toolchain) failure; dynamo's recompile limit
    # (compiled graphs are cached per code object, so a long-lived process that decodes many batch sizes and
    # context ranges can exhaust it: under fullgraph=True that is a hard error, not a silent eager fallback).
    COMPILE_FAILURES: tuple[type[Exception], ...] = (torch._dynamo.exc.Unsupported,
                                                     torch._dynamo.exc.BackendCompilerFailed,
                                                     torch._dynamo.exc.FailOnRecompileLimitHit)

    def __init__(self, model: torch.nn.Module, compile: bool = False, moe_dispatch: str = "auto",
                 model_guards: str = "per_call") -> None:
        if model_guards not in ("per_call", "per_step"):
            raise ValueError(f"model_guards={model_guards!r} is invalid: pass 'per_call' (dynamo's guards on the "
                             "model checked when the step is built) or 'per_step' (dynamo checks them every step)")
        self.model = model
        self.model_guards = model_guards
        self.moe_dispatch = moe_dispatch
        self._fn: Callable[..., torch.Tensor] = self._eager
        self.compiled = False
        self.compiled_calls = 0
        self.compile_options: dict[str, Any] = {}
        self.step_code: step_guards.StepCode | None = None   # set when the model's guards are checked per call
        if compile:
            if moe_dispatch == "auto" and model.dtype != torch.bfloat16:
                self.moe_dispatch = "gather"
                logger.info("compiled decode step: moe_dispatch='gather' (grouped_mm traces only in bf16, the "
                            "model is %s)", model.dtype)
            sharded = any(getattr(m, "parallel", SINGLE).is_parallel for m in model.modules())
            self.compile_options = compile_options(model, sharded)
            self._fn = self._compile()
            self.compiled = True

    def _compile(self) -> Callable[..., torch.Tensor]:
        """torch.compile of the step; the guards on the model are checked here, not per step (see step_guards)."""
        if self.model_guards == "per_step" or not step_guards.available():
            if self.model_guards == "per_call":
                logger.info("compiled decode step: this torch (%s) cannot take guards over from dynamo; it checks "
                            "all of them before every step", torch.__version__)
            return torch.compile(self._eager, fullgraph=True, dynamic=True, options=self.compile_options or None)
        key = (self.moe_dispatch, tuple(sorted(self.compile_options.items())))
        self.step_code = step_guards.step_code(self.model, key, DecodeStep._eager, self)
        return torch.compile(types.MethodType(self.step_code.function, self), fullgraph=True, dynamic=True,
                             options={**self.compile_options, "guard_filter_fn": self.step_code.guard_filter(self)})

    def _eager(self, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        out = self.model(ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1, check_inputs=False, moe_dispatch=self.moe_dispatch)
        return out.logits[:, -1]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not self.compiled:
            return self._eager(ids, positions, cache, attention_mask)
        length = cache.get_seq_length()
        try:
            logits = self._fn(ids, positions, cache, attention_mask)
        except self.COMPILE_FAILURES as e:
            logger.warning("compiled decode step failed to compile (%s: %s); continuing in eager mode",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            cache.crop(length)
            self._fn, self.compiled = self._eager, False
            return self._eager(ids, positions, cache, attention_mask)
        self.compiled_calls += 1
        return logits


@dataclass
class GenerationOptions:
    """Everything `generate()` resolved from generation_config + explicit arguments (transformers' names)."""

    sampling: SamplingParams
    max_new_tokens: int
    eos_token_ids: list[int]
    pad_token_id: int
    pad_token_id_set: bool          # pad_token_id came from an argument or a config (not the eos fallback)
    min_new_tokens: int = 0         # eos is banned while fewer new tokens exist (MinLength/MinNewTokens)
    num_return_sequences: int = 1
    no_repeat_ngram_size: int = 0
    stop_strings: list[str] = field(default_factory=list)
    output_scores: bool = False
    output_logits: bool = False
    return_dict_in_generate: bool = False


def _non_negative_int(name: str, value: Any, fix: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid: it must be a non-negative integer ({fix})")
    return value


def _flag(name: str, value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError(f"{name}={value!r} is invalid: pass True or False")
    return value


def _stop_strings(value: Any) -> list[str]:
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(x, str) and x for x in strings):
        raise ValueError(f"stop_strings={value!r} is invalid: pass a non-empty string or a list of non-empty strings")
    return list(strings)


def resolve_generation_options(model: torch.nn.Module, prompt_len: int,
                               generation_config: GenerationConfig | dict | None,
                               kwargs: dict[str, Any]) -> GenerationOptions:
    """Merge generation_config (argument, else the model's) with explicit arguments (None = not given)."""
    gc = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if isinstance(gc, dict):
        gc = GenerationConfig.from_dict(gc)
    base = gc.to_dict() if gc is not None else {}
    merged = {**base, **{k: v for k, v in kwargs.items() if v is not None}}

    num_beams = merged.get("num_beams", 1)
    if num_beams != 1:
        raise ValueError(f"num_beams={num_beams!r}: beam search is not implemented in dsv3; use num_beams=1 "
                         "(greedy or sampling) or transformers for beam search")
    sampling_args = {k: merged.get(k) for k in _SAMPLING_KEYS if k in merged}
    temperature = sampling_args.get("temperature")
    if (sampling_args.get("do_sample") is True and isinstance(temperature, (int, float))
            and 0 < temperature < MIN_SAMPLING_TEMPERATURE):
        logger.warning("temperature=%g is below %g, where logits / temperature overflow; decoding greedily "
                       "(do_sample=False) instead", temperature, MIN_SAMPLING_TEMPERATURE)
        sampling_args["do_sample"] = False
    sampling = SamplingParams.from_generation_config(sampling_args)

    max_new = merged.get("max_new_tokens")
    max_length = merged.get("max_length")
    if max_new is not None and max_length is not None:
        # transformers' _prepare_generated_length says the same (logger.warning) and does the same.
        logger.warning("Both `max_new_tokens` (=%s) and `max_length`(=%s) seem to have been set. `max_new_tokens` "
                       "will take precedence.", max_new, max_length)
    if max_new is None:
        max_length = 20 if max_length is None else max_length
        max_new = max_length - prompt_len
        if max_new <= 0:
            raise ValueError(f"the prompt has {prompt_len} tokens but max_length={max_length}; pass max_new_tokens")
    if not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"max_new_tokens={max_new!r}: must be a positive integer")
    context = model.config.max_context_length   # max_position_embeddings, stretched by linear/dynamic scaling
    if prompt_len + max_new > context:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) = {prompt_len + max_new} exceeds "
                         f"the model's context of {context} positions (max_position_embeddings="
                         f"{model.config.max_position_embeddings}, rope_type={model.config.rope_type}); shorten the "
                         "prompt or lower max_new_tokens")

    min_new = merged.get("min_new_tokens")
    min_length = merged.get("min_length")
    if min_length is not None:
        _non_negative_int("min_length", min_length, "the minimum total length, prompt included; 0 disables it")
    if min_new is not None:
        _non_negative_int("min_new_tokens", min_new, "the minimum number of new tokens; 0 disables it")
        if min_length:
            logger.warning("Both `min_new_tokens` (=%s) and `min_length`(=%s) seem to have been set. "
                           "`min_new_tokens` will take precedence.", min_new, min_length)
    else:
        min_new = max(0, (min_length or 0) - prompt_len)   # min_length counts the (padded) prompt

    n_return = merged.get("num_return_sequences", 1)
    if not isinstance(n_return, int) or isinstance(n_return, bool) or n_return < 1:
        raise ValueError(f"num_return_sequences={n_return!r} is invalid: it must be a positive integer")
    if n_return > 1 and not sampling.do_sample:
        raise ValueError(f"num_return_sequences={n_return} needs sampling: greedy decoding (do_sample=False) "
                         "returns the same sequence every time; pass do_sample=True (as transformers requires)")
    ngram = _non_negative_int("no_repeat_ngram_size", merged.get("no_repeat_ngram_size", 0),
                              "the n-gram length that may occur only once; 0 disables it")
    stops = _stop_strings(merged["stop_strings"]) if merged.get("stop_strings") is not None else []

    eos = _as_id_list(merged["eos_token_id"]) if "eos_token_id" in merged else model.config.eos_token_ids
    pad = merged.get("pad_token_id")
    if pad is None:
        pad = model.config.pad_token_id
    pad_set = pad is not None
    if pad is None:
        pad = eos[0] if eos else 0
    vocab = model.config.vocab_size
    if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < vocab:
        raise ValueError(f"pad_token_id={pad!r} is outside the vocabulary [0, vocab_size={vocab}); pass the "
                         "tokenizer's pad_token_id (or an eos id) that the model can embed")
    return GenerationOptions(
        sampling, max_new, eos, int(pad), pad_set, min_new_tokens=min_new, num_return_sequences=n_return,
        no_repeat_ngram_size=ngram, stop_strings=stops,
        output_scores=_flag("output_scores", merged.get("output_scores", False)),
        output_logits=_flag("output_logits", merged.get("output_logits", False)),
        return_dict_in_generate=_flag("return_dict_in_generate", merged.get("return_dict_in_generate", False)))


def resolve_generation_args(model: torch.nn.Module, prompt_len: int, generation_config: GenerationConfig | dict
                            | None, kwargs: dict[str, Any]) -> tuple[SamplingParams, int, list[int], int]:
    """Merge generation_config and explicit arguments; returns (sampling, max_new_tokens, eos_ids, pad_id)."""
    o = resolve_generation_options(model, prompt_len, generation_config, kwargs)
    return o.sampling, o.max_new_tokens, o.eos_token_ids, o.pad_token_id


def infer_attention_mask(input_ids: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
    """The mask transformers' `_prepare_attention_mask_for_generation` builds when none is passed.

    With a pad_token_id that is set, occurs in the ids and is not an eos id, the mask is `ids != pad`;
    otherwise all ones. A batch that may be padded but cannot be inferred gets transformers' warning.
    """
    ones = torch.ones_like(input_ids)
    pad, eos = options.pad_token_id, options.eos_token_ids
    if not options.pad_token_id_set:
        if input_ids.shape[0] > 1:
            logger.warning("The attention mask and the pad token id were not set, with a batched input. As a "
                           "consequence, you may observe unexpected behavior. Please pass your input's "
                           "`attention_mask` to obtain reliable results.")
        return ones
    if pad in eos:
        if input_ids.shape[0] > 1:
            logger.warning("The attention mask is not set with a batched input, and cannot be inferred from input "
                           "because pad token is same as eos token. As a consequence, you may observe unexpected "
                           "behavior. Please pass your input's `attention_mask` to obtain reliable results.")
        return ones
    if not bool((input_ids == pad).any()):
        return ones
    logger.info("attention_mask inferred from pad_token_id=%d (as transformers does); pass attention_mask to "
                "override", pad)
    return (input_ids != pad).long()


class StopStringChecker:
    """transformers' StopStringCriteria, on decoded text: a row stops when a stop string occurs in the
    text of its last tokens and overlaps the final token (it may start in earlier tokens and run past the
    end of the final one: "st"+"opera" stops on "stop", "stop"+"at" does not stop again)."""

    def __init__(self, stop_strings: list[str], tokenizer: Any) -> None:
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"stop_strings={stop_strings!r} needs the tokenizer to decode the generated ids: pass "
                             "tokenizer= (e.g. generate(..., stop_strings=..., tokenizer=tokenizer))")
        self.stop_strings = stop_strings
        self.tokenizer = tokenizer
        # Every token decodes to at least one character, so this many tokens cover any stop string.
        self.window = max(len(x) for x in stop_strings) + 1

    def __call__(self, ids: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (the rows so far), active [B] bool -> [B] bool: which active rows just stopped."""
        stopped = torch.zeros_like(active)
        tails = ids[:, -self.window:].tolist()
        for row in active.nonzero().flatten().tolist():
            tail = tails[row]
            text = self.tokenizer.decode(tail, skip_special_tokens=False)
            before = len(self.tokenizer.decode(tail[:-1], skip_special_tokens=False)) if len(tail) > 1 else 0
            for stop in self.stop_strings:
                if text.find(stop, max(0, before - len(stop) + 1)) != -1:
                    stopped[row] = True
                    break
        return stopped


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | dict | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    min_new_tokens: int | None = None,
    min_length: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    num_return_sequences: int | None = None,
    num_beams: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    cache_implementation: str = "dynamic",
    streamer: Any = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    return_dict_in_generate: bool | None = None,
    output_scores: bool | None = None,
    output_logits: bool | None = None,
    use_mtp: bool = False,
    **unsupported: Any,
) -> torch.Tensor | GenerateOutput:
    """Continue each prompt of `input_ids` [B, T] (left-padded when B > 1); returns [B·n, T + new] with
    n = num_return_sequences (each prompt's n rows adjacent, as transformers), or a GenerateOutput with
    return_dict_in_generate=True (`.scores` processed and `.logits` raw, one [B·n, V] fp32 tensor per step,
    when output_scores / output_logits ask for them)."""
    if unsupported:
        raise TypeError(f"generate() got unsupported arguments {sorted(unsupported)}")
    if isinstance(input_ids, Mapping):   # a tokenizer's BatchEncoding, e.g. from apply_chat_template
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        input_ids = input_ids.get("input_ids")
    if input_ids is None or not isinstance(input_ids, torch.Tensor):
        raise TypeError("generate() needs input_ids, a LongTensor [batch, prompt_len] (e.g. from the tokenizer)")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: expected a non-empty [batch, prompt_len]")
    device = model.device
    input_ids = input_ids.to(device)
    t = input_ids.shape[1]
    vocab = model.config.vocab_size
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token id {lo if lo < 0 else hi} is out of range [0, vocab_size={vocab}); "
                         "check the tokenizer matches the model")
    explicit = dict(max_new_tokens=max_new_tokens, max_length=max_length, min_new_tokens=min_new_tokens,
                    min_length=min_length, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                    min_p=min_p, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                    num_return_sequences=num_return_sequences, num_beams=num_beams, pad_token_id=pad_token_id,
                    stop_strings=stop_strings, output_scores=output_scores, output_logits=output_logits,
                    return_dict_in_generate=return_dict_in_generate)
    if eos_token_id is not None:
        explicit["eos_token_id"] = eos_token_id
    opts = resolve_generation_options(model, t, generation_config, explicit)
    sampling, max_new, eos, pad = opts.sampling, opts.max_new_tokens, opts.eos_token_ids, opts.pad_token_id
    stop_check = StopStringChecker(opts.stop_strings, tokenizer) if opts.stop_strings else None

    if attention_mask is None:
        attention_mask = infer_attention_mask(input_ids, opts)
    attention_mask = attention_mask.to(device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}; they must match")
    padded = not bool(attention_mask.all())
    if padded and not bool(attention_mask[:, -1].all()):
        raise ValueError("input is right-padded; generation needs left padding (tokenizer.padding_side = 'left')")
    if opts.num_return_sequences > 1:   # each prompt's copies adjacent, as transformers' _expand_inputs_for_generation
        input_ids = input_ids.repeat_interleave(opts.num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(opts.num_return_sequences, dim=0)
    b = input_ids.shape[0]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    if use_mtp:
        from dsv3.generation.speculative import speculative_generate

        extras = [name for name, on in [("min_new_tokens/min_length", opts.min_new_tokens > 0),
                                        ("no_repeat_ngram_size", opts.no_repeat_ngram_size > 0),
                                        ("stop_strings", bool(opts.stop_strings)),
                                        ("output_scores", opts.output_scores),
                                        ("output_logits", opts.output_logits)] if on]
        if extras:
            raise ValueError(f"{', '.join(extras)} not supported with use_mtp=True; drop them or use_mtp=False")
        cache = make_cache(model, cache_implementation, b, t + max_new)   # rejected drafts' slots are reclaimed
        sequences, stats = speculative_generate(model, input_ids, attention_mask, max_new, sampling, eos, pad,
                                                cache, generator, streamer)
        if opts.return_dict_in_generate:
            return GenerateOutput(sequences, cache, sequences.shape[1] - t, stats)
        return sequences

    cache = make_cache(model, cache_implementation, b, t + max_new)
    step = DecodeStep(model, compile=compile)
    seen = seen_mask(input_ids, vocab, attention_mask) if sampling.uses_repetition_penalty else None
    eos_t = torch.tensor(eos, device=device, dtype=torch.long) if eos else None
    eos_ban = None
    if opts.min_new_tokens > 0 and eos_t is not None:
        eos_ban = torch.zeros(b, vocab, dtype=torch.bool, device=device)
        eos_ban[:, eos_t[eos_t < vocab]] = True
    out = torch.full((b, t + max_new), pad, dtype=torch.long, device=device)
    out[:, :t] = input_ids
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    mask = torch.cat([attention_mask, attention_mask.new_ones(b, max_new)], dim=1) if padded else None
    scores: list[torch.Tensor] = []
    raw_logits: list[torch.Tensor] = []
    if streamer is not None:
        streamer.put(input_ids.cpu())

    logits = model(input_ids, attention_mask=attention_mask if padded else None, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1, check_inputs=False).logits[:, -1]
    next_pos = positions[:, -1:] + 1
    steps = 0
    for i in range(max_new):
        banned = None
        if opts.no_repeat_ngram_size:
            banned = no_repeat_ngram_mask(out[:, : t + i], opts.no_repeat_ngram_size, vocab)
        if eos_ban is not None and i < opts.min_new_tokens:
            banned = eos_ban if banned is None else banned | eos_ban
        if opts.output_logits:
            raw_logits.append(logits.float().clone())
        z = process_logits(logits, sampling, seen, banned)
        if opts.output_scores:
            scores.append(z)
        token = pick_next_token(z, sampling, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        out[:, t + i] = token
        steps = i + 1
        if streamer is not None:
            streamer.put(token.cpu())
        if seen is not None:
            update_seen_mask(seen, token)
        if eos_t is not None:
            finished |= torch.isin(token, eos_t)
        if stop_check is not None:
            finished |= stop_check(out[:, : t + i + 1], ~finished)
        if (eos_t is not None or stop_check is not None) and bool(finished.all()):
            break
        if i + 1 == max_new:
            break
        logits = step(token[:, None], next_pos, cache, mask[:, : t + i + 1] if mask is not None else None)
        next_pos = next_pos + 1
    if streamer is not None:
        streamer.end()
    sequences = out[:, : t + steps]
    if opts.return_dict_in_generate:
        return GenerateOutput(sequences, cache, steps, scores=tuple(scores) if opts.output_scores else None,
                              logits=tuple(raw_logits) if opts.output_logits else None,
                              compiled_steps=step.compiled_calls)
    return sequences


@dataclass
class GenerateOutput:
    """What generate(return_dict_in_generate=True) returns; `scores`/`logits` as transformers'
    GenerateDecoderOnlyOutput: one fp32 [B·n, V] tensor per generated step (processed / raw)."""

    sequences: torch.Tensor
    past_key_values: LatentCache
    new_tokens: int
    speculative: Any = None   # SpeculativeStats when use_mtp=True (acceptance rate, main forwards)
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    compiled_steps: int = 0   # decode steps the compiled graph ran (compile=True); 0 when eager
