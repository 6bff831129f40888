"""`generate()`: prefill with the expanded MLA path, then decode one token at a time over the latent
cache with the absorbed path, optionally as one compiled graph.

The loop keeps everything on the device: the next token, the finished flags and the repetition
"seen" mask are tensors, and the only host read per step is the stop check (`finished.all()`),
plus the streamer's copy when one is attached. Left-padded batches keep one shared write position
in the cache; padding positions stay masked for the whole generation.

Argument names and defaults follow transformers' `generate` (max_length 20 when neither length is
given, pad_token_id falling back to the first eos id, a generation_config.json read from the
checkpoint directory and overridden by explicit arguments).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv3.cache import DynamicLatentCache, LatentCache, StaticLatentCache
from dsv3.generation.sampling import SamplingParams, seen_mask, select_next_token, update_seen_mask

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
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); fix or delete the file") from None

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


class DecodeStep:
    """One decode step (new tokens [B, S] -> last-position logits [B, V]), eager or compiled.

    Compilation uses `torch.compile(fullgraph=True, dynamic=True)`: the cache length is a symbolic
    int, so one graph serves every step. If compilation fails (unsupported backend or op), the step
    falls back to eager once and logs why.
    """

    def __init__(self, model: torch.nn.Module, compile: bool = False) -> None:
        self.model = model
        self._fn: Callable[..., torch.Tensor] = self._eager
        self.compiled = False
        if compile:
            self._fn = torch.compile(self._eager, fullgraph=True, dynamic=True)
            self.compiled = True

    def _eager(self, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        out = self.model(ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1, check_inputs=False)
        return out.logits[:, -1]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not self.compiled:
            return self._eager(ids, positions, cache, attention_mask)
        length = cache.get_seq_length()
        try:
            return self._fn(ids, positions, cache, attention_mask)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the exact eager step
            logger.warning("compiled decode step failed (%s: %s); continuing in eager mode", type(e).__name__, e)
            cache.crop(length)
            self._fn, self.compiled = self._eager, False
            return self._eager(ids, positions, cache, attention_mask)


def resolve_generation_args(model: torch.nn.Module, prompt_len: int, generation_config: GenerationConfig | dict
                            | None, kwargs: dict[str, Any]) -> tuple[SamplingParams, int, list[int], int]:
    """Merge generation_config and explicit arguments; returns (sampling, max_new_tokens, eos_ids, pad_id)."""
    gc = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if isinstance(gc, dict):
        gc = GenerationConfig.from_dict(gc)
    base = gc.to_dict() if gc is not None else {}
    merged = {**base, **{k: v for k, v in kwargs.items() if v is not None}}
    sampling = SamplingParams.from_generation_config({k: merged.get(k) for k in _SAMPLING_KEYS if k in merged})
    max_new = merged.get("max_new_tokens")
    if max_new is None:
        max_length = merged.get("max_length", 20)
        max_new = max_length - prompt_len
        if max_new <= 0:
            raise ValueError(f"the prompt has {prompt_len} tokens but max_length={max_length}; pass max_new_tokens")
    if not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"max_new_tokens={max_new!r}: must be a positive integer")
    context = model.config.max_position_embeddings
    if prompt_len + max_new > context:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) = {prompt_len + max_new} exceeds "
                         f"the model's context of {context} (max_position_embeddings); shorten the prompt or "
                         "lower max_new_tokens")
    eos = _as_id_list(merged["eos_token_id"]) if "eos_token_id" in merged else model.config.eos_token_ids
    pad = merged.get("pad_token_id")
    if pad is None:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else (eos[0] if eos else 0)
    return sampling, max_new, eos, int(pad)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | dict | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    cache_implementation: str = "dynamic",
    streamer: Any = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    return_dict_in_generate: bool = False,
    use_mtp: bool = False,
    **unsupported: Any,
) -> torch.Tensor | GenerateOutput:
    """Continue each prompt of `input_ids` [B, T] (left-padded when B > 1); returns [B, T + new]."""
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
    b, t = input_ids.shape
    vocab = model.config.vocab_size
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token id {lo if lo < 0 else hi} is out of range [0, vocab_size={vocab}); "
                         "check the tokenizer matches the model")
    explicit = dict(max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
                    temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, pad_token_id=pad_token_id)
    if eos_token_id is not None:
        explicit["eos_token_id"] = eos_token_id
    sampling, max_new, eos, pad = resolve_generation_args(model, t, generation_config, explicit)

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}; they must match")
    padded = not bool(attention_mask.all())
    if padded and not bool(attention_mask[:, -1].all()):
        raise ValueError("input is right-padded; generation needs left padding (tokenizer.padding_side = 'left')")
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    if use_mtp:
        from dsv3.generation.speculative import speculative_generate

        cache = make_cache(model, cache_implementation, b, t + max_new)   # rejected drafts' slots are reclaimed
        sequences, stats = speculative_generate(model, input_ids, attention_mask, max_new, sampling, eos, pad,
                                                cache, generator, streamer)
        if return_dict_in_generate:
            return GenerateOutput(sequences, cache, sequences.shape[1] - t, stats)
        return sequences

    cache = make_cache(model, cache_implementation, b, t + max_new)
    step = DecodeStep(model, compile=compile)
    seen = seen_mask(input_ids, vocab, attention_mask) if sampling.uses_repetition_penalty else None
    eos_t = torch.tensor(eos, device=device, dtype=torch.long) if eos else None
    out = torch.full((b, t + max_new), pad, dtype=torch.long, device=device)
    out[:, :t] = input_ids
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    mask = torch.cat([attention_mask, attention_mask.new_ones(b, max_new)], dim=1) if padded else None
    if streamer is not None:
        streamer.put(input_ids.cpu())

    logits = model(input_ids, attention_mask=attention_mask if padded else None, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1, check_inputs=False).logits[:, -1]
    next_pos = positions[:, -1:] + 1
    steps = 0
    for i in range(max_new):
        token = select_next_token(logits, sampling, generator, seen=seen)
        token = torch.where(finished, torch.full_like(token, pad), token)
        out[:, t + i] = token
        steps = i + 1
        if streamer is not None:
            streamer.put(token.cpu())
        if seen is not None:
            update_seen_mask(seen, token)
        if eos_t is not None:
            finished |= torch.isin(token, eos_t)
            if bool(finished.all()):
                break
        if i + 1 == max_new:
            break
        logits = step(token[:, None], next_pos, cache, mask[:, : t + i + 1] if mask is not None else None)
        next_pos = next_pos + 1
    if streamer is not None:
        streamer.end()
    sequences = out[:, : t + steps]
    if return_dict_in_generate:
        return GenerateOutput(sequences, cache, steps)
    return sequences


@dataclass
class GenerateOutput:
    sequences: torch.Tensor
    past_key_values: LatentCache
    new_tokens: int
    speculative: Any = None   # SpeculativeStats when use_mtp=True (acceptance rate, main forwards)
