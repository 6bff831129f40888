"""int8 / int4 checkpoints on disk, in compressed-tensors' `pack-quantized` layout (what vLLM reads), and the one
place that translates between it and the formats dsv3 holds in memory (dsv3.quant.int_formats).

What is stored, per quantised linear `X` (checkpoint names: routed experts per expert, `...experts.E.gate_proj`):

    int4   Int4Grouped: groups of G inputs, asymmetric, integer zero point     W[r, c] = (q - zp) · s
        X.weight_packed      int32 [out, ceil(in/8)]   8 values per word: column 8j+i in bits 4i..4i+3, as q + 8
        X.weight_scale       bf16  [out, in/G]         s per group
        X.weight_zero_point  int32 [ceil(out/8), in/G] zp packed the same way along the rows (dim 0), as zp + 8
        X.weight_shape       int64 [2]                 (out, in)
                             (q, zp in -8..7; a symmetric checkpoint from elsewhere has no zero point: zp = 0)
    int8   Int8PerChannel: symmetric, one scale per output channel             W[r, c] = q · s
        X.weight_packed      int32 [out, ceil(in/4)]   4 values per word: column 4j+i in bits 8i..8i+7, as q + 128
        X.weight_scale       fp32  [out, 1]
        X.weight_shape       int64 [2]
    everything else          as a plain tensor: embeddings, norms, the fp32 router, a head tied to the embedding

    config.json  "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                 "quantization_status": "compressed", "config_groups": {"group_0": {"targets": [...],
                 "weights": {"num_bits": 4, "type": "int", "symmetric": false, "strategy": "group",
                 "group_size": 128, ...}, "input_activations": null, ...}, "group_1": {... int8 "channel" ...}},
                 "ignore": ["re:.*mlp\\.gate$", ...]}; targets are "re:" patterns over module names
                 (`re:^model\\.layers\\.\\d+\\.mlp\\.experts\\.\\d+\\.gate_proj$`) or exact names.

Exactness: dsv3's int4 zero points are on the integer grid (intq.quantize_int4_integer_zero) with bf16 scales,
so memory -> disk -> memory gives back the very tensors (a zero point off the grid is an error, never rounded).

Memory <-> disk goes through a layout-free `IntWeights` (codes, scale, zero point as plain tensors): the in-memory
packing is read and written only by `held_to_canonical` / `canonical_to_held` / `quantized_rows` (rows of it,
for quantising while loading), the disk packing only by `to_disk` / `from_disk`, so a change of either layout
touches those functions only.

`load_quantized` is the loader for such a checkpoint (from_pretrained detects it by its quantization_config):
the meta model holds the formats the config names, plain tensors load as usual, quantised ones are unpacked
one expert at a time into their final tensors — nothing is re-quantised.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsv3.checkpoint.errors import CheckpointError
from dsv3.checkpoint.keys import is_mtp_key, per_expert_keys, piece_views, plan_load, to_checkpoint_name
from dsv3.checkpoint.quantize import int4_format
from dsv3.checkpoint.safetensors_io import CheckpointReader
from dsv3.config import DeepseekV3Config
from dsv3.model.moe import RoutedExperts
from dsv3.model.weights import Linear, hold_formats
from dsv3.quant import intq
from dsv3.quant.formats import WeightFormat
from dsv3.quant.int_formats import Int4Grouped, Int8PerChannel

logger = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
ROUTER_IGNORE = r"re:.*mlp\.gate$"          # the router stays fp32 (numerics policy); named so no reader quantises it


# -- the layout-free form ---------------------------------------------------------------------------------------
@dataclass
class IntWeights:
    """One quantised matrix [out, in] (or a stack [E, out, in]) unpacked: W = (q - zp)·s (int4), q·s (int8).

    int4: q uint8 codes 0..15 (compressed-tensors' signed value + 8), scale bf16 [.., out, in/G], zero_point
          uint8 0..15 (signed + 8) [.., out, in/G]
    int8: q int8 -128..127, scale fp32 [.., out], zero_point None
    """

    bits: int
    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None

    def rows(self, r0: int, r1: int) -> IntWeights:
        """Rows [r0, r1) of a matrix (gate or up of an expert's gate_up rows)."""
        return IntWeights(self.bits, self.q[..., r0:r1, :], self.scale[..., r0:r1, :] if self.bits == 4 else
                          self.scale[..., r0:r1], None if self.zero_point is None else self.zero_point[..., r0:r1, :])

    @staticmethod
    def cat(parts: list[IntWeights]) -> IntWeights:
        """Rows of several matrices, one after the other (an expert's gate and up rows)."""
        if len(parts) == 1:
            return parts[0]
        zps = [p.zero_point for p in parts]
        return IntWeights(parts[0].bits, torch.cat([p.q for p in parts], -2),
                          torch.cat([p.scale for p in parts], -2 if parts[0].bits == 4 else -1),
                          None if zps[0] is None else torch.cat(zps, -2))   # type: ignore[arg-type]


# -- memory layout <-> layout-free (the only code that reads or writes dsv3's in-memory packing) ----------------
def held_to_canonical(fmt: WeightFormat, module: nn.Module, name: str, expert: int | None = None) -> IntWeights:
    """The weight `name` held by `module` in `fmt` (one expert's matrix when `expert` is given), unpacked.
    int4 zero points must lie on the integer grid; one that does not is a ValueError (it cannot be stored)."""
    tensors = [getattr(module, t) for t in fmt.tensor_names(name)]
    if expert is not None:
        tensors = [t[expert] for t in tensors]
    if isinstance(fmt, Int8PerChannel):
        q, scale = tensors                                                 # int8 [.., out, in], fp32 [.., out]
        return IntWeights(8, q, scale)
    if not isinstance(fmt, Int4Grouped):
        raise TypeError(f"{name}: {fmt} is not an integer format")
    packed, sz = tensors                                                   # [.., out, in/2], [.., in/G, out, 2]
    codes = intq.unpack_cpu(packed) if fmt.layout == "cpu" else intq.unpack_rows(packed)   # [.., out, in]
    sz = sz.transpose(-3, -2)                                              # [.., out, in/G, 2]
    scale, zero = sz[..., 0], sz[..., 1]
    zp = (intq.INT4_MID - torch.round(zero.float() / scale.float())).clamp_(0, 15)
    if not torch.equal(_int4_zero(scale, zp), zero):
        raise ValueError(f"{name}: int4 zero points off the integer grid ({fmt}); compressed-tensors stores integer "
                         "zero points — quantise with Int4Grouped(integer_zero=True), as from_pretrained("
                         "quantization='int4') does")
    return IntWeights(4, codes, scale.contiguous(), zp.to(torch.uint8))


def quantized_rows(fmt: WeightFormat, tensors: list[torch.Tensor], expert: int | None, r0: int,
                   r1: int) -> list[torch.Tensor]:
    """Views of the held `tensors` (fmt.tensor_names order) that hold rows [r0, r1) of one matrix (of expert
    `expert` of a stack); for the "cpu" int4 packing r0 and r1 are multiples of its 64-row blocks."""
    ts = [t if expert is None else t[expert] for t in tensors]
    if isinstance(fmt, Int8PerChannel):
        q, scale = ts                                                      # [out, in], [out]
        return [q[r0:r1], scale[r0:r1]]
    assert isinstance(fmt, Int4Grouped), fmt
    packed, sz = ts                                                        # [out, in/2], [in/G, out, 2]
    return [packed[r0:r1], sz[:, r0:r1]]


def canonical_to_held(fmt: WeightFormat, w: IntWeights) -> tuple[torch.Tensor, ...]:
    """The tensors `fmt` holds for `w`, in the order of fmt.tensor_names — exactly what fmt.adopt makes."""
    if isinstance(fmt, Int8PerChannel):
        if w.bits != 8:
            raise CheckpointError(f"an int{w.bits} weight cannot be held as {fmt}")
        return w.q.contiguous(), w.scale.float().contiguous()
    assert isinstance(fmt, Int4Grouped) and w.bits == 4 and w.zero_point is not None, (fmt, w.bits)
    packed = intq.pack_cpu(w.q) if fmt.layout == "cpu" else intq.pack_rows(w.q)        # [.., out, in/2]
    zero = _int4_zero(w.scale, w.zero_point.float())
    sz = torch.stack((w.scale, zero), dim=-1).transpose(-3, -2).contiguous()            # [.., in/G, out, 2] bf16
    return packed.contiguous(), sz


def _int4_zero(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """The bf16 zero held in memory for scale s (bf16) and integer zero point zp: (8 - zp)·s, as
    intq.quantize_int4_integer_zero computes it (fp32) and the format rounds it (bf16)."""
    return ((intq.INT4_MID - zp) * scale.float()).to(torch.bfloat16)


# -- layout-free <-> disk (compressed-tensors pack-quantized; the only code that reads or writes it) -----------
def _pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] uint8 values < 2^bits -> int32 [R, ceil(C·bits/32)]: value j of a word in bits j·bits.. (little
    endian words, as safetensors stores them; padding values are 0)."""
    per_word = 32 // bits
    pad = -values.shape[-1] % per_word
    if pad:
        values = torch.cat((values, values.new_zeros(values.shape[0], pad)), dim=-1)
    data = intq.pack_rows(values) if bits == 4 else values               # [R, C'/2] or [R, C'] bytes
    return data.reshape(-1).view(torch.int32).view(values.shape[0], -1)     # (flat: a size-1 dim has any stride)


def _unpack_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `_pack_words`: int32 [R, W] -> uint8 [R, count]."""
    data = words.reshape(-1).view(torch.uint8).view(words.shape[0], -1)   # [R, 4W]
    values = intq.unpack_rows(data) if bits == 4 else data
    return values[:, :count]


def to_disk(module: str, w: IntWeights) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of matrix `module` ([out, in]): {"module.weight_packed": ..., ...}."""
    out, cols = w.q.shape
    shape = torch.tensor([out, cols], dtype=torch.int64)
    if w.bits == 8:
        values = (w.q.to(torch.int16) + 128).to(torch.uint8)
        return {f"{module}.weight_packed": _pack_words(values, 8), f"{module}.weight_scale": w.scale.float()[:, None],
                f"{module}.weight_shape": shape}
    assert w.zero_point is not None
    zp_t = _pack_words(w.zero_point.t().contiguous(), 4)                   # [in/G, ceil(out/8)]
    return {f"{module}.weight_packed": _pack_words(w.q, 4), f"{module}.weight_scale": w.scale,
            f"{module}.weight_zero_point": zp_t.t().contiguous(), f"{module}.weight_shape": shape}


def disk_shapes(module: str, bits: int, out: int, cols: int, group_size: int | None
                ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{key: (dtype, shape)} of what `to_disk` writes for an [out, cols] matrix — known before quantising."""
    per_word = 32 // bits
    shapes = {f"{module}.weight_packed": (torch.int32, (out, -(-cols // per_word))),
              f"{module}.weight_shape": (torch.int64, (2,))}
    if bits == 8:
        shapes[f"{module}.weight_scale"] = (torch.float32, (out, 1))
    else:
        assert group_size is not None
        shapes[f"{module}.weight_scale"] = (torch.bfloat16, (out, cols // group_size))
        shapes[f"{module}.weight_zero_point"] = (torch.int32, (-(-out // 8), cols // group_size))
    return shapes


def from_disk(module: str, scheme: Scheme, read: Any, keys: set[str], where: str,
              shape_of: Any = None, rows: tuple[int, int] | None = None) -> IntWeights:
    """Matrix `module` (rows [r0, r1) of it when `rows` is given) from its checkpoint tensors: `read(key)`, or
    `read(key, (r0, r1))` for rows of a tensor; `shape_of(key)` gives stored shapes without reading (default:
    the shapes of what is read). Every shape and dtype is checked."""
    def get(suffix: str, part: tuple[int, int] | None = None) -> torch.Tensor:
        key = f"{module}.{suffix}"
        if key not in keys:
            raise CheckpointError(f"{where}: {key} is missing; a {scheme} weight needs "
                                  f"{', '.join(s for s in SUFFIXES if scheme.bits == 4 or s != 'weight_zero_point')}")
        return read(key) if part is None else read(key, part)

    shape_t = get("weight_shape")
    if shape_t.numel() != 2 or shape_t.dtype.is_floating_point:
        raise CheckpointError(f"{where}: {module}.weight_shape is {shape_t.tolist()}; expected the two ints (out, in)")
    out, cols = (int(v) for v in shape_t.tolist())
    r0, r1 = rows or (0, out)
    z0, z1 = r0 // 8, -(-r1 // 8)                                          # zero-point words: 8 rows each
    want = disk_shapes(module, scheme.bits, out, cols, scheme.group_size)
    parts = {"weight_packed": (r0, r1), "weight_scale": (r0, r1)}
    if scheme.bits == 4 and not scheme.symmetric:
        parts["weight_zero_point"] = (z0, z1)
    tensors = {}
    for suffix, part in parts.items():
        t = get(suffix, part if rows is not None else None)
        dtype, shape = want[f"{module}.{suffix}"]
        stored = tuple(shape_of(f"{module}.{suffix}")) if shape_of is not None else tuple(t.shape)
        ok_dtype = t.dtype == dtype if suffix != "weight_scale" else t.dtype.is_floating_point
        if stored != shape and not (suffix == "weight_scale" and scheme.bits == 8 and stored == (out,)):
            raise CheckpointError(f"{where}: {module}.{suffix} has shape {stored} but weight_shape "
                                  f"{(out, cols)} with {scheme} needs {shape}")
        if not ok_dtype:
            raise CheckpointError(f"{where}: {module}.{suffix} is {t.dtype}; compressed-tensors stores it as {dtype}")
        tensors[suffix] = t
    bits, n = scheme.bits, r1 - r0
    values = _unpack_words(tensors["weight_packed"], bits, cols)          # [n, in] uint8
    if bits == 8:
        return IntWeights(8, (values.to(torch.int16) - 128).to(torch.int8), tensors["weight_scale"].float().view(n))
    if "weight_zero_point" in tensors:
        zp = _unpack_words(tensors["weight_zero_point"].t(), 4, (z1 - z0) * 8).t()[r0 - 8 * z0: r1 - 8 * z0]
    else:                                                                  # symmetric: zero point 0 (+ 8)
        zp = torch.full((n, cols // scheme.group_size), intq.INT4_MID, dtype=torch.uint8)   # type: ignore[operator]
    return IntWeights(4, values, tensors["weight_scale"].to(torch.bfloat16), zp.contiguous())


# -- schemes and quantization_config -------------------------------------------------------------------------
@dataclass(frozen=True)
class Scheme:
    """A compressed-tensors weight scheme dsv3 holds: int8 per channel (symmetric), or int4 per group."""

    bits: int
    group_size: int | None = None           # None: per output channel
    symmetric: bool = True

    def __str__(self) -> str:
        return (f"int{self.bits} " + (f"group {self.group_size}" if self.group_size else "per channel")
                + ("" if self.symmetric else " asymmetric"))

    def weights(self) -> dict[str, Any]:
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                "strategy": "group" if self.group_size else "channel", "group_size": self.group_size,
                "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
                "observer_kwargs": {}}


def scheme_of(fmt: WeightFormat) -> Scheme:
    if isinstance(fmt, Int8PerChannel):
        return Scheme(8)
    assert isinstance(fmt, Int4Grouped), fmt
    return Scheme(4, fmt.group_size, symmetric=False)


def _pattern(name: str) -> str:
    """model.layers.3.mlp.experts.17.gate_proj -> re:^model\\.layers\\.\\d+\\.mlp\\.experts\\.\\d+\\.gate_proj$"""
    return "re:^" + r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in name.split(".")) + "$"


def targets_of(names: dict[str, Scheme]) -> dict[Scheme, list[str]]:
    """Targets per scheme for {module: scheme}: one pattern per module name with its numbers generalised when
    every module it covers has the same scheme, else the exact names (a V3 config stays a few lines long)."""
    by_pattern: dict[str, set[Scheme]] = {}
    for name, scheme in names.items():
        by_pattern.setdefault(_pattern(name), set()).add(scheme)
    out: dict[Scheme, list[str]] = {}
    for name, scheme in names.items():
        pattern = _pattern(name)
        target = pattern if len(by_pattern[pattern]) == 1 else name
        if target not in out.setdefault(scheme, []):
            out[scheme].append(target)
    return out


def build_config(names: dict[str, Scheme], ignore: Iterable[str] = ()) -> dict[str, Any]:
    """config.json's quantization_config for modules {checkpoint module name: scheme}."""
    groups = {f"group_{i}": {"targets": targets, "weights": scheme.weights(), "input_activations": None,
                             "output_activations": None, "format": FORMAT}
              for i, (scheme, targets) in enumerate(sorted(targets_of(names).items(), key=lambda kv: -kv[0].bits))}
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": [ROUTER_IGNORE, *ignore], "kv_cache_scheme": None,
            "sparsity_config": {}, "global_compression_ratio": None}


def is_quantized_checkpoint(config: DeepseekV3Config) -> bool:
    q = config.quantization_config
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


@dataclass(frozen=True)
class Schemes:
    """A parsed quantization_config: which scheme (if any) each checkpoint module name has."""

    groups: tuple[tuple[Scheme, tuple[str, ...]], ...]
    ignore: tuple[str, ...]

    @staticmethod
    def _matches(target: str, name: str) -> bool:
        return re.match(target[3:], name) is not None if target.startswith("re:") else target == name

    def of(self, name: str) -> Scheme | None:
        if any(self._matches(t, name) for t in self.ignore):
            return None
        for scheme, targets in self.groups:
            if any(self._matches(t, name) for t in targets):
                return scheme
        return None

    @property
    def kind(self) -> str:
        """"int4" when any weight is 4-bit (the heads int8 unless converted with --quantize-head int4), else
        "int8"."""
        return "int4" if any(s.bits == 4 for s, _ in self.groups) else "int8"


def parse_config(cfg: Any) -> Schemes:
    """compressed-tensors quantization_config -> Schemes; anything dsv3 cannot hold is a CheckpointError."""
    where = "config.json: quantization_config"
    if not isinstance(cfg, dict) or cfg.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where} is not a compressed-tensors config: {cfg!r}")
    groups = []
    for gname, group in (cfg.get("config_groups") or {}).items():
        fmt = group.get("format") or cfg.get("format")
        w = group.get("weights") or {}
        if fmt != FORMAT:
            raise CheckpointError(f"{where}.config_groups.{gname}: format {fmt!r} is not supported; dsv3 reads "
                                  f"{FORMAT!r} (int4/int8 weights packed into int32)")
        if group.get("input_activations") or group.get("output_activations"):
            raise CheckpointError(f"{where}.config_groups.{gname}: quantised activations are not supported; dsv3 "
                                  "reads weight-only schemes (input_activations: null)")
        bits, strategy, gs = w.get("num_bits"), w.get("strategy"), w.get("group_size")
        sym = w.get("symmetric", True)
        ok = w.get("type", "int") == "int" and not w.get("actorder") and (
            (bits == 8 and strategy == "channel" and sym) or
            (bits == 4 and strategy == "group" and gs in intq.INT4_GROUP_SIZES))
        if not ok:
            raise CheckpointError(
                f"{where}.config_groups.{gname}.weights = {w!r} is not supported; dsv3 holds int8 per channel "
                f"(symmetric) and int4 per group of {intq.INT4_GROUP_SIZES} inputs, without activation ordering")
        targets = group.get("targets") or []
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise CheckpointError(f"{where}.config_groups.{gname}.targets = {targets!r}: expected a list of module "
                                  "names, 're:' patterns or 'Linear'")
        # the class target "Linear": every linear layer that the ignore list and earlier groups leave
        groups.append((Scheme(bits, gs if bits == 4 else None, bool(sym)),
                       tuple("re:.*" if t == "Linear" else t for t in targets)))
    if not groups:
        raise CheckpointError(f"{where} has no config_groups; nothing says how the weights are stored")
    return Schemes(tuple(groups), tuple(cfg.get("ignore") or ()))


# -- formats for the meta model ------------------------------------------------------------------------------
def format_for(scheme: Scheme, out: int, cols: int, device: torch.device, where: str) -> WeightFormat:
    if scheme.bits == 8:
        return Int8PerChannel()
    assert scheme.group_size is not None
    if cols % scheme.group_size:
        raise CheckpointError(f"{where}: {cols} inputs are not a multiple of group_size={scheme.group_size}")
    return int4_format(out, scheme.group_size, device)


def _expert_modules(prefix: str, stack: str, num_experts: int) -> list[list[str]]:
    """Checkpoint module names (no `.weight`) of a stack, per expert in row order."""
    return [[k.removesuffix(".weight") for k in group] for group in per_expert_keys(prefix, stack, num_experts)]


@dataclass
class _Quantised:
    """One quantised tensor of the model: `module.name` held in `fmt`, read from checkpoint `pieces`."""

    module: nn.Module
    name: str
    fmt: WeightFormat
    pieces: list[list[str]]          # per expert (one entry for a linear), the checkpoint modules in row order
    scheme: Scheme


def plan_formats(model: nn.Module, schemes: Schemes, prefix: str, config: DeepseekV3Config,
                 device: torch.device) -> list[_Quantised]:
    """Hold every module the config quantises in its format (on the meta model); returns what to read."""
    n_layers = config.num_hidden_layers
    found: dict[str, tuple[Any, list[list[list[str]]], list[Scheme]]] = {}

    def ckpt(mod_name: str) -> str:
        return to_checkpoint_name(prefix + f"{mod_name}.weight", n_layers).removesuffix(".weight")

    def choose(mod_name: str, module: nn.Module) -> Any:
        if isinstance(module, RoutedExperts):
            base = ckpt(mod_name)
            fmts, pieces, chosen = [], [], []
            for stack, (out, cols) in (("gate_up_proj", (2 * module.intermediate, module.hidden)),
                                       ("down_proj", (module.hidden, module.intermediate))):
                names = _expert_modules(base, stack, module.num_experts)
                found_schemes = {schemes.of(n) for group in names for n in group}
                if found_schemes == {None}:
                    return None
                if len(found_schemes) != 1:
                    raise CheckpointError(f"config.json: the experts of {base} ({stack}) mix schemes "
                                          f"{sorted(map(str, found_schemes))}; dsv3 holds each stack in one format")
                scheme = found_schemes.pop()
                assert scheme is not None
                fmts.append(format_for(scheme, out, cols, device, f"{base}.{stack}"))
                pieces.append(names)
                chosen.append(scheme)
            found[mod_name] = (tuple(fmts), pieces, chosen)
            return tuple(fmts)
        name = ckpt(mod_name)
        scheme = schemes.of(name)
        if scheme is None:
            return None
        fmt = format_for(scheme, module.out_features, module.in_features, device, name)
        found[mod_name] = (fmt, [[[name]]], [scheme])
        return fmt

    hold_formats(model, choose)
    plan = []
    for mod_name, (fmts, pieces, chosen) in found.items():
        module = model.get_submodule(mod_name)
        if isinstance(module, RoutedExperts):
            for stack, fmt, names, scheme in zip(("gate_up_proj", "down_proj"), fmts, pieces, chosen, strict=True):
                plan.append(_Quantised(module, stack, fmt, names, scheme))
        else:
            plan.append(_Quantised(module, "weight", fmts, pieces[0], chosen[0]))
    return plan


def load_quantized(cls: type, reader: CheckpointReader, config: DeepseekV3Config, dtype: torch.dtype,
                   device: torch.device, quantization: str | None = None, load_mtp: bool | None = None,
                   strict: bool = True, progress: bool = False, head_quantization: str | None = None) -> nn.Module:
    """from_pretrained for a compressed-tensors int8/int4 checkpoint (see the module docstring): no re-quantising.
    `quantization` / `head_quantization`, when given, must say what the checkpoint holds."""
    from dsv3.checkpoint.loader import FP32_TENSORS, _check_plan, _finish, _load_targets, _param_owner

    schemes = parse_config(config.quantization_config)
    if quantization is not None and quantization != schemes.kind:
        raise ValueError(f"quantization={quantization!r}, but {reader.directory} is already quantised "
                         f"({schemes.kind}, compressed-tensors); load it without quantization= (or with "
                         f"quantization={schemes.kind!r})")
    head = schemes.of("lm_head")
    stored_head = "as stored (not quantised)" if head is None else f"int{head.bits}"
    if head_quantization is not None and stored_head != head_quantization:
        raise ValueError(f"head_quantization={head_quantization!r}, but the LM head in {reader.directory} is "
                         f"{stored_head}; load it without head_quantization= (a stored head is held as it is)")
    keys = set(reader.keys())
    n_layers = config.num_hidden_layers
    with torch.device("meta"):
        model = cls(config)
    prefix = "model." if not hasattr(model, "lm_head") and "model.embed_tokens.weight" in keys else ""
    has_mtp = any(is_mtp_key(k, n_layers) for k in keys)
    wants_mtp = any(to_checkpoint_name(n, n_layers) != n for n in _load_targets(model))
    if load_mtp and not has_mtp:
        raise CheckpointError(f"{reader.directory}: load_mtp=True but the checkpoint has no MTP weights "
                              f"(model.layers.{n_layers}.*); pass load_mtp=None to load without them")
    if wants_mtp and (load_mtp is False or not has_mtp):
        with torch.device("meta"):
            model = cls(config, mtp=False)
    plan = plan_formats(model, schemes, prefix, config, device)
    held = {id(q.module): set() for q in plan}
    for q in plan:
        held[id(q.module)].update(q.fmt.tensor_names(q.name))
    quant_keys = {f"{m}.{s}" for q in plan for group in q.pieces for m in group for s in SUFFIXES}
    plain = {to_checkpoint_name(prefix + n, n_layers): n for n, t in _load_targets(model).items()
             if n.rpartition(".")[2] not in held.get(id(model.get_submodule(n.rpartition(".")[0])), ())}
    load_plan = plan_load(list(plain), keys - quant_keys, n_layers, config.n_routed_experts)
    if prefix:
        load_plan.unexpected = [k for k in load_plan.unexpected if k != "lm_head.weight"]
    _check_plan(load_plan, reader, strict)
    targets = _load_targets(model)
    total = len(load_plan.sources) + len(plan)
    with tqdm(total=total, desc="Loading quantised weights", disable=not progress) as bar, torch.no_grad():
        for ckpt_name, source in load_plan.sources.items():
            name = plain[ckpt_name]
            expected = targets[name]
            for key in source.keys():
                if not reader.dtype(key).is_floating_point:
                    raise CheckpointError(f"{reader.file_of(key)}: tensor {key} is {reader.dtype(key)} but {name} is "
                                          "not a quantised weight in quantization_config; check its config_groups")
            out = torch.empty(expected.shape, device=device,
                              dtype=torch.float32 if name.endswith(FP32_TENSORS) else dtype)
            for key, view in piece_views(source, out):
                view.copy_(reader.read(key).view(view.shape))
            owner, attr = _param_owner(model, name)
            if isinstance(expected, nn.Parameter):
                owner._parameters[attr] = nn.Parameter(out, requires_grad=expected.requires_grad)
            else:
                owner._buffers[attr] = out
            bar.update()
        for q in plan:
            _load_one(q, reader, keys, device)
            bar.update()
    _finish(model, config, device)
    model.eval()
    logger.info("%s: %d tensors held as stored (%s, compressed-tensors), %d plain", reader.directory, len(plan),
                schemes.kind, len(load_plan.sources))
    return model


def _where(reader: CheckpointReader, keys: set[str], module: str) -> str:
    key = f"{module}.weight_packed"
    return str(reader.file_of(key)) if key in keys else str(reader.directory)


def _load_one(q: _Quantised, reader: CheckpointReader, keys: set[str], device: torch.device) -> None:
    """Fill `q.module`'s tensors for `q.name` from the checkpoint, in chunks of whole rows (of one expert's gate
    and up rows, or of the matrix): only those rows are read, unpacked and packed in memory's layout."""
    from dsv3.checkpoint.quantize import LOAD_CHUNK_ELEMENTS, ROW_ALIGN

    names = q.fmt.tensor_names(q.name)
    metas = [getattr(q.module, t) for t in names]
    stacked = isinstance(q.module, RoutedExperts)
    finals = [torch.empty(m.shape, dtype=m.dtype, device=device) for m in metas]

    def read(key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return reader.read(key, rows=rows)

    for e, group in enumerate(q.pieces):
        for m in group:
            if f"{m}.weight_shape" not in keys:
                raise CheckpointError(f"{reader.directory}: {m}.weight_shape is missing; a {q.scheme} weight needs "
                                      f"{', '.join(s for s in SUFFIXES if q.scheme.bits == 4 or 'zero' not in s)}")
        shapes = [tuple(read(f"{m}.weight_shape").tolist()) for m in group]
        total, cols = sum(sh[0] for sh in shapes), shapes[0][1]
        if total != metas[0].shape[-2]:
            raise CheckpointError(f"{_where(reader, keys, group[0])}: {', '.join(group)} hold {total} rows "
                                  f"(weight_shape) but the config implies {q.name} {tuple(metas[0].shape)}; check "
                                  "that config.json belongs to these weights")
        step = max(ROW_ALIGN, LOAD_CHUNK_ELEMENTS // max(cols, 1) // ROW_ALIGN * ROW_ALIGN)
        for r0 in range(0, total, step):
            r1, parts, start = min(total, r0 + step), [], 0
            for m, sh in zip(group, shapes, strict=True):
                a, b = max(r0, start), min(r1, start + sh[0])
                if a < b:
                    parts.append(from_disk(m, q.scheme, read, keys, _where(reader, keys, m), reader.shape,
                                           (a - start, b - start)))
                start += sh[0]
            held = canonical_to_held(q.fmt, IntWeights.cat(parts))
            for final, t in zip(quantized_rows(q.fmt, finals, e if stacked else None, r0, r1), held, strict=True):
                if final.shape != t.shape:
                    raise CheckpointError(f"{group[0]}: stored as {t.shape} in memory's layout but the config "
                                          f"implies {q.name} {tuple(metas[0].shape)}; check that config.json "
                                          "belongs to these weights")
                final.copy_(t)
    for final, meta_t, tname in zip(finals, metas, names, strict=True):
        if isinstance(meta_t, nn.Parameter):
            q.module._parameters[tname] = nn.Parameter(final, requires_grad=False)
        else:
            q.module._buffers[tname] = final


# -- writing: a held model, and one dense matrix (dsv3 convert) ----------------------------------------------
def int_modules(model: nn.Module) -> list[tuple[str, nn.Module, str, WeightFormat]]:
    """(module name, module, weight name, format) of every weight held in an integer format."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Linear) and isinstance(m.format, (Int8PerChannel, Int4Grouped)):
            out.append((name, m, "weight", m.format))
        elif isinstance(m, RoutedExperts):
            out.extend((name, m, s, f) for s, f in m.formats.items() if isinstance(f, (Int8PerChannel, Int4Grouped)))
    return out


def check_savable(model: nn.Module) -> None:
    """Before writing anything: every int4 weight has integer zero points (else ValueError naming it)."""
    for name, _, stack, fmt in int_modules(model):
        if isinstance(fmt, Int4Grouped) and not fmt.integer_zero:
            raise ValueError(f"save_pretrained: {name}.{stack} is held as {fmt}, whose zero points are not integers; "
                             "compressed-tensors cannot store it. Load with from_pretrained(quantization='int4') "
                             "(integer zero points) to save an int4 model")


def held_names(model: nn.Module) -> frozenset[str]:
    """Model tensor names of the integer weights (what the saver leaves to `export_quantized`)."""
    return frozenset(f"{name}.{t}" for name, _, stack, fmt in int_modules(model) for t in fmt.tensor_names(stack))


def export_quantized(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensors of every integer weight of `model`, in the disk layout, one expert at a time."""
    n_layers = model.config.num_hidden_layers  # type: ignore[attr-defined]
    for name, module, stack, fmt in int_modules(model):
        if isinstance(module, RoutedExperts):
            base = to_checkpoint_name(f"{name}.weight", n_layers).removesuffix(".weight")
            for e, group in enumerate(_expert_modules(base, stack, module.num_experts)):
                w = held_to_canonical(fmt, module, stack, expert=e)
                rows = w.q.shape[0] // len(group)
                for j, m in enumerate(group):
                    yield from to_disk(m, w.rows(j * rows, (j + 1) * rows)).items()
        else:
            m = to_checkpoint_name(f"{name}.weight", n_layers).removesuffix(".weight")
            yield from to_disk(m, held_to_canonical(fmt, module, stack)).items()


def config_of(model: nn.Module) -> dict[str, Any]:
    """quantization_config describing the integer weights `model` holds (and its plain linears as ignored)."""
    n_layers = model.config.num_hidden_layers  # type: ignore[attr-defined]
    names: dict[str, Scheme] = {}
    for name, module, stack, fmt in int_modules(model):
        base = to_checkpoint_name(f"{name}.weight", n_layers).removesuffix(".weight")
        if isinstance(module, RoutedExperts):
            names.update({m: scheme_of(fmt) for g in _expert_modules(base, stack, module.num_experts) for m in g})
        else:
            names[base] = scheme_of(fmt)
    ignore = [to_checkpoint_name(f"{n}.weight", n_layers).removesuffix(".weight") for n, m in model.named_modules()
              if type(m) is nn.Linear or (isinstance(m, Linear) and not isinstance(m.format, (Int8PerChannel,
                                                                                            Int4Grouped)))]
    return build_config(names, ignore)


def quantize_matrix(module: str, dense: torch.Tensor, fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one dense matrix [out, in] (fp32) quantised by `fmt.adopt` — the very code
    from_pretrained(quantization=...) runs, so a converted checkpoint loads as the quantised load would."""
    staging = replace(fmt, layout="rows") if isinstance(fmt, Int4Grouped) else fmt   # any row count; same codes
    holder = nn.Module()
    staging.adopt(holder, "weight", dense)
    return to_disk(module, held_to_canonical(staging, holder, "weight"))
