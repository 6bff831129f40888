"""`from_pretrained`: build on the meta device, check the whole checkpoint, then materialise each tensor
straight from the safetensors files into its final dtype and device — one copy of the weights, never two.

Two phases, so a bad checkpoint never yields a half-loaded model:

1. `prepare_load` (headers only, no tensor data read): config -> meta model; which checkpoint keys feed
   which tensor (keys.plan_load: per-expert or fused experts, MTP layer routing); missing and unexpected
   names; every shape against the config; every FP8 pair (dtype per quantization_config, scale grid
   [ceil(out/bo), ceil(in/bi)], no FP8 tensor without its scale, no scale without its weight).
2. `load_pretrained` allocates each tensor once in its final dtype and device and fills it: bytes are
   `pread` into it when the stored dtype already matches (no mmap, whose resident pages would count as a
   second copy), else read into a per-tensor scratch, dequantised (FP8 · scale_inv, fp32 math, one
   rounding) or cast, and copied in. Peak memory is the model plus the largest single tensor.

FP8 checkpoints load in one of two ways (`fp8=`): "dequantize" (default) gives a plain model in
`torch_dtype`; "keep" holds the quantised linears and expert stacks in the `Fp8Blocks` weight format
(dsv3.quant.formats: 1 byte per value, dequantised per tile / per expert that has tokens at run time —
half the memory).

Stored dtypes: config.json's torch_dtype describes the bulk of the weights, not every tensor, so any
floating dtype (fp64/fp32/bf16/fp16) loads and is cast to the target — mixed storage is legitimate
(DeepSeek keeps the router bias in fp32; an fp32 router stored as bf16 loads, with bf16's precision). FP8
only loads together with its weight_scale_inv and a quantization_config. Integer, bool and complex
tensors are a CheckpointError naming the tensor: casting them would silently load garbage.

Sharded (`parallel=` a ParallelContext of world size > 1, or started from torchrun's environment): the meta model
is sharded by dsv3.model.parallel after the whole checkpoint is checked at full size, and each rank reads only
its part of every split tensor — the owned experts of a per-expert checkpoint, a dim-0 slice of a fused expert
stack, the rows/columns of a head-, channel- or vocabulary-split matrix (`CheckpointReader.get_slice`, never
the whole tensor). An FP8 part is read with the block rows/columns of its weight_scale_inv that cover it:
dequantised and cut when it does not start on a block boundary (fp8="dequantize"); held as FP8 blocks
(fp8="keep") when it does — the intermediate channels split on block boundaries for that, and a head or
vocabulary split through a block is a ValueError naming the tensor. int8/int4 quantise each rank's part.

MTP: the checkpoint's layer `num_hidden_layers` feeds a model's `mtp.*` tensors. A checkpoint without it
loads too (the model is built with mtp=False); `load_mtp=False` skips it on purpose (2 % of V3's weights).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsv3.checkpoint.errors import CheckpointError
from dsv3.checkpoint.fp8 import (
    FP8_DTYPES,
    Fp8Spec,
    check_scales_finite,
    dequantize_checked,
    fp8_scale_shape,
    parse_quantization_config,
    read_fp8_slice,
)
from dsv3.checkpoint.keys import SCALE_SUFFIX, LoadPlan, Source, is_mtp_key, piece_views, plan_load, to_checkpoint_name
from dsv3.checkpoint.quantize import check_quantization, load_quantizing, plan_quantization, quantize_loaded
from dsv3.checkpoint.quantized import is_quantized_checkpoint, load_quantized
from dsv3.checkpoint.safetensors_io import CheckpointReader
from dsv3.config import DeepseekV3Config, check_keyword_arguments
from dsv3.kernels import check_kernels_choice, select_kernels
from dsv3.memory import weight_empty
from dsv3.model.moe import RoutedExperts
from dsv3.model.parallel import Region, shard_model
from dsv3.model.rope import RotaryEmbedding
from dsv3.model.weights import hold_formats
from dsv3.parallel.context import ParallelContext
from dsv3.quant.formats import Fp8Blocks

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
FP32_TENSORS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")   # numerics policy: router in fp32
FP8_MODES = ("dequantize", "keep")
_FP8 = tuple(FP8_DTYPES.values())
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NO_OP_KWARGS = frozenset({"trust_remote_code", "low_cpu_mem_usage"})   # transformers arguments, moot here
TP_PLANS = (None, "auto")


def resolve_dtype(torch_dtype: Any, config: DeepseekV3Config) -> torch.dtype:
    """dtype or name ("bfloat16", "float32", ...); "auto"/None take config.torch_dtype (fp8 -> bf16)."""
    if isinstance(torch_dtype, torch.dtype):
        if torch_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"torch_dtype={torch_dtype}: use torch.float32, torch.bfloat16 or torch.float16 "
                             "(for FP8 weights pass fp8='keep')")
        return torch_dtype
    if torch_dtype is None or torch_dtype == "auto":
        name = config.torch_dtype or "float32"
        return _DTYPES.get(str(name).removeprefix("torch."), torch.bfloat16)
    name = str(torch_dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"torch_dtype={torch_dtype!r}: expected a torch dtype, 'auto', or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(device_map: Any) -> torch.device:
    """device_map: None/"cpu"/"cuda"/"cuda:1"/torch.device/int, or "auto" (the GPU when present)."""
    if device_map is None or device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        device_map = torch.device("cuda", device_map)
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"device_map={device_map!r}: dsv3 places the whole model on one device per rank; "
                             "use tensor/expert parallelism for several devices")
        return resolve_device(devices.pop())
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def _param_owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name) if module_name else model, attr


@dataclass
class PreparedLoad:
    """Everything phase 1 established: the meta model and, per tensor, where its bytes come from."""

    model: nn.Module
    config: DeepseekV3Config
    plan: LoadPlan
    names: dict[str, str]               # checkpoint-spelled target name -> model tensor name
    targets: dict[str, torch.Tensor]    # checkpoint-spelled target name -> meta tensor
    scales: dict[str, str]              # FP8 weight key -> its scale_inv key
    spec: Fp8Spec | None
    regions: dict[str, Region] = field(default_factory=dict)   # sharded: target name -> this rank's part


def prepare_load(cls: type, reader: CheckpointReader, config: DeepseekV3Config, fp8: str = "dequantize",
                 load_mtp: bool | None = None, strict: bool = True,
                 parallel: ParallelContext | None = None) -> PreparedLoad:
    """Phase 1: build `cls(config)` on the meta device and check the checkpoint against it, reading headers
    only. Raises CheckpointError naming file, tensor and expectation for anything that would not load.
    parallel (world size > 1): then shard the checked meta model for this rank (targets become its parts)."""
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8={fp8!r}: expected 'dequantize' (FP8 checkpoints load as torch_dtype) or 'keep' "
                         "(hold FP8 weights, dequantise per layer at run time)")
    spec = parse_quantization_config(config.quantization_config)
    keys = set(reader.keys())
    scales = _fp8_pairs(reader, keys, spec)
    with torch.device("meta"):
        model = cls(config)
    # A bare DeepseekV3Model reads the "model." part of a causal-LM checkpoint and ignores its head.
    prefix = "model." if not hasattr(model, "lm_head") and "embed_tokens.weight" not in keys else ""
    if prefix:
        keys.discard("lm_head.weight")
    n_layers = config.num_hidden_layers
    has_mtp_weights = any(is_mtp_key(k, n_layers) for k in keys)
    wants_mtp = any(to_checkpoint_name(n, n_layers) != n for n in _load_targets(model))
    if load_mtp and not has_mtp_weights:
        raise CheckpointError(f"{reader.directory}: load_mtp=True but the checkpoint has no MTP weights "
                              f"(model.layers.{n_layers}.*); pass load_mtp=None to load without them")
    if wants_mtp and (load_mtp is False or not has_mtp_weights):
        logger.info("building without the MTP module: %s", "load_mtp=False" if load_mtp is False else
                    f"the checkpoint has no model.layers.{n_layers}.* tensors")
        with torch.device("meta"):
            model = cls(config, mtp=False)      # a class with MTP modules takes the flag (DeepseekV3ForCausalLM)
    if fp8 == "keep" and scales:
        _hold_fp8(model, prefix, scales, spec, config)   # type: ignore[arg-type]
    own = _load_targets(model)
    names = {to_checkpoint_name(prefix + name, n_layers): name for name in own}
    targets = {ckpt: own[name] for ckpt, name in names.items()}
    plan = plan_load(list(targets), keys, n_layers, config.n_routed_experts)
    _check_plan(plan, reader, strict)
    if plan.mtp_keys:
        logger.info("%d MTP tensors (layer %d) set aside: the model has no place for them",
                    len(plan.mtp_keys), n_layers)
    for name, source in plan.sources.items():
        _check_shapes(reader, source, name, tuple(targets[name].shape))
        _check_dtypes(reader, source, name, targets[name].dtype)
    regions: dict[str, Region] = {}
    if parallel is not None and parallel.is_parallel:
        # FP8: intermediate channels split on block boundaries, so fp8="keep" can hold every rank's part.
        unit = math.lcm(*spec.block_size) if spec is not None and scales else 1
        by_model_name = shard_model(model, parallel, ffn_unit=unit)
        own = _load_targets(model)
        targets = {ckpt: own[name] for ckpt, name in names.items()}
        regions = {ckpt: by_model_name[name] for ckpt, name in names.items() if name in by_model_name}
        logger.info("rank %d of %d: %d of %d tensors sharded", parallel.rank, parallel.world_size, len(regions),
                    len(targets))
    return PreparedLoad(model, config, plan, names, targets, scales, spec, regions)


def load_pretrained(cls: type, path: str | os.PathLike, torch_dtype: Any = "auto", device_map: Any = None,
                    config: DeepseekV3Config | None = None, progress: bool | None = None, strict: bool = True,
                    fp8: str = "dequantize", load_mtp: bool | None = None, dtype: Any = None,
                    quantization: str | None = None, tp_plan: str | None = None,
                    parallel: ParallelContext | None = None, kernels: str = "auto",
                    head_quantization: str | None = None,
                    **config_overrides: Any) -> nn.Module:
    """Load a HF checkpoint directory (single file or index + shards, bf16/fp16/fp32 or block FP8).

    torch_dtype: a dtype, "bfloat16"/"float16"/"float32", or "auto" (config.json's torch_dtype); `dtype` is the
    transformers-5 spelling. device_map: "auto" (GPU when present), "cpu", "cuda", "cuda:N", a device.
    fp8: "dequantize" or "keep" (see module docstring). quantization: None, "int8" or "int4" — weight-only
    quantisation while loading, one tensor at a time (dsv3.checkpoint.quantize says which tensors).
    head_quantization: the LM heads' format in a quantised load, None (int8) or "int4" / "int8".
    progress: a bar on stderr (default: when a tty). kernels: "auto" (CPU kernels where they help), "on" or "off"
    (dsv3.kernels.select_kernels; the choice is `model.kernels`).
    parallel: this process's ParallelContext — the model is sharded for it (tensor + expert parallelism,
    dsv3.model.parallel) and each rank reads only its part of the weights; `model.parallel` remembers it.
    tp_plan: None or "auto" (transformers' spelling). With parallel=None, tp_plan="auto" or a torchrun
    environment (WORLD_SIZE > 1) starts the process group (dsv3.parallel.launch.start_parallel, which also
    picks this rank's device from device_map).
    Any other keyword must be a config field and overrides config.json (transformers semantics); an unknown
    one is an UnknownArgumentError naming the closest accepted name. `trust_remote_code` and
    `low_cpu_mem_usage` are accepted and have no effect (dsv3 runs its own code and always loads one copy).
    """
    for no_op in _NO_OP_KWARGS.intersection(config_overrides):
        logger.info("from_pretrained(%s=%r) has no effect in dsv3", no_op, config_overrides.pop(no_op))
    if config is None and Path(path).is_dir():
        config = DeepseekV3Config.from_pretrained(path)   # its extra keys may be overridden too
    arguments = list(inspect.signature(load_pretrained).parameters)[2:-1]   # without cls, path, **overrides
    check_keyword_arguments(config_overrides, config, "from_pretrained()", [*arguments, *sorted(_NO_OP_KWARGS)])
    if dtype is not None:
        if torch_dtype not in (None, "auto") and torch_dtype != dtype:
            raise ValueError(f"torch_dtype={torch_dtype!r} and dtype={dtype!r}: pass one of them")
        torch_dtype = dtype
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected config.json and *.safetensors); "
                              "downloading from a hub is not supported, pass a local directory")
    if config is None:
        config = DeepseekV3Config.from_pretrained(path)
    if config_overrides:
        config = config.replace(**config_overrides)
    check_quantization(quantization, fp8, head_quantization, stored=is_quantized_checkpoint(config))
    check_kernels_choice(kernels)
    target_dtype = resolve_dtype(torch_dtype, config)
    if tp_plan not in TP_PLANS:
        raise ValueError(f"tp_plan={tp_plan!r}: expected None or 'auto' (shard over the processes torchrun "
                         "started: torchrun --nproc_per_node=N script.py)")
    if parallel is not None and not isinstance(parallel, ParallelContext):
        raise TypeError(f"parallel={parallel!r}: expected a dsv3.parallel.ParallelContext or None")
    device = None
    if parallel is None and (tp_plan == "auto" or _torchrun_world_size() > 1):
        from dsv3.parallel.launch import start_parallel  # torch.distributed start-up, only when asked for

        started = start_parallel(device_map=device_map, tp_plan=tp_plan)
        if started is not None:
            parallel, device = started
    if device is None:
        device = resolve_device(device_map)
    if is_quantized_checkpoint(config):          # int8/int4 as stored (compressed-tensors): held, not re-quantised
        if parallel is not None and parallel.is_parallel:
            raise CheckpointError(f"{path}: a quantised (compressed-tensors) checkpoint cannot be loaded sharded "
                                  "yet; load its bf16/FP8 source with quantization='int8'|'int4' under torchrun "
                                  "(each rank quantises its own part)")
        with CheckpointReader(path) as reader:
            model = load_quantized(cls, reader, config, target_dtype, device, quantization, load_mtp, strict,
                                   sys.stderr.isatty() if progress is None else progress, head_quantization)
        select_kernels(model, kernels)
        return model
    with CheckpointReader(path) as reader:
        prep = prepare_load(cls, reader, config, fp8, load_mtp, strict, parallel)
        model, plan = prep.model, prep.plan
        quantize = (plan_quantization(model, quantization, device, head_quantization=head_quantization)
                    if quantization else {})
        dtypes = {name: torch.float32 if prep.names[name] in quantize else   # quantised from fp32 chunks
                  _target_dtype(name, prep.targets[name], target_dtype) for name in plan.sources}
        total = sum(_share(prep, name) * _bytes_read(reader, k, dtypes[name], prep)
                    for name, s in plan.sources.items() for k in s.keys())
        if progress is None:
            progress = sys.stderr.isatty()
        with tqdm(total=total, desc="Loading weights", unit="B", unit_scale=True, disable=not progress) as bar:
            for name, source in plan.sources.items():
                region = prep.regions.get(name)
                if prep.names[name] in quantize and region is None:   # rows read and quantised chunk by chunk
                    load_quantizing(model, prep.names[name], quantize[prep.names[name]], source, reader, prep.scales,
                                    prep.spec, device)
                    bar.update(sum(_bytes_read(reader, k, torch.float32, prep) for k in source.keys()))
                    continue
                expected = prep.targets[name]
                out = weight_empty(expected.shape, dtypes[name], device)
                with torch.no_grad():
                    if region is None:
                        for key, view in piece_views(source, out):
                            _read_piece(reader, key, view, prep)
                            bar.update(_bytes_read(reader, key, out.dtype, prep))
                    else:
                        _read_part(reader, source, region, out, prep)
                        bar.update(int(_share(prep, name) * sum(_bytes_read(reader, k, out.dtype, prep)
                                                                for k in source.keys())))
                owner, attr = _param_owner(model, prep.names[name])
                if isinstance(expected, nn.Parameter):
                    owner._parameters[attr] = nn.Parameter(out, requires_grad=expected.requires_grad)
                else:
                    owner._buffers[attr] = out
                if prep.names[name] in quantize:      # a rank's part: read whole (fp32), then quantised
                    quantize_loaded(model, prep.names[name], quantize[prep.names[name]])
                del out
    _finish(model, prep.config, device)
    model.eval()
    select_kernels(model, kernels)
    return model


def _torchrun_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent): whether from_pretrained starts the process group."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} in the environment is not an integer; launch with torchrun, or "
                         "unset it for a single process") from None


# -- phase 1 helpers ----------------------------------------------------------------------------------------
def _load_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that must come from the checkpoint: parameters and persistent buffers (no ties)."""
    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=True))
    for mod_name, module in model.named_modules():
        for b_name, buf in module._buffers.items():
            if buf is not None and b_name not in module._non_persistent_buffers_set:
                targets[f"{mod_name}.{b_name}" if mod_name else b_name] = buf
    return targets


