"""The serving engine: one loop owns the model and runs continuous batching over a paged latent cache.

    submit(prompt ids, SamplingOptions, n)  ->  waiting queue  ->  admitted (blocks reserved)  ->  running
    every step:  decodes (1 token per running sequence)  +  prefill chunks (FCFS) within `token_budget`
                 one forward [b, 1] for the decodes (or [b, 2] = [last token, MTP draft] with speculation),
                 one forward [c, longest chunk] for the prefill chunks, right-padded
                 sample the rows that reached the end of their input; detokenise; stop; free finished rows

Sequences join and leave between steps. Each one owns a list of cache blocks (`block_size` slots of
r_kv + dr latents per layer, in one shared pool); a step hands the model a `_BatchCache` holding the
block table of just the rows it runs and their explicit positions (`cache_position` [b, S]), so rows of
different lengths share a decode batch and attention reads each row's own slots (both MLA paths, the
model's causal mask over slots). Blocks for prompt + max_tokens are reserved on admission, so a running
sequence never waits for memory and nothing is ever preempted.

Prefix reuse: a block that is full of known tokens is keyed by hash(parent block's key, its token ids) —
the key names the whole prefix, as vLLM's. An admitted sequence takes the longest chain of matching
blocks (reference-counted, never written again) and prefills only the rest, at least its last token
(whose logits start the answer). A block whose count drops to 0 stays findable until it is handed out
again (least recently freed first).

MTP speculation (`speculative="mtp"`, greedy rows): after every main pass the MTP module runs over the same
positions (so its cache slot covers every position) and drafts the next token; the next step feeds
[last token, draft] and keeps the draft where the model's argmax agrees, plus the token after it. Rows accept
different counts, so their lengths diverge inside the batch — explicit positions make that free; a rejected
draft's slot is overwritten by the next pass. Greedy output is unchanged.

Sampling per sequence (`SamplingOptions`): OpenAI presence/frequency penalties on the generated tokens,
then temperature 0 = greedy (argmax of the fp32 logits), else temperature, top_k, top_p as transformers'
warpers (dsv3.generation.sampling) and a draw from the sequence's own torch.Generator (seeded by
`seed + choice index` when a seed is given). Logprobs are those of the raw model distribution
(log_softmax of the fp32 logits), as vLLM's default.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv3.cache import LatentCache, PagedLatentCache
from dsv3.generation.sampling import SamplingParams, process_logits, sample_from_probs

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue holds max_queue requests; retry later (HTTP 429)."""


class RequestTooLargeError(ValueError):
    """The prompt (plus max_tokens) can never fit the context or the cache (HTTP 400)."""


