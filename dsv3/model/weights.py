"""Layers whose weights are held in a weight format, and the calls that choose formats on a built model.

The model is written with `nn.Linear` (plain weights, stock PyTorch ops). A different weight format — FP8
blocks kept as stored, plain weights with CPU kernels, int8/int4 next — is a different object handed to the
layer (dsv3.quant.formats), never a `__class__` swapped on a live module:

    Linear(in, out, bias, format)     y = format.linear(x)      tensors named as the checkpoint names them
                                      matrix(dtype)             the dense [out, in] (MLA's absorbed kv_b_proj)
    RoutedExperts(config, gu, down)   (model/moe.py) experts through format.grouped / format.matrix

    hold_formats(model, choose)       at load time, on the meta device: `choose(name, module)` returns the
                                      format(s) for a layer stored differently (the loader's fp8="keep")
    use_kernels(model, kernels)       after load: every plain layer runs with `kernels` (None: stock ops)
    map_formats(model, fn)            any other per-format change, e.g. attaching a DequantStats counter

`weight_matrix(layer, dtype)` gives the dense matrix of an `nn.Linear` or a `Linear` alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from dsv3.model.moe import RoutedExperts
from dsv3.quant.formats import PLAIN, Kernels, Plain, WeightFormat, keep_fixed_dtypes

logger = logging.getLogger(__name__)


class Linear(nn.Module):
    """y = x·Wᵀ + b with W held in `format` (its tensors live here, under the names the format gives them)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 format: WeightFormat = PLAIN) -> None:  # noqa: A002 - the format of the weight
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format = format
        format.allocate(self, "weight", (out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear | Linear, format: WeightFormat) -> Linear:  # noqa: A002
        """`linear` held in `format`: empty on the meta device (the loader fills it); otherwise its weight is
        adopted — the very tensor for plain formats (ties survive), quantised for others."""
        with torch.device("meta"):     # nothing allocated here: the tensors are adopted (or the loader fills them)
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, format)
        if not linear.weight.is_meta:
            with torch.no_grad():
                current = linear.format if isinstance(linear, Linear) else PLAIN
                dense = linear.weight if isinstance(current, Plain) else linear.matrix(torch.float32)
                format.adopt(new, "weight", dense)
            new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.format.linear(self, "weight", x, self.bias)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] as a dense tensor for arithmetic in `dtype` (dequantised when the format is quantised)."""
        return self.format.matrix(self, "weight", dtype)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        return keep_fixed_dtypes(self, {"weight": self.format}, fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}")


def weight_matrix(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of an `nn.Linear` or a `Linear` in any format, for code that uses the matrix itself."""
    if isinstance(layer, Linear):
        return layer.matrix(dtype)
    return layer.weight  # type: ignore[return-value]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    owner_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, attr, new)


Chooser = Callable[[str, nn.Module], "WeightFormat | tuple[WeightFormat, WeightFormat] | None"]


def hold_formats(model: nn.Module, choose: Chooser) -> int:
    """For each linear layer and expert stack, `choose(module_name, module)` returns its format (a pair
    (gate_up, down) for expert stacks) or None to leave it. Meant for the meta model at load time; returns
    the number of layers changed."""
    changed = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, Linear)):
            fmt = choose(name, module)
            if fmt is not None:
                assert isinstance(fmt, WeightFormat), fmt
                _replace(model, name, Linear.from_linear(module, fmt))
                changed += 1
        elif isinstance(module, RoutedExperts):
            pair = choose(name, module)
            if pair is not None:
                module.set_formats(*pair)
                changed += 1
    return changed


def map_formats(model: nn.Module, fn: Callable[[WeightFormat], WeightFormat]) -> int:
    """Replace every layer's format f by fn(f), which must hold the same tensors (kernels, stats, tiling...).
    A plain `nn.Linear` counts as `Plain()` and becomes a `Linear` sharing its weight when fn changes that.
    Returns the number of layers whose format changed."""
    changed = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            fmt = fn(PLAIN)
            if fmt is not PLAIN:
                _check_same_storage(name, PLAIN, fmt)
                _replace(model, name, Linear.from_linear(module, fmt))
                changed += 1
        elif isinstance(module, Linear):
            fmt = fn(module.format)
            if fmt is not module.format:
                _check_same_storage(name, module.format, fmt)
                module.format = fmt
                changed += 1
        elif isinstance(module, RoutedExperts):
            new = {k: fn(f) for k, f in module.formats.items()}
            if any(new[k] is not f for k, f in module.formats.items()):
                for k, f in module.formats.items():
                    _check_same_storage(f"{name}.{k}", f, new[k])
                module.set_formats(new["gate_up_proj"], new["down_proj"])
                changed += 1
    return changed


def _check_same_storage(name: str, old: WeightFormat, new: WeightFormat) -> None:
    if old.storage() != new.storage():
        raise ValueError(f"{name}: map_formats turned a {type(old).__name__} format into {new}; it may only change "
                         "how a format computes (kernels, stats, tiles), not how weights are stored")


def hand_kernels(model: nn.Module, kind: type[nn.Module], kernels: object | None, what: str) -> int:
    """Set `kernels` as the `kernels` attribute of every `kind` module of `model` (None: their PyTorch path) —
    for the modules that ask kernels directly rather than through a weight format (MLA decode, RMSNorm). Logged;
    returns the number of modules."""
    modules = [m for m in model.modules() if isinstance(m, kind)]
    for module in modules:
        module.kernels = kernels
    logger.info("%s: %s for %d modules", what, type(kernels).__name__ if kernels else "PyTorch ops", len(modules))
    return len(modules)


def use_kernels(model: nn.Module, kernels: Kernels | None) -> int:
    """Hand `kernels` to every layer's format (formats without matching kernels keep their PyTorch path);
    `kernels=None` returns to stock PyTorch ops. Returns the number of layers changed."""
    changed = map_formats(model, lambda f: f.with_kernels(kernels))
    logger.info("%s for %d layers", f"kernels {type(kernels).__name__}" if kernels else "stock PyTorch ops", changed)
    return changed