def _fp8_pairs(reader: CheckpointReader, keys: set[str], spec: Fp8Spec | None) -> dict[str, str]:
    """{FP8 weight key: scale key}, after checking every pair against quantization_config (headers only)."""
    pairs = {k[: -len(SCALE_SUFFIX)]: k for k in sorted(keys) if k.endswith(SCALE_SUFFIX)}
    for weight, scale in pairs.items():
        if weight not in keys:
            raise CheckpointError(f"{reader.file_of(scale)}: FP8 scale tensor {scale} has no weight {weight} in the "
                                  "checkpoint; a shard is incomplete — re-download the checkpoint")
    if pairs and spec is None:
        weight, scale = next(iter(pairs.items()))
        raise CheckpointError(
            f"{reader.file_of(weight)}: tensor {weight} comes with {scale} (block-FP8 storage) but config.json has "
            'no quantization_config; expected {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": '
            "[128, 128]} as in the published DeepSeek-V3 config.json. Restore it, or convert the checkpoint.")
    for weight, scale in pairs.items():
        assert spec is not None
        got, shape = reader.dtype(weight), tuple(reader.shape(weight))
        if got != spec.dtype:
            raise CheckpointError(
                f"{reader.file_of(weight)}: tensor {weight} is {got} but has an FP8 scale ({scale}) and "
                f"quantization_config.fmt={spec.fmt!r} says the weights are {spec.dtype}. Fix quantization_config "
                "in config.json or re-download the shard.")
        if len(shape) not in (2, 3):
            raise CheckpointError(f"{reader.file_of(weight)}: FP8 tensor {weight} has shape {shape}; block FP8 "
                                  "weights are [out, in] (or stacked experts [E, out, in])")
        want = (*shape[:-2], *fp8_scale_shape(shape[-2:], spec.block_size))
        if tuple(reader.shape(scale)) != want:
            raise CheckpointError(
                f"{reader.file_of(scale)}: tensor {scale} has shape {tuple(reader.shape(scale))} but weight {weight} "
                f"{shape} with weight_block_size {list(spec.block_size)} needs {want} (one scale per block, partial "
                "edge blocks included). Check quantization_config.weight_block_size in config.json.")
        if reader.dtype(scale) not in _SCALE_DTYPES:
            raise CheckpointError(
                f"{reader.file_of(scale)}: tensor {scale} is {reader.dtype(scale)}; dsv3 reads DeepSeek's fp32 "
                "block scales (float32/bfloat16/float16), not packed exponent (UE8M0) scales. Convert the "
                "checkpoint to bf16 with the tool that produced it.")
    for key in keys:
        if key not in pairs and reader.dtype(key) in _FP8:
            raise CheckpointError(f"{reader.file_of(key)}: tensor {key} is {reader.dtype(key)} but has no "
                                  f"{key}{SCALE_SUFFIX} companion; the checkpoint is incomplete — re-download it")
    return pairs


