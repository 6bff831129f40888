"""Token selection for `generate()`: transformers' argument names and semantics, without host syncs.

The logits z [B, V] of the last position are upcast to fp32 and go through the steps below in the
order transformers' `_get_logits_processor` builds them (RepetitionPenaltyLogitsProcessor, then the
warpers Temperature → TopK → TopP → MinP, which only run when sampling):

    1. repetition penalty ρ   z_v ← z_v / ρ if z_v > 0 else z_v · ρ, for every v seen so far
                              (prompt included; each token penalised once however often it occurred)
    1b. banned tokens         z_v ← -inf where `banned` [B, V] is set: NoRepeatNGram (a token that
                              would repeat an n-gram of the sequence, `no_repeat_ngram_mask`) and
                              MinLength / MinNewTokens (the eos ids before the minimum length)
    2. greedy (do_sample=False): next = argmax_v z_v, steps 3-7 skipped
    3. temperature T          z ← z / T
    4. top-k                  z_v ← -inf where z_v < (k-th largest z); ties with the k-th are all kept
    5. top-p                  sort z ascending, c = cumsum(softmax(z_sorted)); drop sorted j with
                              c_j ≤ 1 - p; the largest logit is always kept
    6. min-p                  π = softmax z; drop v with π_v < min_p · max π; the argmax is always kept
    7. sample                 π = softmax z;  next = argmax_v π_v / q_v,  q_v ~ Exponential(1) i.i.d.

Step 7 is the exponential race: q_v / π_v ~ Exponential(π_v), and the smallest of independent
exponentials is number v with probability π_v / Σπ = π_v. It is how ATen implements a single
`torch.multinomial` draw, so for the same generator state it returns the same tokens bit for bit, but
it skips multinomial's `.item()` validity check: the whole pipeline is free of host syncs and Python
loops over the batch, and traces with `torch.compile(fullgraph=True)`. Dynamo cannot take a
`torch.Generator` argument, so a compiled step draws its noise with `exponential_noise(...)` outside the
compiled region and passes it in as `noise=` (or passes no generator and uses the global RNG).

Every filtering step reuses transformers' own tensor ops (same sort, same cumsum, same comparison),
so processed logits match `LogitsProcessorList` exactly, -inf masks and tie handling included.

Repetition penalty reads a boolean "seen" mask [B, V]: build it once from the prompt with
`seen_mask(...)` and update it after each step with `update_seen_mask(...)`, an O(B) scatter, instead
of gathering the whole history every step. `apply_repetition_penalty` also accepts token ids [B, T].
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# What transformers' `generate()` falls back to for keys missing from generation_config.json
# (`GenerationConfig._get_default_generation_params`). Note top_k=50: a config that sets only
# do_sample/temperature/top_p (DeepSeek-V3's does) still samples from the top 50 under transformers.
TRANSFORMERS_GENERATE_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
}

# Sampling below this temperature is refused: z / T overflows fp32 for |z| ≳ 3e38·T (T = 1e-38 turns
# every logit into ±inf and the softmax into nan), and long before that the distribution is one-hot
# in all but exact ties. generate() decodes greedily instead (the T → 0 limit) and logs it.
MIN_SAMPLING_TEMPERATURE = 1e-5


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; field names and meanings are transformers' `GenerationConfig`'s.

    `top_k` 0/None, `top_p` 1.0/None, `min_p` None and `repetition_penalty` 1.0 switch a step off.
    Temperature, top-k, top-p and min-p only act when `do_sample=True`; the repetition penalty also
    applies to greedy decoding, as in transformers. Frozen (hashable), validated on construction.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending value and the valid range."""
        if type(self.do_sample) is not bool:
            raise ValueError(f"do_sample={self.do_sample!r} is invalid: it must be True or False")
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(
                f"temperature={t!r} is invalid: it must be a finite number > 0 "
                "(0 is accepted only with do_sample=False, i.e. greedy decoding)"
            )
        if self.do_sample and t < MIN_SAMPLING_TEMPERATURE:
            raise ValueError(
                f"temperature={t!r} is invalid with do_sample=True: it must be >= {MIN_SAMPLING_TEMPERATURE} "
                "(smaller values overflow the logits); for greedy decoding set do_sample=False"
            )
        k = self.top_k
        if k is not None and (not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0):
            raise ValueError(
                f"top_k={k!r} is invalid: it must be a non-negative integer (0 or None disables top-k)"
            )
        p = self.top_p
        if p is not None and (not _is_real(p) or not 0 < p <= 1):
            raise ValueError(f"top_p={p!r} is invalid: it must be in (0, 1] (1.0 or None disables top-p)")
        m = self.min_p
        if m is not None and (not _is_real(m) or not 0 <= m <= 1):
            raise ValueError(f"min_p={m!r} is invalid: it must be in [0, 1] (None disables min-p)")
        r = self.repetition_penalty
        if not _is_real(r) or not math.isfinite(r) or r <= 0:
            raise ValueError(
                f"repetition_penalty={r!r} is invalid: it must be a finite number > 0 "
                "(1.0 disables it, > 1 discourages repeats, < 1 encourages them)"
            )

    @classmethod
    def from_generation_config(
        cls, config: Mapping[str, Any] | None = None, **overrides: Any
    ) -> SamplingParams:
        """Parameters `transformers.generate(**overrides)` would use with this generation_config.json.

        Keys of `config` that are not sampling fields (eos_token_id, ...) are ignored; a null value or a
        missing key falls back to `TRANSFORMERS_GENERATE_DEFAULTS` (so top_k=50 unless the config or an
        override says otherwise; pass top_k=0 to switch it off). An override of None means "not given".
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; valid names are {sorted(names)}")
        values = dict(TRANSFORMERS_GENERATE_DEFAULTS)
        for source in (config or {}, overrides):
            values.update({k: v for k, v in source.items() if k in names and v is not None})
        return cls(**values)

    @property
    def uses_repetition_penalty(self) -> bool:
        """Whether the generate loop needs to maintain a seen mask."""
        return self.repetition_penalty != 1.0


def seen_mask(
    token_ids: torch.Tensor, vocab_size: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask [B, V] of the tokens in `token_ids` [B, T].

    Ids outside [0, V) (padding sentinels such as -1, embedding rows beyond the lm_head) and positions
    where `attention_mask` is 0 (transformers' prompt_ignore_length for left padding) are not marked.
    """
    assert token_ids.dim() == 2, f"token ids must be [B, T], got {tuple(token_ids.shape)}"
    ids = token_ids.long()
    # Route everything that must not be marked to an extra column V, dropped afterwards.
    drop = (ids < 0) | (ids >= vocab_size)
    if attention_mask is not None:
        drop = drop | (attention_mask == 0)
    ids = ids.masked_fill(drop, vocab_size)
    mask = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, ids, True)
    return mask[:, :vocab_size]


