"""Dynamo's guards on the model, checked once per `generate` call instead of before every compiled step.

Before each call of a compiled function, dynamo checks its guards: is the cached graph still valid for these
inputs? For the decode step most of them are about the model, not about the step's inputs — every module's type and
empty hook dicts, the parameters' shapes and dtypes, the config values the forward pass branched on (1,912 guards
on the bench shape, 4 layers, ~1,700 of them on the model) — and about module globals (dsv3's constants, the torch
functions it calls). None of them can change between two steps of one `generate` call, yet dynamo walks them
before every step, and after a step has streamed the weights through the caches that walk runs from DRAM:
~0.8 ms per step on the bench shape (~4 % of an int4 step), growing with the layer count.

`StepGuards.filter` is the step's `guard_filter_fn` (torch.compile's public hook for dropping guards). It takes
over each guard whose source is the step object (`L['self']`, which holds the model) or a module global (`G[...]`)
and that dynamo itself can re-evaluate from a saved value (`GUARD_VALUE_DISPATCH` of torch >= 2.13: tensor
metadata, type, identity, constant value, dict keys, empty hook dict, ...), plus dynamo's "same object" guards
between two such sources. It first resolves the guard's source expression on the live step and keeps the guard
in dynamo unless that yields the very value dynamo guarded. `StepGuards.failure` re-evaluates every guard taken
over; `DecodeStep` calls it when it is created, i.e. once per `generate` call. Dynamo still checks before every
step the guards on the step's inputs (ids, positions, mask, the cache — its capacity is a shape guard), on the
global state (grad mode, default device, ...) and every guard this module did not take.

Dynamo caches graphs per code object, and with the model's guards gone nothing would stop one model's graph from
running for another model. So each (model, dispatch, options) gets its own copy of the step's code object
(`step_code`); when a check fails — the model or a global changed since its step was compiled — the step gets a
fresh copy, which compiles again (logged). A model mutated *during* a `generate` call (from a streamer callback)
is not seen: the check runs between calls.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

try:   # the guard re-evaluation table of torch >= 2.13 (what invoke_subgraph reuses traced subgraphs with)
    from torch._dynamo.guards import GUARD_VALUE_DISPATCH, GuardCheckSpec
except ImportError:
    GUARD_VALUE_DISPATCH, GuardCheckSpec = None, None

_LOCAL = re.compile(r"L\['(\w+)'\]")
# A guard's source expression that no longer resolves (an attribute, key or item gone) is a failed guard.
_UNRESOLVED = (AttributeError, KeyError, IndexError, TypeError, NameError)


def available() -> bool:
    """Whether this torch lets guards be taken over (else dynamo checks all of them every step)."""
    return GUARD_VALUE_DISPATCH is not None


@dataclass(frozen=True)
class _Deferred:
    kind: str                       # dynamo's guard type, e.g. TENSOR_MATCH
    name: str                       # the guarded source, as dynamo writes it
    source: types.CodeType          # that source, compiled for eval over {"L": frame locals, "G": globals}
    check: Callable[[Any, Any], bool] | None   # (value, saved metadata) -> holds; None: `same` must be identical
    metadata: Any = None
    same: types.CodeType | None = None          # DUPLICATE_INPUT: the other source


def _owned(name: str) -> bool:
    """The source is the step object or a module global, and no other frame local (those change per step)."""
    frame_locals = set(_LOCAL.findall(name))
    return bool(name) and frame_locals <= {"self"} and (bool(frame_locals) or name.startswith("G["))


def _same_value(now: Any, guarded: Any) -> bool:
    return now is guarded or (type(now) is type(guarded) and type(now) in (dict, int, float, str, bool, tuple)
                              and now == guarded)


class StepGuards:
    """The guards taken over from dynamo for one compiled step code object (one model)."""

    def __init__(self, fn_globals: dict[str, Any]) -> None:
        self.fn_globals = fn_globals
        self.deferred: list[_Deferred] = []
        self.kept = 0               # guards left to dynamo, in the last compilation of this code
        self._seen: set[tuple[str, str]] = set()   # a recompile (new batch size) hands over the same guards again

    def _namespace(self, step: Any) -> dict[str, Any]:
        return {"L": {"self": step}, "G": self.fn_globals}

    def filter(self, step: Any, entries: Sequence[Any]) -> list[bool]:
        """guard_filter_fn: True keeps a guard in dynamo (checked every step), False hands it to `failure`."""
        namespace = self._namespace(step)
        keep = []
        for entry in entries:
            deferred = self._take(entry, namespace)
            keep.append(deferred is None)
            if deferred is not None and (deferred.kind, deferred.name) not in self._seen:
                self._seen.add((deferred.kind, deferred.name))
                self.deferred.append(deferred)
        self.kept = sum(keep)
        logger.info("compiled decode step: %d of %d dynamo guards checked once per generate call, %d per step",
                    len(keep) - sum(keep), len(keep), sum(keep))
        return keep

    def _take(self, entry: Any, namespace: dict[str, Any]) -> _Deferred | None:
        guard, kind = entry.orig_guard, entry.guard_type
        if not _owned(guard.name):
            return None
        source = _compile(guard.name)
        if kind == "DUPLICATE_INPUT":   # dynamo has no value spec for it: two sources that must stay one object
            other = getattr(getattr(guard.create_fn, "keywords", {}).get("source_b"), "name", "")
            same = _compile(other) if _owned(other) else None
            if source is None or same is None or _resolve(source, namespace) is not _resolve(same, namespace):
                return None
            return _Deferred(kind, guard.name, source, None, same=same)
        spec = GUARD_VALUE_DISPATCH.get(kind) if GUARD_VALUE_DISPATCH is not None else None
        if source is None or not isinstance(spec, GuardCheckSpec) or not entry.has_value:
            return None
        value = _resolve(source, namespace)
        if not _same_value(value, entry.value):     # (a source that does not resolve gives a fresh object)
            return None
        metadata = spec.get_metadata_fn(guard, value)
        if not spec.eval_fn(value, metadata):
            return None
        return _Deferred(kind, guard.name, source, spec.eval_fn, metadata)

    def failure(self, step: Any) -> str | None:
        """The first guard taken over that no longer holds for `step` ("KIND on SOURCE"); None if all hold."""
        namespace = self._namespace(step)
        for d in self.deferred:
            try:
                value = eval(d.source, namespace)
                holds = d.check(value, d.metadata) if d.check is not None else value is eval(d.same, namespace)
            except _UNRESOLVED:
                holds = False
            if not holds:
                return f"{d.kind} on {d.name}"
        return None


def _compile(expression: str) -> types.CodeType | None:
    try:
        return compile(expression, "<dynamo guard source>", "eval")
    except SyntaxError:          # dynamo's names are Python expressions for the sources it guards; not always
        return None


def _resolve(code: types.CodeType, namespace: dict[str, Any]) -> Any:
    try:
        return eval(code, namespace)
    except _UNRESOLVED:
        return object()          # identical to nothing, not even another source that failed


@dataclass
class StepCode:
    """A copy of the step function with its own code object (dynamo's graph cache) and the guards it took over."""

    function: types.FunctionType
    guards: StepGuards

    def guard_filter(self, step: Any) -> Callable[[Sequence[Any]], list[bool]]:
        return functools.partial(self.guards.filter, step)


_CODES: weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, StepCode]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def step_code(model: torch.nn.Module, key: Any, template: types.FunctionType, step: Any) -> StepCode:
    """The model's compiled-step code for `key`, checked against `step`; a fresh copy if a guard taken over failed."""
    with _LOCK:
        codes = _CODES.setdefault(model, {})
        current = codes.get(key)
        if current is not None:
            failed = current.guards.failure(step)
            if failed is None:
                return current
            logger.info("compiled decode step: %s no longer holds (the model or a module global changed since the "
                        "step was compiled); compiling it again", failed)
        function = types.FunctionType(template.__code__.replace(), template.__globals__, template.__name__,
                                      template.__defaults__, template.__closure__)
        codes[key] = StepCode(function, StepGuards(template.__globals__))
        return codes[key]
