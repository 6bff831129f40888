"""The one exception type for problems at the checkpoint boundary (files, index, headers, FP8 scales).

A checkpoint is data from outside the program, so a bad one is the user's problem to fix, not a bug:
every `CheckpointError` names the file and tensor involved, says what was expected and what was found,
and suggests the fix (re-download a shard, re-save, fix config.json). It subclasses `ValueError` so
callers that already treat bad input as `ValueError` keep working.

It lives at the bottom of the package (nothing imported) so that the weight-format math in `dsv3.quant`,
which `dsv3.model` uses, can raise it without importing `dsv3.checkpoint`.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file, index or tensor is missing, corrupt, or inconsistent with what reads it."""
