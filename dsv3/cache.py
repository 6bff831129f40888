"""Latent KV caches for Multi-head Latent Attention, with explicit positions.

MLA needs only, per layer and token, the normalised latent c_kv (kv_lora_rank values) and the
roped shared key k_pe (qk_rope_head_dim values): 576 values = 1152 bytes in bf16 for V3, where a
per-head K/V cache would hold 128·(192+128) = 40960. Both are kept side by side, `[.., r_kv + dr]`,
so the absorbed attention path can use the whole row as a key and its first r_kv values as the
value without any copy.

Positions are explicit. Every row b of a batch holds `lengths[b]` tokens in slots 0..lengths[b]-1
(slot = index in the row's sequence, padding included). A forward pass over S new tokens is planned
once (`plan`) into a `CacheStep`: the slot of every new token, either given (`cache_position`, like
gpt-fast's `input_pos`) or appended at each row's own end, and `span`, a host-side bound on the slots
any row can read. Each layer then writes where the step says and reads slots [0, span); attention
masks key slot k for a query at slot p unless k <= p, so a row never sees another row's extra slots
or its own stale ones (rejected draft tokens are reclaimed by `crop`, and simply overwritten).
`commit` records the new lengths after the pass. Nothing is begun or ended: a pass that is never
committed (the MTP module rewriting the positions the main model just wrote) leaves the cache as it was.

The host never reads the lengths: while every row holds the same number of tokens (`uniform`, the
transformers-style usage and left-padded generation) the slots are `start..start+S-1` and writes are
plain slices; once rows differ, slots come from the lengths tensor and writes scatter. `span` then is
a host-side bound (`crop(lengths, max_length)` lets the caller keep it exact), so a step costs what is
filled, not what was reserved.

- `DynamicLatentCache` grows by doubling its capacity (amortised O(1) appends).
- `StaticLatentCache` preallocates [B, max_cache_len, r_kv + dr] once; addresses never change, which
  is what a compiled decode step wants.
- `PagedLatentCache` keeps a pool of fixed-size blocks [num_blocks, block_size, r_kv + dr] per layer
  and a block table per sequence; a write goes to slot `table[b, p // block_size] * block_size +
  p % block_size` (the slot mapping), a read gathers a row's first ceil(span / block_size) blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv3.config import DeepseekV3Config


@dataclass
class CacheStep:
    """Where one forward pass of S new tokens writes, and how much it reads.

    positions: [B, S] slot per new token, or None when every row writes the shared slots start..start+S-1.
    span: slots [0, span) are read (host int, >= every written slot + 1).
    """

    s: int
    start: int
    span: int
    positions: torch.Tensor | None = None

    def slots(self, batch: int, device: torch.device) -> torch.Tensor:
        """[B, S] slots (also the default RoPE positions: slot = position without left padding)."""
        if self.positions is not None:
            return self.positions
        return torch.arange(self.start, self.start + self.s, device=device).view(1, self.s).expand(batch, self.s)


class LatentCacheView:
    """A cache bound to one planned step: what the attention layers see (`update(layer, latent)`)."""

    def __init__(self, cache: LatentCache, step: CacheStep) -> None:
        self.cache, self.step = cache, step

    def update(self, layer_idx: int, latent: torch.Tensor) -> torch.Tensor:
        return self.cache.update(layer_idx, latent, self.step)


class LatentCache:
    """Common interface: `plan` -> `update(layer, latent, step)` per layer -> `commit`; `crop`, `reorder`."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.layers: list[torch.Tensor | None] = [None] * num_layers
        self._bound = 0                              # host: no row holds more tokens
        self._lengths: torch.Tensor | None = None   # [B] tokens per row; None: every row holds _bound

    # ------------------------------------------------------------------ lengths
    @property
    def uniform(self) -> bool:
        """Every row holds the same number of tokens, get_seq_length() (known on the host)."""
        return self._lengths is None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held (the longest row's bound when rows differ)."""
        return self._bound

    def lengths(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """[B] tokens held per row."""
        if self._lengths is not None:
            return self._lengths
        return torch.full((batch,), self._bound, dtype=torch.long, device=device)

    def crop(self, length: int | torch.Tensor, max_length: int | None = None) -> None:
        """Keep the first `length` tokens of every row (negative: drop -length), or per row with a [B]
        tensor; max_length, when given, is a bound on that tensor (saves a host read). On rows of different
        lengths an int applies to each row: a row shorter than `length` keeps all it holds."""
        if isinstance(length, torch.Tensor):
            if length.dim() != 1:
                raise ValueError(f"crop() takes an int or per-row lengths [batch], not shape {tuple(length.shape)}")
            bound = int(length.max()) if max_length is None else max_length
            self._check_length(bound)
            self._lengths, self._bound = length.to(torch.long), bound
            return
        if self._lengths is not None:   # rows of different lengths: keep at most `length` (or drop -length) per row
            lengths = self._lengths + length if length < 0 else self._lengths.clamp(max=length)
            if length < 0 and not torch.compiler.is_compiling() and bool((lengths < 0).any()):
                raise ValueError(f"crop({length}): a row holds only {int(self._lengths.min())} tokens; drop at most "
                                 "that many")
            bound = max(0, self._bound + length) if length < 0 else min(length, self._bound)
            self._lengths, self._bound = lengths, bound
            return
        if length < 0:
            length = self._bound + length
        if not 0 <= length <= self._bound:
            raise ValueError(f"crop({length}): cache holds {self._bound} tokens")
        self._lengths, self._bound = None, length

    def _check_length(self, n: int) -> None:
        limit = self.max_cache_len
        if limit is not None and n > limit:
            raise ValueError(f"{type(self).__name__} holds {limit} tokens per row but {n} are needed; "
                             "allocate a larger max_cache_len")

    # ------------------------------------------------------------------ one forward pass
    def plan(self, batch: int, s: int, device: torch.device, cache_position: torch.Tensor | None = None,
             ) -> CacheStep:
        """The step of a forward pass writing s new tokens per row: at `cache_position` ([S] shared or
        [B, S]; one host read for the span) or appended at each row's end (no host read)."""
        if cache_position is None:
            step = (CacheStep(s, self._bound, self._bound + s) if self._lengths is None else
                    CacheStep(s, 0, self._bound + s, self._lengths[:, None] + torch.arange(s, device=device)))
        else:
            pos = cache_position.to(device=device, dtype=torch.long)
            if pos.shape not in ((s,), (batch, s)):
                raise ValueError(f"cache_position has shape {tuple(cache_position.shape)}: expected [{s}] or "
                                 f"[{batch}, {s}], one slot per new token")
            shared = pos.dim() == 1
            ramp = (pos == pos[0] + torch.arange(s, device=device)).all() if shared else pos.new_zeros(())
            lo, hi, contiguous = (int(v) for v in torch.stack([pos.min(), pos.max(), ramp.long()]).tolist())
            if lo < 0:
                raise ValueError(f"cache_position holds {lo}: slots start at 0")
            if contiguous:   # [S] slots start..start+S-1 shared by all rows: every row now ends there
                step = CacheStep(s, lo, lo + s)
            else:
                step = CacheStep(s, 0, max(hi + 1, self._bound), pos.expand(batch, s))
        self._check_length(step.span)
        self._reserve(batch, step.span, device)
        return step

    def view(self, step: CacheStep) -> LatentCacheView:
        return LatentCacheView(self, step)

    def rewrite_step(self, s: int, device: torch.device) -> CacheStep:
        """The step that rewrites (in other layers) the last s tokens of every row, without moving lengths:
        the MTP module covering the positions the main model has just committed."""
        if s > self._bound:
            raise ValueError(f"a pass over {s} positions but the cache holds {self._bound}: run the main model "
                             "over these positions first (MTP covers the positions it just committed)")
        if self._lengths is None:
            return CacheStep(s, self._bound - s, self._bound)
        return CacheStep(s, 0, self._bound, self._lengths[:, None] - s + torch.arange(s, device=device))

    def commit(self, step: CacheStep) -> None:
        """Record a completed pass: each row now ends after its last written slot."""
        if step.positions is None:
            self._lengths, self._bound = None, step.start + step.s
            return
        self._lengths = step.positions[:, -1] + 1
        self._bound = step.span

    # ------------------------------------------------------------------ storage
    def _reserve(self, batch: int, span: int, device: torch.device) -> None:
        """Make room for slots [0, span) of `batch` rows before the layers write (host-side only)."""

    def update(self, layer_idx: int, latent: torch.Tensor, step: CacheStep) -> torch.Tensor:
        """Write latent [B, S, r+dr] at the step's slots; return slots [0, span) of the layer [B, span, r+dr]."""
        raise NotImplementedError

    def check(self, batch_size: int, dtype: torch.dtype) -> None:
        """Raise a ValueError naming the fix when this cache cannot hold a batch of this size and dtype."""

    @property
    def max_cache_len(self) -> int | None:
        return None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (e.g. drop finished sequences)."""
        self.layers = [None if t is None else t.index_select(0, index) for t in self.layers]
        if self._lengths is not None:
            self._lengths = self._lengths.index_select(0, index)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers if t is not None)


def write_rows(buf: torch.Tensor, latent: torch.Tensor, step: CacheStep) -> None:
    """buf [B, capacity, C] <- latent [B, S, C] at the step's slots: a slice when shared, else a scatter."""
    if step.positions is None:
        buf[:, step.start: step.start + step.s] = latent
    else:
        rows = torch.arange(buf.shape[0], device=buf.device)[:, None]
        buf[rows, step.positions] = latent


class DynamicLatentCache(LatentCache):
    """Grows on demand; capacity doubles so appends are amortised O(1)."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)

    @classmethod
    def for_config(cls, config: DeepseekV3Config) -> DynamicLatentCache:
        return cls(config.num_hidden_layers)

    def update(self, layer_idx: int, latent: torch.Tensor, step: CacheStep) -> torch.Tensor:
        # latent: [B, S, r_kv + dr]
        buf = self.layers[layer_idx]
        if buf is None or buf.shape[1] < step.span or buf.shape[0] != latent.shape[0]:
            cap = max(step.span, 2 * (buf.shape[1] if buf is not None else 0), 16)
            new = latent.new_zeros(latent.shape[0], cap, latent.shape[2])
            keep = min(self._bound, buf.shape[1]) if buf is not None else 0
            if buf is not None and keep > 0 and buf.shape[0] == latent.shape[0]:
                new[:, :keep] = buf[:, :keep]
            buf = self.layers[layer_idx] = new
        write_rows(buf, latent, step)
        return buf[:, : step.span]


class StaticLatentCache(LatentCache):
    """Preallocated [B, max_cache_len, r_kv + dr] per layer."""

    def __init__(self, config: DeepseekV3Config, batch_size: int, max_cache_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 num_layers: int | None = None) -> None:
        super().__init__(config.num_hidden_layers if num_layers is None else num_layers)
        self._max = max_cache_len
        self.layers = [torch.zeros(batch_size, max_cache_len, config.kv_cache_dim, dtype=dtype, device=device)
                       for _ in range(self.num_layers)]

    @property
    def max_cache_len(self) -> int:
        return self._max

    def check(self, batch_size: int, dtype: torch.dtype) -> None:
        buf = self.layers[0]
        assert buf is not None
        if buf.shape[0] != batch_size or buf.dtype != dtype:
            raise ValueError(f"StaticLatentCache holds batch {buf.shape[0]} in {buf.dtype} but the model runs batch "
                             f"{batch_size} in {dtype}; create it with StaticLatentCache(config, batch_size="
                             f"{batch_size}, max_cache_len, dtype={dtype})")

    def update(self, layer_idx: int, latent: torch.Tensor, step: CacheStep) -> torch.Tensor:
        buf = self.layers[layer_idx]
        assert buf is not None and buf.shape[0] == latent.shape[0], "batch size differs from the cache's"
        write_rows(buf, latent, step)
        return buf[:, : step.span]


class PagedLatentCache(LatentCache):
    """A pool of fixed-size blocks of latents per layer and a block table per sequence.

    layers[l]: [num_blocks, block_size, r_kv + dr]; block_table: [B, max_blocks_per_seq] block ids (-1: none).
    Blocks are taken from a free list as rows grow (`_reserve`, host-side, once per block boundary) and
    returned by `release(row)`; a read gathers a row's blocks into [B, span, r_kv + dr] (per-step work
    proportional to the tokens filled). DESIGN.md §5: 64-token blocks, FlashMLA's page size.
    """

    def __init__(self, config: DeepseekV3Config, batch_size: int, num_blocks: int, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 num_layers: int | None = None, max_blocks_per_seq: int | None = None) -> None:
        super().__init__(config.num_hidden_layers if num_layers is None else num_layers)
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"block_size={block_size}, num_blocks={num_blocks}: both must be positive")
        self.block_size, self.num_blocks, self.batch_size = block_size, num_blocks, batch_size
        per_seq = max_blocks_per_seq if max_blocks_per_seq is not None else num_blocks
        self.layers = [torch.zeros(num_blocks, block_size, config.kv_cache_dim, dtype=dtype, device=device)
                       for _ in range(self.num_layers)]
        self.block_table = torch.full((batch_size, per_seq), -1, dtype=torch.long, device=device)
        self._free = list(range(num_blocks - 1, -1, -1))        # host: a stack of free block ids
        self._owned = [0] * batch_size                            # host: blocks held per row
        self._covered = 0                                         # host: min(_owned)

    @property
    def max_cache_len(self) -> int:
        return self.block_table.shape[1] * self.block_size

    def check(self, batch_size: int, dtype: torch.dtype) -> None:
        if batch_size != self.batch_size or self.layers[0].dtype != dtype:   # type: ignore[union-attr]
            raise ValueError(f"PagedLatentCache has {self.batch_size} sequences in {self.layers[0].dtype} but the "  # type: ignore[union-attr]
                             f"model runs batch {batch_size} in {dtype}; create it with batch_size={batch_size}, "
                             f"dtype={dtype}")

    def _reserve(self, batch: int, span: int, device: torch.device) -> None:
        need = math.ceil(span / self.block_size)
        if need <= self._covered:   # the common case: no row crosses a block boundary (no per-row work)
            return
        grow = [(row, n) for row, n in enumerate(self._owned) if n < need]
        wanted = sum(need - n for _, n in grow)
        if wanted > len(self._free):
            raise ValueError(f"PagedLatentCache is out of blocks: {wanted} more are needed for {span} tokens per "
                             f"row and {len(self._free)} of {self.num_blocks} are free; allocate more num_blocks "
                             "or release() finished rows")
        for row, n in grow:
            ids = [self._free.pop() for _ in range(need - n)]
            self.block_table[row, n:need] = torch.tensor(ids, dtype=torch.long)
            self._owned[row] = need
        self._covered = need

    def release(self, row: int) -> None:
        """Return row's blocks to the pool and empty the row (continuous batching reuses it)."""
        n = self._owned[row]
        self._free.extend(int(i) for i in self.block_table[row, :n].tolist())
        self.block_table[row] = -1
        self._owned[row] = 0
        self._covered = 0
        lengths = self.lengths(self.batch_size, self.block_table.device).clone()
        lengths[row] = 0
        self._lengths = lengths

    def slot_mapping(self, step: CacheStep) -> torch.Tensor:
        """[B, S] flat pool slots (block id · block_size + offset) of the step's new tokens."""
        pos = step.slots(self.batch_size, self.block_table.device)
        return self.block_table.gather(1, pos // self.block_size) * self.block_size + pos % self.block_size

    def update(self, layer_idx: int, latent: torch.Tensor, step: CacheStep) -> torch.Tensor:
        pool = self.layers[layer_idx]                                       # [N, bs, C]
        assert pool is not None
        c = pool.shape[-1]
        flat = pool.view(-1, c)                                             # [N*bs, C]
        flat.index_copy_(0, self.slot_mapping(step).reshape(-1), latent.reshape(-1, c))
        blocks = self.block_table[:, : math.ceil(step.span / self.block_size)]   # [B, nb]
        return pool[blocks].view(latent.shape[0], -1, c)[:, : step.span]   # [B, span, C]

    def reorder(self, index: torch.Tensor) -> None:
        raise NotImplementedError("PagedLatentCache keeps rows in place: release() the rows you drop")

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self.block_table.numel() * self.block_table.element_size()
