"""`kernel_op`: a C++ kernel as a torch custom op for compiled graphs, called directly in eager mode.

A compiled step needs the kernels as custom ops (dynamo traces them with their fake shapes, no graph break),
but an eager call through the custom-op dispatcher costs ~16 µs under `torch.no_grad()` against ~3.5 µs for
the direct call (measured on the bench machine, torch 2.13) — a decode step makes ~50 such calls. `kernel_op`
registers the op and returns a function that calls the op while dynamo traces and the implementation
otherwise; both run the same code, so the results are the same. The decode products (bf16, int8, int4, FP8)
and the MLA decode kernel are defined by their extensions in C++ (cpp=True), so that a compiled graph's C++
wrapper calls them without going through Python.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

_FAKES: dict[str, Callable[..., Any]] = {}   # fake implementations of C++-registered ops, not yet registered


def kernel_op(name: str, mutates_args: Iterable[str] = (),
              cpp: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """cpp=True: the extension registers the op itself (TORCH_LIBRARY_FRAGMENT, the schema's argument names
    those of the decorated function, which calls the same C++ function through pybind): a compiled graph then
    calls C++ straight from C++ — a Python custom op costs ~17 µs per call from an inductor C++ wrapper, a
    C++ one ~5 — and the fake implementation is registered when the extension is loaded (`register_fakes`)."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if cpp:
            namespace, short = name.split("::")

            @functools.wraps(fn)
            def call_cpp(*args: Any, **kwargs: Any) -> Any:
                if torch.compiler.is_compiling():
                    return getattr(getattr(torch.ops, namespace), short)(*args, **kwargs)
                return fn(*args, **kwargs)

            def register_fake(fake: Callable[..., Any]) -> Callable[..., Any]:
                _FAKES[name] = fake
                return fake

            call_cpp.register_fake = register_fake   # type: ignore[attr-defined]
            return call_cpp
        op = torch.library.custom_op(name, mutates_args=tuple(mutates_args))(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            return fn(*args, **kwargs)

        call.register_fake = op.register_fake   # type: ignore[attr-defined]
        call.op = op                            # type: ignore[attr-defined]
        return call

    return wrap


def register_fakes() -> None:
    """Register the fake implementations of the C++ ops that exist by now (called by each extension's loader
    once the extension is loaded: an op must be defined before its fake is registered)."""
    for name in list(_FAKES):
        namespace, short = name.split("::")
        if hasattr(getattr(torch.ops, namespace), short):
            torch.library.register_fake(name, _FAKES.pop(name))
