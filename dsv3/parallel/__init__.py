"""Tensor and expert parallelism over torch.distributed (see context.py for the object passed around)."""

from dsv3.parallel.context import SINGLE, CollectiveStats, ParallelContext

__all__ = ["SINGLE", "CollectiveStats", "ParallelContext"]
