"""The one object that says how a process takes part in a sharded model: `ParallelContext`.

It is passed explicitly (built by `dsv3.parallel.launch` under torchrun, or by a test that started its own
process group) to whatever needs it — the sharding of a meta model, the loader, the layers that combine
partial results — and never read from a global. `SINGLE` (world size 1) makes every collective the identity,
so single-process code runs the same layers with no process group at all.

Collectives are torch's functional collectives (`torch.distributed._functional_collectives`): they return
new tensors instead of mutating, which is what lets a compiled decode step trace through them; on the CPU
they run over gloo, on GPUs over NCCL. `stats`, when given, counts calls and bytes and times each collective
(waiting on its result) — how the parallel benchmark reports the share of a step spent communicating.

Below the model in the layering (imports torch only), so dsv3/model may use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


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

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `x` concatenated along `dim` in rank order (equal shapes on every rank)."""
        if self.world_size == 1:
            return x
        from torch.distributed import _functional_collectives as fc

        dim = dim % x.dim()

        def run() -> torch.Tensor:
            gathered = fc.wait_tensor(fc.all_gather_tensor(x.contiguous(), 0, self._group()))   # [W*d0, ...]
            if dim == 0:
                return gathered
            return torch.cat(gathered.chunk(self.world_size, dim=0), dim=dim)

        return self._timed(x, run)

    def split(self, size: int) -> tuple[int, int]:
        """[start, end) of this rank's part when `size` items are split as evenly as possible (the first
        size % world ranks get one more)."""
        base, extra = divmod(size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)


SINGLE = ParallelContext()