def _hold_fp8(model: nn.Module, prefix: str, scales: dict[str, str], spec: Fp8Spec,
              config: DeepseekV3Config) -> None:
    """fp8="keep": on the meta model, every linear and expert stack stored as FP8 holds its weights in the
    `Fp8Blocks` format (dsv3.quant.formats) — checkpoint-named tensors, dequantised per tile / per used expert."""
    n_layers = config.num_hidden_layers

    def choose(mod_name: str, module: nn.Module) -> Any:
        def ckpt(attr: str) -> str:
            return to_checkpoint_name(prefix + (f"{mod_name}.{attr}" if mod_name else attr), n_layers)

        fmt = Fp8Blocks(spec.block_size, spec.dtype)
        if not isinstance(module, RoutedExperts):
            return fmt if ckpt("weight") in scales else None
        fused = ckpt("gate_up_proj") in scales and ckpt("down_proj") in scales
        per_expert = all(ckpt(f"0.{p}.weight") in scales for p in ("gate_proj", "up_proj", "down_proj"))
        return (replace(fmt, parts=1 if fused else 2), fmt) if fused or per_expert else None

    logger.info("fp8='keep': %d modules hold FP8 weights", hold_formats(model, choose))


def _target_dtype(name: str, expected: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    if expected.dtype in _FP8:                      # an FP8-held weight: stored bytes, as is
        return expected.dtype
    if name.endswith(SCALE_SUFFIX) or name.endswith(FP32_TENSORS):
        return torch.float32
    return dtype


def _check_plan(plan: LoadPlan, reader: CheckpointReader, strict: bool) -> None:
    where = reader.index_path or reader.directory
    problems = []
    if plan.missing:
        problems.append(f"missing tensors ({len(plan.missing)}, expected in {where}): {', '.join(plan.missing[:8])}"
                        + (" ..." if len(plan.missing) > 8 else ""))
    if plan.unexpected and strict:
        named = [f"{k} (in {Path(reader.file_of(k)).name})" for k in plan.unexpected[:8]]
        problems.append(f"unexpected tensors ({len(plan.unexpected)}) that the config has no place for: "
                        + ", ".join(named) + (" ..." if len(plan.unexpected) > 8 else ""))
    if problems:
        raise CheckpointError(f"{reader.directory}: the checkpoint does not match its config.json — "
                              + "; ".join(problems) + ". Check that config.json belongs to these weights "
                              "(num_hidden_layers, n_routed_experts, q_lora_rank, tie_word_embeddings).")


def _check_shapes(reader: CheckpointReader, source: Source, name: str, shape: tuple[int, ...]) -> None:
    if source.stacked:
        piece = (shape[1] // len(source.pieces[0]), *shape[2:])
        for key in source.keys():
            if tuple(reader.shape(key)) != piece:
                raise CheckpointError(f"{reader.file_of(key)}: expert tensor {key} has shape {tuple(reader.shape(key))}"
                                      f" but the config implies {piece} (stacked into {name} {shape}). Check "
                                      "moe_intermediate_size / hidden_size in config.json.")
        return
    key = source.pieces[0][0]
    got = tuple(reader.shape(key))
    if got != shape:
        raise CheckpointError(f"{reader.file_of(key)}: tensor {key} has shape {got} but the config implies "
                              f"{shape}. Check that config.json belongs to these weights.")


def _check_dtypes(reader: CheckpointReader, source: Source, name: str, target: torch.dtype) -> None:
    """Stored dtypes that load into a `target` tensor (see "Stored dtypes" in the module docstring)."""
    for key in source.keys():
        got = reader.dtype(key)
        if not target.is_floating_point or target in _FP8 or got in _FP8:   # FP8 pairs: see _fp8_pairs
            continue
        if not got.is_floating_point or got.is_complex:
            raise CheckpointError(
                f"{reader.file_of(key)}: tensor {key} is stored as {got}, but it is a floating-point weight "
                f"of the model ({name}); integer, bool and complex data cannot be loaded as weights — an integer "
                "tensor here means a quantised format dsv3 does not read or a corrupt header. Use a bf16/fp16/"
                "fp32 or block-FP8 checkpoint (quantization_config with weight_scale_inv tensors).")


# -- phase 2 helpers ----------------------------------------------------------------------------------------
def _bytes_read(reader: CheckpointReader, key: str, dtype: torch.dtype, prep: PreparedLoad) -> int:
    """File bytes behind one piece: the tensor, plus its scale when it is dequantised on load."""
    scale = prep.scales.get(key)
    return reader.nbytes(key) + (reader.nbytes(scale) if scale is not None and dtype not in _FP8 else 0)


def _read_piece(reader: CheckpointReader, key: str, dst: torch.Tensor, prep: PreparedLoad) -> None:
    """Fill `dst` (a contiguous view of a final tensor) from checkpoint tensor `key`."""
    scale_key = prep.scales.get(key)
    if scale_key is None or dst.dtype in _FP8:      # plain tensor, or FP8 bytes kept as FP8
        if dst.device.type == "cpu" and reader.dtype(key) == dst.dtype and dst.is_contiguous():
            reader.read(key, out=dst)               # file bytes straight into the parameter
        else:
            dst.copy_(reader.read(key).view(dst.shape))
        if key.endswith(SCALE_SUFFIX):              # fp8="keep": the scale is held as loaded
            check_scales_finite(dst, key)
        return
    assert prep.spec is not None
    weight = reader.read(key).to(dst.device)
    scale = reader.read(scale_key).to(dst.device)
    dst.copy_(dequantize_checked(weight, scale, prep.spec.block_size, dst.dtype, key))


def _share(prep: PreparedLoad, name: str) -> float:
    region = prep.regions.get(name)
    return 1.0 if region is None else 0.0 if region.zero else (region.stop - region.start) / region.full


def _slice(reader: CheckpointReader, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """[start, stop) of checkpoint tensor `key` along `dim`, read through the lazy safetensors slice (only those
    bytes are copied out), as a private contiguous tensor."""
    index = (*([slice(None)] * dim), slice(start, stop))
    return reader.get_slice(key)[index].clone(memory_format=torch.contiguous_format)


def _read_part(reader: CheckpointReader, source: Source, region: Region, dst: torch.Tensor,
               prep: PreparedLoad) -> None:
    """Fill `dst` with this rank's `region` of a target, reading only that part of the checkpoint."""
    if region.zero:                                 # held by the first rank only (a bias added once to a sum)
        dst.zero_()
        return
    if dst.numel() == 0:                            # a rank past the last unit of a small dim holds nothing
        return
    if source.stacked:                              # per-expert checkpoint: only the owned experts' tensors
        assert region.dim == 0, region
        owned = Source(source.pieces[region.start: region.stop], stacked=True)
        for key, view in piece_views(owned, dst):
            _read_piece(reader, key, view, prep)
        return
    key = source.pieces[0][0]
    scale_key = prep.scales.get(key)
    if scale_key is None or dst.dtype in _FP8:      # plain tensor, or FP8 bytes / scales held as stored
        dst.copy_(_slice(reader, key, region.dim, region.start, region.stop))
        if key.endswith(SCALE_SUFFIX):
            check_scales_finite(dst, key)
        return
    assert prep.spec is not None
    block = prep.spec.block_size
    if len(reader.shape(key)) == 3:                 # fused expert stack: whole experts, whole block grids
        assert region.dim == 0, region
        weight = _slice(reader, key, 0, region.start, region.stop)
        scale = _slice(reader, scale_key, 0, region.start, region.stop)
        dst.copy_(dequantize_checked(weight.to(dst.device), scale.to(dst.device), block, dst.dtype, key))
        return
    # A matrix: the blocks covering [start, stop) (the last one may be ragged), dequantised, then cut.
    b = block[region.dim]
    lo, hi = region.start // b * b, min(-(-region.stop // b) * b, region.full)
    weight, scale = read_fp8_slice(reader, key, **{("rows" if region.dim == 0 else "cols"): (lo, hi)},
                                   block_size=block)
    dense = dequantize_checked(weight.to(dst.device), scale.to(dst.device), block, dst.dtype, key)
    dst.copy_(dense.narrow(region.dim, region.start - lo, region.stop - region.start))


def _finish(model: nn.Module, config: DeepseekV3Config, device: torch.device) -> None:
    """Recreate what is computed rather than loaded (rope frequencies) and re-tie shared weights."""
    for module in model.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, RotaryEmbedding):
                setattr(module, name, RotaryEmbedding(config).to(device))
    if config.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors left unloaded: {leftover[:8]}")
