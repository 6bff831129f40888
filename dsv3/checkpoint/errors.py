"""`CheckpointError`, re-exported from `dsv3.errors` (where the weight-format math below `dsv3.model` can reach it)."""

from __future__ import annotations

from dsv3.errors import CheckpointError

__all__ = ["CheckpointError"]