def update_seen_mask(seen: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
    """Mark `next_tokens` [B] as seen, in place (an O(B) scatter); returns `seen` [B, V]."""
    return seen.scatter_(1, next_tokens.long().view(-1, 1), True)


def no_repeat_ngram_mask(token_ids: torch.Tensor, ngram_size: int, vocab_size: int) -> torch.Tensor:
    """transformers' NoRepeatNGramLogitsProcessor as a bool mask [B, V]: the tokens that would complete
    an n-gram already present in `token_ids` [B, L] (padding included, as transformers sees it).

    The last n-1 ids are matched against every window of the row; a matching window bans its last id.
    """
    b, length = token_ids.shape
    banned = torch.zeros(b, vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    if ngram_size < 1 or length < ngram_size:
        return banned[:, :vocab_size]
    windows = token_ids.unfold(1, ngram_size, 1)                               # [B, L-n+1, n]
    prefix = token_ids[:, length + 1 - ngram_size:]                            # [B, n-1]
    matches = (windows[..., :-1] == prefix[:, None]).all(dim=-1)               # [B, L-n+1]
    # Non-matching windows (and ids beyond the vocabulary) go to a spare column V, dropped afterwards.
    last = windows[..., -1].clamp(0, vocab_size)
    banned.scatter_(1, torch.where(matches, last, vocab_size), True)
    return banned[:, :vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: seen logits > 0 are divided by `penalty`,
    the others multiplied. `seen` is a bool mask [B, V] or token ids [B, T]. Returns a new tensor.
    """
    if penalty == 1.0:
        return logits
    if seen.dtype != torch.bool:
        seen = seen_mask(seen, logits.shape[-1])
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def _top_k(z: torch.Tensor, top_k: int) -> torch.Tensor:
    k = min(top_k, z.shape[-1])
    kth = torch.topk(z, k)[0][..., -1, None]
    return z.masked_fill(z < kth, -float("inf"))


def _top_p(z: torch.Tensor, top_p: float) -> torch.Tensor:
    # Ascending sort as in transformers: ties at the cut are broken by the same sort, the mass of
    # already-filtered (-inf) tokens is 0, and the last (largest) entry is never removed.
    sorted_z, sorted_idx = torch.sort(z, descending=False)
    cum_probs = sorted_z.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cum_probs <= (1 - top_p)
    sorted_remove[..., -1:] = False
    remove = sorted_remove.scatter(1, sorted_idx, sorted_remove)
    return z.masked_fill(remove, -float("inf"))


def _min_p(z: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = torch.softmax(z, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
    return z.masked_fill(remove, -float("inf"))


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 1-6 of the module docstring: fp32 logits [B, V] ready for argmax or softmax.

    `seen` (bool [B, V] or ids [B, T]) is required when `params.repetition_penalty != 1`; `banned`
    (bool [B, V], optional) is set to -inf after the penalty, before the sampling warpers.
    The input is never modified.
    """
    assert logits.dim() == 2, f"logits must be [B, V], got {tuple(logits.shape)}"
    z = logits.float()
    if params.uses_repetition_penalty:
        if seen is None:
            raise ValueError(
                f"repetition_penalty={params.repetition_penalty} needs the seen tokens: pass seen= "
                "(a bool mask [B, V] from seen_mask(), or token ids [B, T])"
            )
        z = apply_repetition_penalty(z, seen, params.repetition_penalty)
    if banned is not None:
        z = z.masked_fill(banned, -float("inf"))
    if not params.do_sample:
        return z
    if params.temperature != 1.0:
        z = z / params.temperature
    if params.top_k:
        z = _top_k(z, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        z = _top_p(z, params.top_p)
    if params.min_p is not None:
        z = _min_p(z, params.min_p)
    return z


def sampling_probs(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """The distribution [B, V] (fp32) that `select_next_token` samples from when do_sample=True."""
    return torch.softmax(process_logits(logits, params, seen), dim=-1)


def exponential_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exponential(1) noise shaped like `like`, in fp32; draw it outside a compiled region to seed it."""
    return torch.empty(like.shape, dtype=torch.float32, device=like.device).exponential_(
        1, generator=generator
    )


def sample_from_probs(
    probs: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """One draw per row of `probs` [B, V] by the exponential race; returns LongTensor [B].

    Same tokens as `torch.multinomial(probs, 1, generator=generator)[:, 0]`, without its host sync.
    """
    q = exponential_noise(probs, generator) if noise is None else noise
    # A zero draw would make 0/0 = nan for a zero-probability token, and argmax picks nan.
    q = q.clamp_min(torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def pick_next_token(
    z: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids [B] from processed logits `z` [B, V] (the output of `process_logits`)."""
    if not params.do_sample:
        return z.argmax(dim=-1)
    return sample_from_probs(torch.softmax(z, dim=-1), generator, noise)


def select_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    *,
    seen: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids [B] (int64) from the last-position logits [B, V].

    Greedy is the exact argmax of the (repetition-penalised) fp32 logits. Sampling uses `generator`
    (None: the global RNG) or, under torch.compile, pre-drawn `noise` [B, V] from `exponential_noise`.
    """
    return pick_next_token(process_logits(logits, params, seen, banned), params, generator, noise)
