"""The explicit map between checkpoint tensor names and dsv3 parameters.

dsv3 parameters carry the Hugging Face names, with one difference: routed experts are stacked.

    checkpoint (per expert, hub + what transformers writes)      dsv3 parameter
    model.layers.N.mlp.experts.E.gate_proj.weight  [I, D]   ->   model.layers.N.mlp.experts.gate_up_proj [E, 2I, D]
    model.layers.N.mlp.experts.E.up_proj.weight    [I, D]   ->     (rows I..2I of expert E)
    model.layers.N.mlp.experts.E.down_proj.weight  [D, I]   ->   model.layers.N.mlp.experts.down_proj    [E, D, I]

The fused transformers-5 layout (`experts.gate_up_proj`, `experts.down_proj`) maps one to one.
FP8 checkpoints pair every quantised `X.weight` with `X.weight_scale_inv` (a fused `experts.gate_up_proj`
with `experts.gate_up_proj_scale_inv`). A model that holds FP8 weights (dsv3.quant.formats.Fp8Blocks) has those
scales as tensors of its own, stacked like the weights:

    model.layers.N.mlp.experts.E.{gate,up}_proj.weight_scale_inv [R, C]  ->  experts.gate_up_proj_scale_inv [E, 2R, C]
    model.layers.N.mlp.experts.E.down_proj.weight_scale_inv      [R, C]  ->  experts.down_proj_scale_inv    [E, R, C]

Tensors of layer index `num_hidden_layers` and above (`model.layers.61.*` in V3) belong to the MTP module.

Every transform is a named pure function of (checkpoint keys -> tensor); `plan_load` matches the
model's parameters against the checkpoint's keys and reports the missing and unexpected names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

SCALE_SUFFIX = "_scale_inv"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_STACKED_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<scale>_scale_inv)?$")


_MTP_PARAM_RE = re.compile(r"^mtp\.(\d+)\.")


def to_checkpoint_name(param_name: str, num_hidden_layers: int) -> str:
    """dsv3 name -> checkpoint name. MTP module k lives at `mtp.k.*` in dsv3 and at
    `model.layers.{num_hidden_layers + k}.*` in checkpoints (`model.layers.61.*` for V3)."""
    m = _MTP_PARAM_RE.match(param_name)
    if not m:
        return param_name
    return f"model.layers.{num_hidden_layers + int(m.group(1))}.{param_name[m.end():]}"


def layer_index(key: str) -> int | None:
    m = _LAYER_RE.match(key)
    return int(m.group(1)) if m else None


def is_mtp_key(key: str, num_hidden_layers: int) -> bool:
    idx = layer_index(key)
    return idx is not None and idx >= num_hidden_layers


def per_expert_keys(prefix: str, proj: str, num_experts: int, scale: bool = False) -> list[list[str]]:
    """Checkpoint keys that make up one stacked expert tensor (or its FP8 scales), per expert, in row order."""
    parts = ("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",)
    suffix = "weight" + SCALE_SUFFIX if scale else "weight"
    return [[f"{prefix}.{e}.{p}.{suffix}" for p in parts] for e in range(num_experts)]


@dataclass
class Source:
    """Where one dsv3 tensor comes from: `pieces[e]` are concatenated along dim 0 and stacked over e
    when `stacked`, otherwise `pieces == [[key]]`."""

    pieces: list[list[str]]
    stacked: bool = False

    def keys(self) -> Iterator[str]:
        for group in self.pieces:
            yield from group


@dataclass
class LoadPlan:
    sources: dict[str, Source] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mtp_keys: list[str] = field(default_factory=list)
    layouts: dict[str, str] = field(default_factory=dict)   # stacked param -> "fused" | "per_expert"


def plan_load(param_names: list[str], checkpoint_keys: set[str], num_hidden_layers: int,
              num_experts: int) -> LoadPlan:
    """Match tensor names (already in checkpoint spelling, see `to_checkpoint_name`) to checkpoint keys.

    MTP tensors (layer index >= num_hidden_layers) that the model has no place for are set aside in
    `mtp_keys`, not reported as unexpected: a checkpoint's MTP layer is optional for the main model.
    """
    plan = LoadPlan()
    used: set[str] = set()
    for name in param_names:
        m = _STACKED_RE.match(name)
        if name in checkpoint_keys:
            plan.sources[name] = Source([[name]])
            if m:
                plan.layouts[name] = "fused"
        elif m:
            pieces = per_expert_keys(m["prefix"], m["proj"], num_experts, scale=bool(m["scale"]))
            absent = [k for group in pieces for k in group if k not in checkpoint_keys]
            if absent:
                plan.missing.extend(absent if len(absent) < len(pieces) * len(pieces[0]) else [name])
                continue
            plan.sources[name] = Source(pieces, stacked=True)
            plan.layouts[name] = "per_expert"
        else:
            plan.missing.append(name)
            continue
        used.update(plan.sources[name].keys())
    for key in sorted(checkpoint_keys - used):
        if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in used:
            continue
        if is_mtp_key(key, num_hidden_layers):
            plan.mtp_keys.append(key)
            continue
        plan.unexpected.append(key)
    return plan


def piece_views(source: Source, out: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, the view of `out` it fills): `out` itself, or expert e's rows of a stacked tensor
    (each of an expert's pieces — gate, up — covers an equal share of its rows). Views of a contiguous
    `out` are contiguous, so a reader can copy file bytes straight into them."""
    if not source.stacked:
        yield source.pieces[0][0], out
        return
    for e, group in enumerate(source.pieces):
        rows = out.shape[1] // len(group)
        for j, key in enumerate(group):
            yield key, out[e, j * rows: (j + 1) * rows]


def assemble(source: Source, fetch: Callable[[str], torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Fill `out` from the checkpoint pieces of `source` (fetch returns one dequantised tensor)."""
    for key, view in piece_views(source, out):
        view.copy_(fetch(key))
    return out


def split_stacked(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The inverse of stacking, for saving in the per-expert layout that transformers reads."""
    m = _STACKED_RE.match(name)
    if not m:
        yield name, tensor
        return
    for e, group in enumerate(per_expert_keys(m["prefix"], m["proj"], tensor.shape[0], scale=bool(m["scale"]))):
        chunks = tensor[e].chunk(len(group), dim=0)
        yield from zip(group, chunks)