@dataclass
class SamplingOptions:
    """Per-request sampling and stopping (the OpenAI request fields)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0 or -1: off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)   # besides the model's eos ids
    ignore_eos: bool = False
    logprobs: int | None = None          # None: off; k >= 0: the chosen token's logprob and the top k

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be at least 1")
        if not 0.0 <= self.temperature:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k}: must be -1 or 0 (off) or a positive count")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs={self.logprobs}: must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]        # (token id, logprob), best first


@dataclass
class SequenceUpdate:
    """What one step produced for one choice of a request (sent to the request's sink)."""

    request_id: str
    index: int                           # choice index (0..n-1)
    token_ids: list[int]                 # tokens generated this step (whose text may be held back)
    text: str                            # text safe to show now (never a partial stop string)
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None     # None | "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0           # generated so far
    cached_tokens: int = 0               # prompt tokens served from reused prefix blocks
    error: str | None = None


Sink = Callable[[SequenceUpdate], None]


# ------------------------------------------------------------------------------------------- blocks
class BlockManager:
    """Free list, reference counts and the prefix table of the shared block pool (host-side)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))   # LRU order
        self.refs = [0] * num_blocks
        self.key_of: dict[int, bytes] = {}        # block -> prefix key (full blocks only)
        self.block_of: dict[bytes, int] = {}      # prefix key -> block
        self.reused_blocks = 0                    # counters (metrics)

    @property
    def in_use(self) -> int:
        return self.num_blocks - len(self.free)

    @staticmethod
    def key(parent: bytes, tokens: Sequence[int]) -> bytes:
        return hashlib.blake2b(parent + b"|" + ",".join(map(str, tokens)).encode(), digest_size=16).digest()

    def match(self, tokens: Sequence[int], limit: int) -> list[int]:
        """The longest chain of cached full blocks covering a prefix of tokens, at most `limit` blocks."""
        out: list[int] = []
        parent = b""
        bs = self.block_size
        for i in range(limit):
            k = self.key(parent, tokens[i * bs: (i + 1) * bs])
            block = self.block_of.get(k)
            if block is None:
                break
            out.append(block)
            parent = k
        return out

    def acquire(self, cached: list[int], fresh: int) -> list[int]:
        """Take the cached blocks (one more reference each) and `fresh` new ones; caller checked can_fit."""
        for b in cached:
            if self.refs[b] == 0:
                del self.free[b]
            self.refs[b] += 1
        self.reused_blocks += len(cached)
        new = []
        for _ in range(fresh):
            b, _ = self.free.popitem(last=False)                 # least recently freed
            k = self.key_of.pop(b, None)
            if k is not None and self.block_of.get(k) == b:
                del self.block_of[k]
            self.refs[b] = 1
            new.append(b)
        return cached + new

    def available(self, cached: list[int]) -> int:
        """Blocks a new sequence could take besides `cached` (those still in the free list don't count)."""
        return len(self.free) - sum(1 for b in cached if self.refs[b] == 0)

    def register(self, block: int, key: bytes) -> None:
        """`block` now holds the full prefix named by `key`."""
        if key not in self.block_of:
            self.block_of[key] = block
            self.key_of[block] = key

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):                               # the tail first: evicted before its prefix
            self.refs[b] -= 1
            assert self.refs[b] >= 0, f"block {b} released twice"
            if self.refs[b] == 0:
                self.free[b] = None


class _BatchCache(PagedLatentCache):
    """The rows of one forward pass over the engine's shared pool: their block table, nothing else.

    Blocks are reserved by the engine beforehand, so `_reserve` finds every row holding `table`'s width."""

    def __init__(self, pool: PagedLatentCache, table: torch.Tensor) -> None:
        LatentCache.__init__(self, pool.num_layers)
        self.layers = pool.layers                                 # shared [N, bs, C] per layer
        self.block_size, self.num_blocks = pool.block_size, pool.num_blocks
        self.batch_size = table.shape[0]
        self.block_table = table                                  # [b, nb]
        self._free = []
        self._owned = [table.shape[1]] * table.shape[0]
        self._covered = table.shape[1]                            # every row holds the table's width


# ------------------------------------------------------------------------------------------- sequences
@dataclass
class _Request:
    id: str
    prompt: list[int]
    options: SamplingOptions
    n: int
    sink: Sink
    arrival: float
    seqs: list[_Sequence] = field(default_factory=list)
    first_token_time: float | None = None


class _Sequence:
    def __init__(self, request: _Request, index: int, generator: torch.Generator | None) -> None:
        self.request, self.index, self.generator = request, index, generator
        self.tokens = list(request.prompt)          # prompt + generated
        self.prompt_len = len(request.prompt)
        self.computed = 0                           # tokens whose latents are in the cache
        self.blocks: list[int] = []
        self.registered = 0                         # full blocks entered in the prefix table
        self.parent_key = b""
        self.cached_tokens = 0
        self.counts: dict[int, int] = {}            # generated token -> count (penalties)
        self.draft: int | None = None               # MTP's guess of the token after tokens[-1] (greedy rows)
        self.finished: str | None = None
        self.last_token_time: float | None = None
        # detokenisation state (incremental, as vLLM): text of generated tokens, emitted prefix
        self.prefix_offset = self.read_offset = self.prompt_len
        self.text = ""
        self.emitted = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def pending(self) -> int:
        """Tokens to feed before the next sample (the whole prompt tail, or 1 while decoding)."""
        return len(self.tokens) - self.computed


@dataclass
class EngineStats:
    requests: dict[str, int]                      # finished requests by finish reason
    prompt_tokens: int
    generation_tokens: int
    running: int
    waiting: int
    blocks_in_use: int
    num_blocks: int
    reused_blocks: int
    steps: int
    drafts: int = 0                                # MTP drafts verified
    accepted_drafts: int = 0


class Engine:
    """Continuous batching over a paged latent cache. Thread-safe `submit`/`cancel`; one loop thread
    (`start`) or explicit `step()` calls (tests) run the model."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch: int = 32, max_queue: int = 256,
                 block_size: int = 16, num_blocks: int | None = None, token_budget: int = 256,
                 prefix_caching: bool = True, mla_path: str = "auto", eos_token_ids: Sequence[int] | None = None,
                 speculative: str | None = None) -> None:
        if max_batch < 1 or max_queue < 0 or block_size < 1 or token_budget < 1:
            raise ValueError(f"max_batch={max_batch}, max_queue={max_queue}, block_size={block_size}, "
                             f"token_budget={token_budget}: max_batch, block_size and token_budget must be >= 1, "
                             "max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        self.max_context = config.max_context_length
        self.max_batch, self.max_queue, self.token_budget = max_batch, max_queue, token_budget
        self.prefix_caching, self.mla_path = prefix_caching, mla_path
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative={speculative!r}: expected None or 'mtp'")
        if speculative == "mtp" and getattr(model, "mtp", None) is None:
            raise ValueError("speculative='mtp' needs a model with an MTP module (num_nextn_predict_layers > 0, "
                             "loaded with load_mtp=True)")
        self.speculative = speculative == "mtp"
        self.drafts = self.accepted_drafts = 0
        if num_blocks is None:   # room for max_batch sequences of the whole context, up to 8192 tokens each
            num_blocks = max_batch * math.ceil(min(self.max_context, 8192) / block_size)
        # one block more than the manager hands out: the scratch block that padded positions write to
        self.scratch = num_blocks
        self.pool = PagedLatentCache(config, 1, num_blocks + 1, block_size, dtype=model.dtype, device=model.device,
                                     num_layers=model.num_cache_layers if self.speculative else
                                     config.num_hidden_layers, max_blocks_per_seq=1)
        self.blocks = BlockManager(num_blocks, block_size)
        if eos_token_ids is None:
            gen = getattr(model, "generation_config", None)
            eos = getattr(gen, "eos_token_id", None) if gen is not None else None
            eos_token_ids = ([eos] if isinstance(eos, int) else list(eos)) if eos is not None else config.eos_token_ids
        self.eos_token_ids = list(eos_token_ids)
        self._lock = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._cancelled: set[str] = set()
        self._requests: dict[str, _Request] = {}
        self._running: list[_Sequence] = []
        self._ids = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._seed_rng = torch.Generator().manual_seed(int(time.time_ns() % (2**63)))
        self.finished: dict[str, int] = {}
        self.prompt_tokens = self.generation_tokens = self.steps = 0
        self.observers: list[Callable[[str, float], None]] = []   # ("ttft" | "token", seconds)

    # ----------------------------------------------------------------------------- public API
    def check_request(self, prompt_len: int, max_tokens: int, n: int = 1) -> None:
        """Raise RequestTooLargeError when this request can never run (before any work is queued)."""
        if prompt_len < 1:
            raise RequestTooLargeError("the prompt is empty: send at least one token")
        if prompt_len + max_tokens > self.max_context:
            raise RequestTooLargeError(
                f"this model's maximum context length is {self.max_context} tokens; the request has "
                f"{prompt_len} prompt tokens and max_tokens={max_tokens} ({prompt_len + max_tokens} in all): "
                "shorten the prompt or lower max_tokens")
        need = n * math.ceil((prompt_len + max_tokens) / self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise RequestTooLargeError(
                f"the request needs {need} cache blocks (n={n} x ({prompt_len} prompt tokens + max_tokens="
                f"{max_tokens})) but the cache holds {self.blocks.num_blocks}: lower max_tokens or n, or start the "
                "server with more cache blocks (--num-blocks)")

    def default_max_tokens(self, prompt_len: int) -> int:
        """max_tokens for a request that names none: the rest of the context, within one sequence's share of
        the cache (blocks are reserved for prompt + max_tokens on admission)."""
        share = self.blocks.num_blocks * self.blocks.block_size // self.max_batch
        return max(1, min(self.max_context, share) - prompt_len)

    def submit(self, prompt: Sequence[int], options: SamplingOptions, sink: Sink, n: int = 1,
               request_id: str | None = None) -> str:
        """Queue a request of n choices; updates go to sink (called from the engine thread). Returns its id."""
        options.validate()
        if n < 1:
            raise ValueError(f"n={n}: must be at least 1")
        prompt = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range [0, {vocab})")
        self.check_request(len(prompt), options.max_tokens, n)
        rid = request_id or f"req-{next(self._ids)}"
        req = _Request(rid, prompt, options, n, sink, time.perf_counter())
        for i in range(n):
            gen = torch.Generator(device=self.model.device)
            seed = options.seed + i if options.seed is not None else int(
                torch.randint(0, 2**62, (1,), generator=self._seed_rng))
            gen.manual_seed(seed)
            req.seqs.append(_Sequence(req, i, gen))
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue holds {len(self._waiting)} requests (--max-queue "
                                     f"{self.max_queue}); retry later")
            if rid in self._requests:
                raise ValueError(f"request id {rid!r} is already in use")
            self._requests[rid] = req
            self._waiting.append(req)
            self._lock.notify_all()
        return rid

    def cancel(self, request_id: str) -> None:
        """Abort a request (client gone): its sequences leave at the next step and free their blocks."""
        with self._lock:
            if request_id in self._requests:
                self._cancelled.add(request_id)
                self._lock.notify_all()

    def stats(self) -> EngineStats:
        with self._lock:
            waiting = sum(len(r.seqs) for r in self._waiting)
        return EngineStats(dict(self.finished), self.prompt_tokens, self.generation_tokens, len(self._running),
                           waiting, self.blocks.in_use, self.blocks.num_blocks, self.blocks.reused_blocks,
                           self.steps, self.drafts, self.accepted_drafts)

    @property
    def alive(self) -> bool:
        """The loop thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._cancelled)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dsv3-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the loop; with drain, after every queued and running request has finished."""
        with self._lock:
            if not drain:
                self._cancelled.update(self._requests)
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.has_work and not self._stop:
                    self._lock.wait()
                if self._stop and not self.has_work:
                    return
            try:
                self.step()
            except Exception as exc:   # noqa: BLE001 - a failed step fails its requests, the server stays up
                logger.exception("engine step failed; aborting the running requests")
                self._fail_running(f"{type(exc).__name__}: {exc}")

    # ----------------------------------------------------------------------------- one step
    @torch.no_grad()
    def step(self) -> None:
        """One scheduling step: drop cancelled, admit waiting, run decodes and prefill chunks, sample."""
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return
        self.steps += 1
        budget = self.token_budget
        decodes = [s for s in self._running if s.pending == 1]
        budget -= len(decodes)
        chunks: list[tuple[_Sequence, int]] = []
        for s in self._running:
            if s.pending > 1 and budget > 0:
                c = min(s.pending, budget)
                chunks.append((s, c))
                budget -= c
        if not chunks and not decodes:   # every prefill waits on a full budget: run the oldest one anyway
            s = next(s for s in self._running if s.pending > 1)
            chunks.append((s, min(s.pending, self.token_budget)))
        now = time.perf_counter()
        verify = [s for s in decodes if s.draft is not None]
        plain = [s for s in decodes if s.draft is None]
        if plain:
            self._run(plain, [1] * len(plain), now)
        if verify:
            self._verify(verify, now)
        if chunks:   # the prefill chunks in one forward, right-padded to the longest ...
            longest = max(c for _, c in chunks)
            fits = [(s, c) for s, c in chunks if s.computed + longest <= self.max_context]
            alone = [(s, c) for s, c in chunks if s.computed + longest > self.max_context]
            if fits:
                self._run([s for s, _ in fits], [c for _, c in fits], now)
            for s, c in alone:       # ... but padding may not run past the context: such a chunk runs alone
                self._run([s], [c], now)
        for s in self._running:
            self._register_blocks(s)
        for s in [s for s in self._running if s.finished is not None]:
            self._finish(s, s.finished)

    def _forward(self, seqs: list[_Sequence], ids: list[list[int]]) -> tuple[torch.Tensor, _BatchCache]:
        """Feed ids[i] (rows of different lengths) at each sequence's next positions; returns the final hidden
        states [b, S, D] (S = the longest row) and the step's cache view. Does not move `computed`.

        A shorter row is right-padded: its padding sits at positions after its real tokens, so no real query
        sees it (causal mask over slots); it writes either to the row's own not-yet-filled slots (overwritten
        before they are read) or, past the row's blocks, to the scratch block."""
        device = self.model.device
        s = max(len(r) for r in ids)
        bs = self.blocks.block_size
        x = torch.tensor([r + [0] * (s - len(r)) for r in ids], dtype=torch.long, device=device)   # [b, S]
        start = torch.tensor([q.computed for q in seqs], dtype=torch.long, device=device)
        pos = start[:, None] + torch.arange(s, device=device)                           # [b, S]
        width = max(math.ceil((q.computed + s) / bs) for q in seqs)
        table = torch.tensor([q.blocks[:width] + [self.scratch] * (width - min(width, len(q.blocks)))
                              for q in seqs], dtype=torch.long, device=device)          # [b, nb]
        cache = _BatchCache(self.pool, table)
        out = self.model(x, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1,
                         mla_path=self.mla_path, check_inputs=False)
        return out.last_hidden_state, cache

    def _logits(self, hidden: torch.Tensor, at: list[int]) -> torch.Tensor:
        """fp32 logits [b, V] of row i's position at[i] (hidden [b, S, D])."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.model.lm_head(hidden[rows, torch.tensor(at, device=hidden.device)]).float()

    def _run(self, seqs: list[_Sequence], counts: list[int], now: float) -> None:
        """Feed the next counts[i] tokens of sequence i; sample those that reach the end of their input; with
        MTP, run the draft module over the same positions (its cache slot must cover every position)."""
        ids = [q.tokens[q.computed: q.computed + c] for q, c in zip(seqs, counts, strict=True)]
        hidden, cache = self._forward(seqs, ids)
        logits = self._logits(hidden, [c - 1 for c in counts])                          # [b, V]
        for q, c in zip(seqs, counts, strict=True):
            q.computed += c
        for i, q in enumerate(seqs):
            if q.pending == 0:                                           # reached the end of its input
                self._accept(q, logits[i], now)
        if self.speculative:
            # MTP at position p reads t_{p+1}: the next input token, or the one just sampled (0 for padding)
            s = hidden.shape[1]
            nxt = [q.tokens[q.computed - c + 1: q.computed + 1] for q, c in zip(seqs, counts, strict=True)]
            self._draft(seqs, hidden, [n + [0] * (s - len(n)) for n in nxt], cache, [c - 1 for c in counts])

    def _verify(self, seqs: list[_Sequence], now: float) -> None:
        """Greedy MTP speculation: feed [last token, draft] per row; keep the draft where the model agrees,
        then one more token from the position after it. Rejected slots are simply overwritten later."""
        ids = [[q.tokens[-1], q.draft] for q in seqs]
        hidden, cache = self._forward(seqs, ids)                         # [b, 2, D]
        logits = torch.stack([self._logits(hidden, [0] * len(seqs)), self._logits(hidden, [1] * len(seqs))], 1)
        accepted = []
        for i, q in enumerate(seqs):
            draft, q.draft = q.draft, None
            q.computed += 1
            token = self._accept(q, logits[i, 0], now)
            ok = token == draft and q.finished is None
            if ok:
                q.computed += 1
                self._accept(q, logits[i, 1], now)
                self.accepted_drafts += 1
            self.drafts += 1
            accepted.append(ok)
        # MTP at the fed positions: after an accepted draft its last position predicts the next draft; after a
        # rejection only the first position is real (the second, fed the draft, is overwritten next step)
        nxt = [[q.tokens[-2], q.tokens[-1]] if ok else [q.tokens[-1], q.tokens[-1]]
               for q, ok in zip(seqs, accepted, strict=True)]
        self._draft(seqs, hidden, nxt, cache, [1 if ok else 0 for ok in accepted])

    def _draft(self, seqs: list[_Sequence], hidden: torch.Tensor, next_ids: list[list[int]], cache: _BatchCache,
               at: list[int]) -> None:
        """MTP module 0 over the positions just fed (writing its cache slot); row i's draft is its greedy
        prediction at position index at[i]. Only greedy rows speculate."""
        x = torch.tensor(next_ids, dtype=torch.long, device=hidden.device)               # [b, s]
        logits, _ = self.model.mtp_forward(hidden, x, cache=cache, mla_path=self.mla_path)  # [b, s, V]
        rows = torch.arange(len(seqs), device=hidden.device)
        drafts = logits[rows, torch.tensor(at, device=hidden.device)].argmax(-1).tolist()
        for q, d in zip(seqs, drafts, strict=True):
            if q.pending == 1 and q.finished is None and q.request.options.greedy:
                q.draft = int(d)

    def _register_blocks(self, s: _Sequence) -> None:
        """Enter every block that is now full of computed tokens in the prefix table."""
        if not self.prefix_caching:
            return
        bs = self.blocks.block_size
        while (s.registered + 1) * bs <= s.computed:
            i = s.registered
            key = BlockManager.key(s.parent_key, s.tokens[i * bs: (i + 1) * bs])
            self.blocks.register(s.blocks[i], key)
            s.parent_key, s.registered = key, i + 1

    # ----------------------------------------------------------------------------- admission / release
    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
        for rid in cancelled:
            req = self._requests.get(rid)
            if req is None:
                continue
            for s in req.seqs:
                if s.finished is None:
                    self._emit(s, [], [], "abort")
                    self._finish(s, "abort")

    def _admit(self) -> None:
        bs = self.blocks.block_size
        while True:
            with self._lock:
                if not self._waiting:
                    return
                req = self._waiting[0]
                waiting = [s for s in req.seqs if s.finished is None and not s.blocks]
                if len(self._running) + len(waiting) > self.max_batch and self._running:
                    return
                # all choices of a request join together (they share the prompt blocks once computed)
                plans = []
                free = len(self.blocks.free)
                for s in waiting:
                    total = math.ceil((s.prompt_len + req.options.max_tokens) / bs)
                    cached = (self.blocks.match(s.tokens, (s.prompt_len - 1) // bs) if self.prefix_caching
                              else [])
                    plans.append((s, cached, total - len(cached)))
                need = sum(fresh for _, _, fresh in plans) + sum(
                    1 for _, cached, _ in plans for b in set(cached) if self.blocks.refs[b] == 0)
                if need > free:
                    return                                   # wait for running sequences to free blocks
                self._waiting.popleft()
            for s, cached, fresh in plans:
                s.blocks = self.blocks.acquire(cached, fresh)
                s.computed = s.registered = len(cached)
                s.computed *= bs
                s.cached_tokens = s.computed
                if cached:
                    s.parent_key = self.blocks.key_of[cached[-1]]
                self._running.append(s)
            self.prompt_tokens += len(req.prompt)

    def _finish(self, s: _Sequence, reason: str) -> None:
        s.finished = reason
        if s in self._running:
            self._running.remove(s)
        if s.blocks:
            self.blocks.release(s.blocks)
            s.blocks = []
        req = s.request
        if all(q.finished is not None for q in req.seqs):
            with self._lock:
                self._requests.pop(req.id, None)
                self._cancelled.discard(req.id)
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def _fail_running(self, message: str) -> None:
        """After a failed step: every request that has left the queue (running, or caught half-admitted) ends
        with an error update, so no client waits forever; queued requests stay queued. Each sequence's client
        hears first; freeing it comes after and, should that fail too, is done the blunt way (logged)."""
        with self._lock:
            queued = {id(r) for r in self._waiting}
            active = [r for r in self._requests.values() if id(r) not in queued]
        for req in active:
            for s in req.seqs:
                if s not in self._running and s.finished is not None:
                    continue                                     # already ended and freed
                self._emit(s, [], [], "abort", error=message)
                try:
                    self._finish(s, "abort")
                except Exception:   # noqa: BLE001 - the step already failed; drop the sequence without its bookkeeping
                    logger.exception("request %s: freeing sequence %d after the failed step failed too; dropping it",
                                     req.id, s.index)
                    self._drop(s)

    def _drop(self, s: _Sequence) -> None:
        """Remove a sequence whose `_finish` failed: out of the running set, blocks returned where possible."""
        s.finished = "abort"
        if s in self._running:
            self._running.remove(s)
        blocks, s.blocks = s.blocks, []
        if blocks:
            try:
                self.blocks.release(blocks)
            except Exception:   # noqa: BLE001 - inconsistent block state: leak these blocks rather than crash
                logger.exception("sequence %d: %d cache blocks could not be returned", s.index, len(blocks))
        if all(q.finished is not None for q in s.request.seqs):
            with self._lock:
                self._requests.pop(s.request.id, None)
                self._cancelled.discard(s.request.id)

    # ----------------------------------------------------------------------------- sampling and output
    def _accept(self, s: _Sequence, logits: torch.Tensor, now: float) -> int:
        """Sample s's next token from logits [V], append it, emit its text; mark (not free) a finished row."""
        opt = s.request.options
        token, lp = self._sample(s, logits, opt)
        s.tokens.append(token)
        s.counts[token] = s.counts.get(token, 0) + 1
        self.generation_tokens += 1
        req = s.request
        if s.generated == 1:
            if req.first_token_time is None:
                req.first_token_time = now
                for obs in self.observers:
                    obs("ttft", now - req.arrival)
        elif s.last_token_time is not None:
            for obs in self.observers:
                obs("token", now - s.last_token_time)
        s.last_token_time = now
        stop_ids = [] if opt.ignore_eos else self.eos_token_ids
        reason = None
        if token in stop_ids or token in opt.stop_token_ids:
            reason = "stop"
        else:
            self._detokenize(s)
        delta, stopped = self._stop_strings(s, s.text, opt.stop)
        if stopped:
            reason = "stop"
        elif reason is None and s.generated >= opt.max_tokens:
            reason = "length"
        if reason is not None and not stopped:
            delta += s.text[s.emitted:]                               # flush what was held back
            s.emitted = len(s.text)
        self._emit(s, [token], [lp] if lp is not None else [], reason, delta)
        s.finished = reason
        return token

    def _sample(self, s: _Sequence, logits: torch.Tensor, opt: SamplingOptions
                ) -> tuple[int, TokenLogprob | None]:
        z = logits                                                   # [V] fp32
        if (opt.presence_penalty or opt.frequency_penalty) and s.counts:
            ids = torch.tensor(list(s.counts), dtype=torch.long, device=z.device)
            counts = torch.tensor(list(s.counts.values()), dtype=z.dtype, device=z.device)
            z = z.clone()
            z[ids] -= opt.presence_penalty + opt.frequency_penalty * counts
        if opt.greedy:
            token = int(z.argmax())
        else:
            params = SamplingParams(do_sample=True, temperature=opt.temperature,
                                    top_k=opt.top_k if opt.top_k > 0 else None,
                                    top_p=opt.top_p if opt.top_p < 1.0 else None)
            probs = torch.softmax(process_logits(z[None], params), dim=-1)   # [1, V]
            token = int(sample_from_probs(probs, s.generator)[0])
        lp = None
        if opt.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            top = []
            if opt.logprobs > 0:
                v, i = logp.topk(opt.logprobs)
                top = list(zip(i.tolist(), v.tolist(), strict=True))
            lp = TokenLogprob(token, float(logp[token]), top)
        return token, lp

    def _detokenize(self, s: _Sequence) -> str:
        """Append the new token's text to s.text when it forms whole characters (vLLM's offsets)."""
        prefix = self.tokenizer.decode(s.tokens[s.prefix_offset: s.read_offset])
        full = self.tokenizer.decode(s.tokens[s.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            s.text += full[len(prefix):]
            s.prefix_offset, s.read_offset = s.read_offset, len(s.tokens)
        return s.text

    @staticmethod
    def _stop_strings(s: _Sequence, text: str, stops: list[str]) -> tuple[str, bool]:
        """(text newly safe to emit, whether a stop string ended the sequence). The stop string itself and
        anything after it are dropped; a tail that could still become a stop string is held back."""
        if not stops:
            delta = s.text[s.emitted:]
            s.emitted = len(s.text)
            return delta, False
        longest = max(len(x) for x in stops)
        begin = max(0, s.emitted - longest + 1)
        hits = [i for i in (s.text.find(x, begin) for x in stops) if i >= 0]
        if hits:
            cut = min(hits)
            s.text = s.text[:cut]
            delta = s.text[s.emitted:] if cut > s.emitted else ""
            s.emitted = len(s.text)
            return delta, True
        hold = 0
        for x in stops:
            for k in range(min(len(x) - 1, len(s.text)), 0, -1):
                if s.text.endswith(x[:k]):
                    hold = max(hold, k)
                    break
        safe = max(s.emitted, len(s.text) - hold)
        delta = s.text[s.emitted: safe]
        s.emitted = safe
        return delta, False

    def _emit(self, s: _Sequence, tokens: list[int], lps: list[TokenLogprob], reason: str | None, text: str = "",
              error: str | None = None) -> None:
        req = s.request
        update = SequenceUpdate(req.id, s.index, tokens, text, lps, reason, s.prompt_len, s.generated,
                                s.cached_tokens, error)
        try:
            req.sink(update)
        except RuntimeError:   # the HTTP side's event loop is closed (shutting down): nobody is listening
            logger.warning("request %s: its output sink is closed; cancelling it", req.id)
            self.cancel(req.id)


def collect(engine: Engine, prompts: Sequence[Sequence[int]], options: SamplingOptions | Sequence[SamplingOptions],
            n: int = 1) -> list[list[SequenceUpdate]]:
    """Submit prompts and run `engine.step()` until all finish (no thread); per request, its updates."""
    opts = [options] * len(prompts) if isinstance(options, SamplingOptions) else list(options)
    out: list[list[SequenceUpdate]] = [[] for _ in prompts]
    for i, (p, o) in enumerate(zip(prompts, opts, strict=True)):
        engine.submit(p, o, out[i].append, n=n)
    while engine.has_work:
        engine.step()
    return out
