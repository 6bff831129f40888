"""`from_pretrained`: build on the meta device, then materialise each tensor straight from the
mmap'd safetensors files into its final dtype and device — one copy of the weights, never two.

Order of work per parameter: look up its checkpoint source (keys.plan_load), check shapes against
the config, read (dequantising FP8 blocks on the fly), stack experts, assign into the module.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsv3.checkpoint.errors import CheckpointError
from dsv3.checkpoint.fp8 import dequantize_fp8_blocks, parse_quantization_config
from dsv3.checkpoint.keys import SCALE_SUFFIX, LoadPlan, Source, assemble, plan_load, to_checkpoint_name
from dsv3.checkpoint.safetensors_io import CheckpointReader
from dsv3.config import DeepseekV3Config
from dsv3.model.rope import RotaryEmbedding

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
FP32_TENSORS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")   # numerics policy: router in fp32


def resolve_dtype(torch_dtype: Any, config: DeepseekV3Config) -> torch.dtype:
    """dtype or name ("bfloat16", "float32", ...); "auto"/None take config.torch_dtype (fp8 -> bf16)."""
    if isinstance(torch_dtype, torch.dtype):
        if torch_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"torch_dtype={torch_dtype}: use torch.float32, torch.bfloat16 or torch.float16")
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
        return torch.device("cuda", device_map)
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


def load_pretrained(cls: type, path: str | os.PathLike, torch_dtype: Any = "auto", device_map: Any = None,
                    config: DeepseekV3Config | None = None, progress: bool | None = None,
                    strict: bool = True, **config_overrides: Any) -> nn.Module:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected config.json and *.safetensors); "
                              "downloading from a hub is not supported, pass a local directory")
    if config is None:
        config = DeepseekV3Config.from_pretrained(path, **config_overrides)
    dtype = resolve_dtype(torch_dtype, config)
    device = resolve_device(device_map)
    fp8 = parse_quantization_config(config.quantization_config)
    with torch.device("meta"):
        model = cls(config)
    with CheckpointReader(path) as reader:
        ckpt_keys = set(reader.keys())
        # A bare DeepseekV3Model reads the "model." part of a causal-LM checkpoint and ignores its head.
        prefix = "model." if not hasattr(model, "lm_head") and "embed_tokens.weight" not in ckpt_keys else ""
        if prefix:
            ckpt_keys.discard("lm_head.weight")
        own = _load_targets(model)
        names = {to_checkpoint_name(prefix + name, config.num_hidden_layers): name for name in own}
        targets = {ckpt: own[name] for ckpt, name in names.items()}
        plan = plan_load(list(targets), ckpt_keys, config.num_hidden_layers, config.n_routed_experts)
        _check_plan(plan, path, strict)
        if plan.mtp_keys:
            logger.info("%d MTP tensors (layer %d) set aside: this model class has no MTP module",
                        len(plan.mtp_keys), config.num_hidden_layers)

        def fetch(key: str) -> torch.Tensor:
            t = reader.get(key)
            scale_key = key[: -len(".weight")] + ".weight" + SCALE_SUFFIX if key.endswith(".weight") else None
            if scale_key is not None and scale_key in reader:
                block = fp8.block_size if fp8 is not None else (128, 128)
                return dequantize_fp8_blocks(t, reader.get(scale_key), block, dtype=torch.float32, name=key)
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise CheckpointError(f"{reader.file_of(key)}: tensor {key} is {t.dtype} but has no "
                                      f"{SCALE_SUFFIX} companion; the checkpoint is incomplete")
            return t

        if progress is None:
            progress = sys.stderr.isatty()
        for name in tqdm(list(plan.sources), desc="Loading weights", disable=not progress, unit="tensor"):
            owner, attr = _param_owner(model, names[name])
            expected = targets[name]
            source = plan.sources[name]
            _check_shapes(reader, source, name, tuple(expected.shape))
            want = torch.float32 if name.endswith(FP32_TENSORS) else dtype
            out = torch.empty(expected.shape, dtype=want, device=device)
            with torch.no_grad():
                assemble(source, fetch, out)
            if isinstance(expected, nn.Parameter):
                owner._parameters[attr] = nn.Parameter(out, requires_grad=expected.requires_grad)
            else:
                owner._buffers[attr] = out
    _finish(model, config, device)
    model.eval()
    return model


def _load_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that must come from the checkpoint: parameters and persistent buffers (no ties)."""
    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=True))
    for mod_name, module in model.named_modules():
        for b_name, buf in module._buffers.items():
            if buf is not None and b_name not in module._non_persistent_buffers_set:
                targets[f"{mod_name}.{b_name}" if mod_name else b_name] = buf
    return targets


def _check_plan(plan: LoadPlan, path: Path, strict: bool) -> None:
    problems = []
    if plan.missing:
        problems.append(f"missing tensors ({len(plan.missing)}): {', '.join(plan.missing[:8])}"
                        + (" ..." if len(plan.missing) > 8 else ""))
    if plan.unexpected and strict:
        problems.append(f"unexpected tensors ({len(plan.unexpected)}): {', '.join(plan.unexpected[:8])}"
                        + (" ..." if len(plan.unexpected) > 8 else ""))
    if problems:
        raise CheckpointError(f"{path}: the checkpoint does not match its config.json — " + "; ".join(problems)
                              + ". Check that config.json belongs to these weights.")


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
