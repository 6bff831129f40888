"""The one object that says how a process takes part in a sharded model: `ParallelContext`.

It is passed explicitly (built by `dsv3.parallel.launch` under torchrun, or by a test that started its own
process group) to whatever needs it — the sharding of a meta model, the loader, the layers that combine
partial results — and never read from a global. `SINGLE` (world size 1) makes every collective the identity,
so single-process code runs the same layers with no process group at all.

Collectives are torch's functional collectives (`torch.distributed._functional_collectives`): they return
new tensors instead of mutating, which is what lets a compiled decode step trace through them; on the CPU
they run over gloo, on GPUs over NCCL. `stats`, when given, counts calls and bytes and times each collective
(waiting on its result) — how the parallel benchmark reports the share of a step spent communicating.

Besides all_reduce and all_gather (uneven parts allowed: `sizes`), the two vocabulary-parallel steps live here,
as pure tensor code the layers call: `embed` (look up this rank's slice of the table, zero the other ids,
all-reduce) and `gather_vocab` (every rank's logit slice, gathered). `split` says which part of a dimension
a rank holds (even-ish, in whole units: FP8 blocks for the intermediate channels, see dsv3/model/parallel.py).

Below the model in the layering (imports torch only), so dsv3/model may use it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class CollectiveStats:
    """Calls, bytes sent into collectives and seconds spent in them (wall clock, result waited for)."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        self.calls, self.bytes, self.seconds = 0, 0, 0.0


@dataclass(frozen=True)
class ParallelContext:
    """Rank `rank` of `world_size` processes in process group `group` (None: the default group)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None
    stats: CollectiveStats | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"ParallelContext(rank={self.rank}, world_size={self.world_size}): the rank must be "
                             "in [0, world_size) and world_size ≥ 1")

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    @property
    def is_first(self) -> bool:
        """Rank 0: the one that reads input and prints."""
        return self.rank == 0

    def _group(self) -> Any:
        if self.group is not None:
            return self.group
        import torch.distributed as dist

        return dist.group.WORLD

    def _timed(self, x: torch.Tensor, run: Any) -> torch.Tensor:
        if self.stats is None or torch.compiler.is_compiling():
            return run()
        start = time.perf_counter()
        out = run()
        self.stats.calls += 1
        self.stats.bytes += x.numel() * x.element_size()
        self.stats.seconds += time.perf_counter() - start
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks (a new tensor; `x` itself when world_size == 1)."""
        if self.world_size == 1:
            return x
        from torch.distributed import _functional_collectives as fc

        return self._timed(x, lambda: fc.wait_tensor(fc.all_reduce(x, "sum", self._group())))

    def all_gather(self, x: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None) -> torch.Tensor:
        """The ranks' `x` concatenated along `dim` in rank order. `sizes`: each rank's length along `dim` when
        they differ (an uneven split, e.g. the vocabulary): every part is padded to the longest, gathered, and
        the padding cut off again — the gathered tensor is the same on every rank."""
        if self.world_size == 1:
            return x
        from torch.distributed import _functional_collectives as fc

        dim = dim % x.dim()
        longest = x.shape[dim] if sizes is None else max(sizes)
        if sizes is not None and (len(sizes) != self.world_size or sizes[self.rank] != x.shape[dim]):
            raise ValueError(f"all_gather: sizes={list(sizes)} do not fit rank {self.rank} of {self.world_size} "
                             f"holding {x.shape[dim]} along dim {dim}")

        def run() -> torch.Tensor:
            part = x.movedim(dim, 0)                                                   # [d, ...]
            if part.shape[0] < longest:
                part = torch.cat([part, part.new_zeros(longest - part.shape[0], *part.shape[1:])])
            gathered = fc.wait_tensor(fc.all_gather_single(part.contiguous(), 0, self._group()))  # [W*longest, ...]
            pieces = gathered.split(longest)
            if sizes is not None:
                pieces = [p[:n] for p, n in zip(pieces, sizes, strict=True)]
            return torch.cat(pieces).movedim(0, dim)

        return self._timed(x, run)

    def split(self, size: int, unit: int = 1) -> tuple[int, int]:
        """[start, end) of this rank's part when `size` items are split as evenly as possible in whole units of
        `unit` items (the first ranks get one unit more; the last unit may be short)."""
        return self.part(size, self.rank, unit)

    def part(self, size: int, rank: int, unit: int = 1) -> tuple[int, int]:
        """[start, end) of rank `rank`'s part (see `split`)."""
        units = -(-size // unit)
        base, extra = divmod(units, self.world_size)
        start = rank * base + min(rank, extra)
        end = start + base + (1 if rank < extra else 0)
        return min(start * unit, size), min(end * unit, size)

    def sizes(self, size: int, unit: int = 1) -> list[int]:
        """Every rank's part length when `size` items are split (see `split`)."""
        return [end - start for start, end in (self.part(size, r, unit) for r in range(self.world_size))]

    def embed(self, embedding: nn.Module, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """A vocabulary-parallel lookup: this rank holds rows `split(vocab_size)` of the table in `embedding`;
        ids outside them look up row 0 and are zeroed, and the sum over the ranks is every id's full row
        (exact: one rank contributes the row, the others zeros). World size 1: `embedding(ids)` itself."""
        if self.world_size == 1:
            return embedding(ids)
        start, end = self.split(vocab_size)
        local = ids - start
        inside = (local >= 0) & (local < end - start)
        rows = embedding(torch.where(inside, local, torch.zeros_like(local)))           # [..., D]
        return self.all_reduce(rows.masked_fill(~inside[..., None], 0))

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Full-vocabulary logits [..., V] on every rank from each rank's slice [..., split(V)]."""
        if self.world_size == 1:
            return logits
        return self.all_gather(logits, -1, self.sizes(vocab_size))


SINGLE = ParallelContext()
