"""`dsv3 convert`: rewrite a checkpoint directory — FP8 -> bf16 (or fp16/fp32), bf16/FP8 -> int8/int4/FP8,
and/or into shards of another size — streaming one tensor at a time, resumable, with a progress bar.

    dsv3 convert /models/DeepSeek-V3 /models/DeepSeek-V3-bf16             # dequantise to bf16, 5 GB shards
    dsv3 convert SRC DST --dtype auto --max-shard-size 2GB                # re-shard, dtypes as stored
    dsv3 convert SRC DST --keep-fp8 --max-shard-size 10GB                 # re-shard an FP8 checkpoint as FP8
    dsv3 convert SRC DST --quantize int4                                  # int4 (int8, fp8) weights on disk

--quantize int8|int4 quantises the tensors from_pretrained(quantization=...) would (dsv3.checkpoint.quantize),
with the very same code, and writes them in compressed-tensors' pack-quantized layout
(dsv3.checkpoint.quantized says exactly what is stored): from_pretrained(DST) then holds them as stored,
without re-quantising, and gives the same tensors as from_pretrained(SRC, quantization=...). --quantize fp8
writes DeepSeek's block FP8 (float8_e4m3fn `weight` + fp32 `weight_scale_inv` per 128×128 block) for the
linears the FP8 release quantises (not the heads, not MTP's eh_proj). The destination is checked writable
before anything is read. A quantised tensor is read and quantised in chunks of rows (16 MiB in fp32); its
outputs are written in the safetensors order (by item size), so the int4 scale and the FP8 weight quantise
their source a second time rather than hold the others in memory.

What is written: every tensor of SRC under its own name (the MTP layer included); FP8 weights replaced
by their dequantised values and their `weight_scale_inv` dropped (unless keep_fp8); floating tensors cast
to `dtype` except the router's fp32 `e_score_correction_bias`, and the router weight is never narrowed (an
fp32 one, as dsv3 saves it, stays fp32: rounded to bf16 it would route differently from the saved model);
config.json as published minus quantization_config (or the new one of --quantize), with the new
torch_dtype; every other top-level file (tokenizer.json, tokenizer_config.json, generation_config.json,
README, *.py) copied. transformers and dsv3 both read it.

How: the whole output — names, dtypes, shapes and the shard of every tensor — is planned from the
source headers before anything is written, and the source is checked as from_pretrained checks it
(shapes against config.json, FP8 pairs, missing or unexpected tensors). Each shard is then written
tensor by tensor (read -> dequantise/cast -> write -> drop: memory is one tensor, never a shard) under a
temporary name, fsync'd and renamed. A marker `.dsv3-convert.json` records the plan, the identity of the
source (size and mtime of every source file, a digest of every tensor header) and, per finished shard, its
size and mtime: re-running the same command after an interruption keeps the finished shards that are
untouched since, rewrites any other, and refuses (unless --overwrite: start over) when the source files
changed in between — shards of two different sources must never be mixed. The index, the copied
files and, last, config.json follow: a directory with a config.json is a finished conversion.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dsv3.checkpoint import quantized
from dsv3.checkpoint.atomic import atomic_write_text, create_temp_file
from dsv3.checkpoint.errors import CheckpointError
from dsv3.checkpoint.fp8 import (
    FP8_DTYPES,
    check_scales_finite,
    dequantize_checked,
    fp8_scale_shape,
    parse_quantization_config,
    quantize_fp8_blocks,
)
from dsv3.checkpoint.keys import SCALE_SUFFIX, to_checkpoint_name
from dsv3.checkpoint.loader import _DTYPES, FP32_TENSORS, PreparedLoad, _fp8_pairs, prepare_load
from dsv3.checkpoint.quantize import HEAD_QUANTIZATIONS, HEADS, QUANTIZATIONS, plan_quantization
from dsv3.checkpoint.safetensors_io import (
    _SHARD_RE,
    DTYPE_NAMES,
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointReader,
    LazyTensor,
    _fsync_dir,
    _temp_path,
    read_safetensors_header,
    write_safetensors_file,
)
from dsv3.checkpoint.saver import parse_size
from dsv3.config import ConfigError, DeepseekV3Config

logger = logging.getLogger(__name__)

MARKER_NAME = ".dsv3-convert.json"
KEEP_AS_STORED = ("e_score_correction_bias",)     # numerics policy: the router bias stays fp32
NEVER_NARROWED = FP32_TENSORS                     # the router weight too is never rounded to a narrower dtype
_DTYPE_CHOICES = ("bfloat16", "float16", "float32", "auto")
_NOT_COPIED = {"config.json", INDEX_NAME, MARKER_NAME}
QUANTIZE_CHOICES = ("int8", "int4", "fp8")
FP8_BLOCK = (128, 128)                            # DeepSeek's release
CHUNK_ELEMENTS = 1 << 22                          # values quantised at a time (16 MiB in fp32)
FP8 = "fp8"


@dataclass(frozen=True)
class ConvertResult:
    directory: str
    files: list[str]                 # safetensors files, in order
    tensors: int
    total_bytes: int
    reused_shards: int               # shards kept from an interrupted run of the same conversion
    copied: list[str]                # non-weight files copied from the source


@dataclass(frozen=True)
class _Entry:
    """One output tensor: checkpoint `key`, written as `dtype` `shape`, dequantised with `scale` when set; a
    quantised output (`quant`: an int format or FP8) is one of the tensors made from source weight `source`."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    scale: str | None = None
    source: str | None = None
    quant: Any = None

    @property
    def nbytes(self) -> int:
        return LazyTensor(self.dtype, self.shape, torch.empty).nbytes


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"bfloat16"/"float16"/"float32" or a dtype -> dtype; "auto"/None -> None (keep stored dtypes)."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype={dtype}: expected torch.bfloat16, torch.float16 or torch.float32")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {list(_DTYPE_CHOICES)}")
    return _DTYPES[name]


def _natural(key: str) -> list[Any]:
    """model.layers.2.x < model.layers.10.x: numbers compare as numbers."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def plan_conversion(reader: CheckpointReader, dtype: torch.dtype | None, keep_fp8: bool,
                    scales: dict[str, str], quantize: dict[str, Any] | None = None) -> list[_Entry]:
    """Every output tensor, in output order, with its dtype and shape and how to produce it. `quantize`:
    {source weight key: int format, or FP8} for the tensors written quantised."""
    scale_keys = set(scales.values())
    quantize = quantize or {}
    entries = []
    for key in sorted(reader.keys(), key=_natural):
        stored, shape = reader.dtype(key), tuple(reader.shape(key))
        if key in scale_keys and not keep_fp8:
            continue                                       # consumed by its weight
        if key in quantize:
            entries.extend(_quantised_entries(key, shape, quantize[key], scales.get(key)))
        elif key in scales and not keep_fp8:
            entries.append(_Entry(key, dtype or torch.bfloat16, shape, scales[key]))
        elif key in scales or key in scale_keys or not stored.is_floating_point or key.endswith(KEEP_AS_STORED):
            entries.append(_Entry(key, stored, shape))
        elif key.endswith(NEVER_NARROWED) and dtype is not None and dtype.itemsize < stored.itemsize:
            entries.append(_Entry(key, stored, shape))
        else:
            entries.append(_Entry(key, dtype or stored, shape))
    return entries


def _quantised_entries(key: str, shape: tuple[int, ...], quant: Any, scale: str | None) -> list[_Entry]:
    """The output tensors of source weight `key` [out, in] written quantised."""
    if quant == FP8:
        return [_Entry(key, torch.float8_e4m3fn, shape, scale, key, quant),
                _Entry(key + SCALE_SUFFIX, torch.float32, tuple(fp8_scale_shape(shape, FP8_BLOCK)), scale, key, quant)]
    scheme = quantized.scheme_of(quant)
    module = key.removesuffix(".weight")
    return [_Entry(k, dt, shp, scale, key, quant)
            for k, (dt, shp) in quantized.disk_shapes(module, scheme.bits, *shape, scheme.group_size).items()]


def _quantised(reader: CheckpointReader, entry: _Entry, block_size: tuple[int, int] | None,
               memo: dict[str, Any]) -> torch.Tensor:
    """Output `entry` of a quantised source weight; the outputs of the last source quantised are kept (`memo`)
    for the entries that follow it. The source is read and quantised in chunks of whole 128-row blocks
    (CHUNK_ELEMENTS values), so memory holds its outputs and one fp32 chunk, never the tensor in fp32."""
    if entry.key.endswith(".weight_shape"):                # known without quantising
        return torch.tensor(reader.shape(entry.source), dtype=torch.int64)
    if memo.get("source") != entry.source:
        memo.clear()
        rows, cols = reader.shape(entry.source)
        step = max(128, CHUNK_ELEMENTS // cols // 128 * 128)   # whole FP8 blocks and packed zero-point words
        chunks = []
        for r0 in range(0, rows, step):
            dense = _dense_rows(reader, entry, r0, min(rows, r0 + step), block_size)      # [rows', in] fp32
            if entry.quant == FP8:
                q, scale_inv = quantize_fp8_blocks(dense, FP8_BLOCK)
                chunks.append({entry.source: q, entry.source + SCALE_SUFFIX: scale_inv})
            else:
                chunks.append(quantized.quantize_matrix(entry.source.removesuffix(".weight"), dense, entry.quant))
            del dense
        out = {k: torch.cat([c[k] for c in chunks]) if len(chunks) > 1 else chunks[0][k]
               for k in chunks[0] if not k.endswith(".weight_shape")}
        memo.update(source=entry.source, tensors=out)
    return memo["tensors"][entry.key]


def _dense_rows(reader: CheckpointReader, entry: _Entry, r0: int, r1: int,
                block_size: tuple[int, int] | None) -> torch.Tensor:
    """Rows [r0, r1) of the source of `entry` in fp32 (as from_pretrained reads a tensor it quantises): cast,
    or FP8 dequantised over the whole blocks that hold them."""
    assert entry.source is not None
    if entry.scale is None:
        return reader.read(entry.source, rows=(r0, r1)).float()
    assert block_size is not None
    bo = block_size[0]
    a, b = r0 // bo * bo, min(-(-r1 // bo) * bo, reader.shape(entry.source)[0])
    scale = reader.read(entry.scale, rows=(a // bo, -(-b // bo)))
    return dequantize_checked(reader.read(entry.source, rows=(a, b)), scale, block_size, torch.float32,
                              entry.source)[r0 - a: r1 - a]


def _producer(reader: CheckpointReader, entry: _Entry, block_size: tuple[int, int] | None,
              memo: dict[str, Any] | None = None) -> LazyTensor:
    def produce() -> torch.Tensor:
        if entry.quant is not None:
            return _quantised(reader, entry, block_size, memo if memo is not None else {})
        t = reader.read(entry.key)
        if entry.scale is not None:
            assert block_size is not None
            scale = reader.read(entry.scale)
            return dequantize_checked(t, scale, block_size, entry.dtype, entry.key)
        if entry.key.endswith(SCALE_SUFFIX):              # keep_fp8: scales copied as they are
            check_scales_finite(t, entry.key)
        return t if t.dtype == entry.dtype else t.to(entry.dtype)

    return LazyTensor(entry.dtype, entry.shape, produce)


def _shard(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """Greedy in order, as save_safetensors_sharded does: a tensor that does not fit starts a new shard."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _source_identity(src: Path, reader: CheckpointReader) -> dict[str, Any]:
    """What makes a resumed run safe to mix with the shards already written: every source file that feeds
    the output by (size, mtime_ns), plus a digest of every tensor header (name, dtype, shape, offsets)."""
    files = [src / "config.json", *([reader.index_path] if reader.index_path else []), *map(Path, reader.files())]
    headers = [[k, DTYPE_NAMES[reader.dtype(k)], list(reader.shape(k)), Path(reader.file_of(k)).name]
               for k in sorted(reader.keys())]
    return {"files": {p.name: _file_stamp(p) for p in files},
            "headers": hashlib.sha256(json.dumps(headers).encode()).hexdigest()}


def _source_change(before: dict[str, Any], now: dict[str, Any]) -> str:
    """A sentence naming what differs between two `_source_identity` results."""
    old, new = before.get("files", {}), now["files"]
    for name in sorted(set(old) | set(new)):
        if name not in new:
            return f"{name} was part of the source and is gone"
        if name not in old:
            return f"{name} is new in the source"
        if old[name] != new[name]:
            return (f"{name} changed (size {old[name][0]} -> {new[name][0]} bytes, modified "
                    f"{'at the same time' if old[name][1] == new[name][1] else 'since'})")
    return "the tensor headers differ"


def _is_complete(path: Path, shard: list[_Entry], stamp: list[int] | None) -> bool:
    """A shard file that an earlier run finished (recorded `stamp` = [size, mtime_ns] in the marker), untouched
    since (same size and mtime), whose header parses and holds exactly the planned tensors."""
    if stamp is None or not path.is_file() or _file_stamp(path) != stamp:
        return False
    try:
        infos, _ = read_safetensors_header(path)
    except CheckpointError:
        return False
    want = {e.key: (e.dtype, e.shape) for e in shard}
    return {k: (i.dtype, i.shape) for k, i in infos.items()} == want


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | torch.dtype | None = "bfloat16",
                       keep_fp8: bool = False, max_shard_size: int | str = "5GB", overwrite: bool = False,
                       validate: bool = True, progress: bool | None = None,
                       quantize: str | None = None, quantize_head: str | None = None) -> ConvertResult:
    """Convert the checkpoint directory `src` into `dst` (see the module docstring).

    dtype: output dtype of floating tensors ("bfloat16", "float16", "float32", or "auto" = as stored, FP8
    dequantised to bfloat16). keep_fp8: copy FP8 weights and scales as they are (re-sharding only).
    overwrite: allow a non-empty `dst` that is not an interrupted run of this same conversion.
    validate: check the source against config.json as from_pretrained would (needs the model definition).
    quantize: None, "int8", "int4" (compressed-tensors pack-quantized) or "fp8" (DeepSeek's block FP8).
    quantize_head: with quantize="int8"|"int4", the LM heads' format: None (int8), "int8" or "int4"
    (from_pretrained's head_quantization).
    """
    src, dst = Path(src), Path(dst)
    out_dtype = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"max_shard_size={max_shard_size!r}: must be positive")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZE_CHOICES} (or None: weights as stored)")
    if quantize_head is not None:
        if quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize_head={quantize_head!r} applies with quantize='int8' or 'int4' (got "
                             f"quantize={quantize!r}): FP8 conversions keep the heads as stored")
        if quantize_head not in HEAD_QUANTIZATIONS:
            raise ValueError(f"quantize_head={quantize_head!r}: expected one of {HEAD_QUANTIZATIONS} or None (int8)")
    if quantize is not None and keep_fp8:
        raise ValueError(f"keep_fp8 with quantize={quantize!r}: choose one — copy the FP8 weights as they are, or "
                         "write them quantised")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{src}: no config.json; expected a Hugging Face checkpoint directory")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the output directory is the source; write the conversion to a new directory")
    try:
        raw_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{config_path}: not valid JSON ({e}); re-download or fix the file") from None
    config = DeepseekV3Config.from_dict(raw_config)
    if quantized.is_quantized_checkpoint(config):
        raise CheckpointError(f"{src}: already quantised (compressed-tensors int8/int4); convert from the bf16 or FP8 "
                              "checkpoint it was made from")
    spec = parse_quantization_config(config.quantization_config)
    created = _check_writable(dst)

    try:
        reader = CheckpointReader(src)
    except BaseException:
        _remove_if_empty(dst, created)
        raise
    with reader:
        try:
            scales = _fp8_pairs(reader, set(reader.keys()), spec)
            prep = None
            if validate or quantize:
                from dsv3.modeling import DeepseekV3ForCausalLM

                prep = prepare_load(DeepseekV3ForCausalLM, reader, config)
            to_quantize = _quantize_plan(prep, quantize, quantize_head) if quantize else {}
        except BaseException:
            _remove_if_empty(dst, created)
            raise
        block = spec.block_size if spec is not None else None
        shards = _shard(plan_conversion(reader, out_dtype, keep_fp8, scales, to_quantize), max_bytes)
        names = _shard_names(len(shards))
        fingerprint = hashlib.sha256(json.dumps(
            [str(src.resolve()), keep_fp8, quantize,
             [[name, [(e.key, DTYPE_NAMES[e.dtype], e.shape) for e in shard]]
              for name, shard in zip(names, shards, strict=True)]]).encode()).hexdigest()
        source = _source_identity(src, reader)
        marker = _prepare_destination(dst, {"src": str(src.resolve()), "plan": fingerprint, "source": source},
                                      overwrite)

        total = sum(e.nbytes for shard in shards for e in shard)
        if progress is None:
            progress = sys.stderr.isatty()
        reused = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Converting to {dst.name}",
                  disable=not progress) as bar:
            for name, shard in zip(names, shards, strict=True):
                final = dst / name
                if _is_complete(final, shard, marker["done"].get(name)):
                    logger.info("%s: already written by the interrupted run, kept", final)
                    reused += 1
                    bar.update(sum(e.nbytes for e in shard))
                    continue
                tmp = _temp_path(dst, Path(name).stem)
                memo: dict[str, Any] = {}
                try:
                    write_safetensors_file(tmp, [(e.key, _producer(reader, e, block, memo)) for e in shard],
                                           {"format": "pt"}, bar.update)
                    os.replace(tmp, final)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                marker["done"][name] = _file_stamp(final)      # a resumed run may keep it from now on
                atomic_write_text(dst / MARKER_NAME, json.dumps(marker) + "\n")

    finals = [dst / n for n in names]
    if len(finals) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {e.key: n for n, shard in zip(names, shards, strict=True) for e in shard}}
        atomic_write_text(dst / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
    else:
        (dst / INDEX_NAME).unlink(missing_ok=True)
    for p in dst.iterdir():                                   # shards of an earlier, different save
        if (_SHARD_RE.match(p.name) or p.name == SINGLE_NAME) and p not in finals:
            p.unlink()
    copied = _copy_other_files(src, dst)

    if not keep_fp8 or not scales:
        raw_config.pop("quantization_config", None)
    if quantize == FP8:
        raw_config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": list(FP8_BLOCK)}
    elif quantize:
        assert prep is not None
        raw_config["quantization_config"] = _int_config(prep, to_quantize)
    dtypes = {e.dtype for shard in shards for e in shard if e.dtype.is_floating_point and e.quant is None
              and e.dtype not in FP8_DTYPES.values() and not e.key.endswith((*NEVER_NARROWED, SCALE_SUFFIX))}
    main = out_dtype or (dtypes.pop() if len(dtypes) == 1 else None)
    if main is not None:
        raw_config["torch_dtype"] = str(main).removeprefix("torch.")
        raw_config.pop("dtype", None)
    atomic_write_text(dst / "config.json", json.dumps(raw_config, indent=2) + "\n")
    (dst / MARKER_NAME).unlink(missing_ok=True)
    _fsync_dir(dst)
    n_tensors = sum(len(s) for s in shards)
    logger.info("converted %s -> %s: %d tensors, %.2f GB in %d files (%d kept from an earlier run)",
                src, dst, n_tensors, total / 1e9, len(finals), reused)
    return ConvertResult(str(dst), [str(p) for p in finals], n_tensors, total, reused, copied)


def _check_writable(dst: Path) -> bool:
    """Before any work: create `dst` if needed and write (then remove) a probe file there, so that a directory
    that cannot be written fails now with one line, not after hours of converting. Returns whether it was
    created here."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a directory; choose a new or empty directory for the output")
    created = not dst.exists()
    try:
        dst.mkdir(parents=True, exist_ok=True)
        fd, probe = create_temp_file(dst, ".dsv3-write-test-")
        os.close(fd)
        probe.unlink()
    except OSError as e:
        if created:
            _remove_if_empty(dst, True)
        raise CheckpointError(f"{dst}: cannot write the output there ({e.strerror or e}); choose a directory you "
                              "can write to") from None
    return created


def _remove_if_empty(dst: Path, created: bool) -> None:
    if created and dst.is_dir() and not any(dst.iterdir()):
        dst.rmdir()


def _quantize_plan(prep: PreparedLoad | None, quantize: str, quantize_head: str | None = None) -> dict[str, Any]:
    """{source weight key: int format or FP8} for --quantize: the tensors from_pretrained(quantization=...,
    head_quantization=quantize_head) quantises, with its formats (int8/int4); for fp8 those of DeepSeek's FP8
    release (no heads, no eh_proj)."""
    assert prep is not None
    plan = plan_quantization(prep.model, "int8" if quantize == FP8 else quantize, torch.device("cpu"),
                             head_quantization=quantize_head)
    model_to_ckpt = {model_name: ckpt for ckpt, model_name in prep.names.items()}
    out: dict[str, Any] = {}
    for model_name, fmt in plan.items():
        if quantize == FP8 and model_name.removesuffix(".weight").endswith((*HEADS, "eh_proj")):
            continue
        source = prep.plan.sources[model_to_ckpt[model_name]]
        keys = list(source.keys())
        if not source.stacked and keys[0].endswith(("gate_up_proj", "down_proj")):
            raise CheckpointError(f"{keys[0]}: fused expert tensors; --quantize writes experts per expert (the "
                                  "layout vLLM and transformers read) and reads them per expert too. Save this "
                                  "checkpoint per expert first (from_pretrained + save_pretrained)")
        out.update({key: FP8 if quantize == FP8 else fmt for key in keys})
    return out


def _int_config(prep: PreparedLoad, to_quantize: dict[str, Any]) -> dict[str, Any]:
    """compressed-tensors quantization_config for the converted tensors; the linears left as stored are ignored."""
    from torch import nn

    from dsv3.model.weights import Linear

    names = {key.removesuffix(".weight"): quantized.scheme_of(fmt) for key, fmt in to_quantize.items()}
    n_layers = prep.config.num_hidden_layers
    ignore = [to_checkpoint_name(n, n_layers) for n, m in prep.model.named_modules()
              if isinstance(m, (nn.Linear, Linear)) and to_checkpoint_name(n, n_layers) not in names]
    return quantized.build_config(names, ignore)


def _prepare_destination(dst: Path, run: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Create `dst` and return the run's marker: {"src", "plan", "source", "done": {shard: [size, mtime_ns]}}.

    An interrupted run of the same conversion (same source path, plan and source files) is resumed: its
    "done" shards may be kept. The same conversion whose source files changed since is refused (its shards
    would mix two sources) unless `overwrite`, which starts over."""
    dst.mkdir(parents=True, exist_ok=True)
    path = dst / MARKER_NAME
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        previous = previous if isinstance(previous, dict) and isinstance(previous.get("done"), dict) else None
    except (OSError, ValueError):
        previous = None
    if previous is not None and all(previous.get(k) == run[k] for k in ("src", "plan", "source")):
        marker = {**run, "done": previous["done"]}
    else:
        if previous is not None and previous.get("src") == run["src"] and previous.get("source") != run["source"]:
            if not overwrite:
                raise CheckpointError(
                    f"{dst}: holds an interrupted conversion of {run['src']}, but the source changed since "
                    f"({_source_change(previous.get('source') or {}, run['source'])}); its shards cannot be "
                    "mixed with new ones. Pass --overwrite to convert from scratch.")
            logger.warning("%s: the source changed since the interrupted run; converting from scratch", dst)
        present = [p.name for p in dst.iterdir() if not p.name.startswith(".")]
        if present and not overwrite:
            raise CheckpointError(
                f"{dst}: the output directory is not empty ({', '.join(sorted(present)[:5])}"
                f"{', ...' if len(present) > 5 else ''}) and holds no interrupted run of this conversion; "
                "choose an empty directory or pass --overwrite to replace its checkpoint")
        marker = {**run, "done": {}}
    atomic_write_text(path, json.dumps(marker) + "\n")
    for leftover in dst.glob(".dsv3-tmp-*.tmp"):               # from a run that was killed outright
        leftover.unlink(missing_ok=True)
    # Until this run finishes the directory must not look like a finished checkpoint.
    (dst / "config.json").unlink(missing_ok=True)
    return marker


def _copy_other_files(src: Path, dst: Path) -> list[str]:
    """Top-level non-weight files (tokenizer, generation config, README, code), each copied atomically."""
    copied = []
    for p in sorted(src.iterdir()):
        if (not p.is_file() or p.name.startswith(".") or p.suffix == ".safetensors" or p.name in _NOT_COPIED):
            continue
        tmp = _temp_path(dst, p.name)
        try:
            shutil.copyfile(p, tmp)
            os.replace(tmp, dst / p.name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        copied.append(p.name)
    return copied


# -- CLI -----------------------------------------------------------------------------------------------------
def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="checkpoint directory to read (config.json + safetensors, e.g. the FP8 release)")
    parser.add_argument("dst", help="directory to write; re-run the same command to resume an interrupted run")
    parser.add_argument("--dtype", default="bfloat16", choices=_DTYPE_CHOICES,
                        help="dtype of the floating tensors written; 'auto' keeps stored dtypes and dequantises "
                             "FP8 to bfloat16 (default: bfloat16)")
    parser.add_argument("--keep-fp8", action="store_true",
                        help="copy FP8 weights and their scales unchanged (re-shard only)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="write the linear and expert weights quantised: int8 / int4 in compressed-tensors' "
                             "pack-quantized layout (from_pretrained loads it as stored; vLLM reads it), fp8 as "
                             "DeepSeek's 128x128 block FP8")
    parser.add_argument("--quantize-head", choices=("int8", "int4"), default=None,
                        help="with --quantize int8|int4: the LM heads' format (default int8; int4 reads fewer "
                             "bytes per token where the head is a large part of the model)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default: 5GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow a non-empty output directory and replace the checkpoint in it")
    parser.add_argument("--no-validate", dest="validate", action="store_false",
                        help="skip checking the source against config.json (shapes, missing/unexpected tensors)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """`dsv3 convert`: 0 on success, 1 with a one-line error on stderr for a bad checkpoint or argument."""
    try:
        result = convert_checkpoint(args.src, args.dst, dtype=args.dtype, keep_fp8=args.keep_fp8,
                                    max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                    validate=args.validate, progress=args.progress, quantize=args.quantize,
                                    quantize_head=args.quantize_head)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"dsv3 convert: error: {e}", file=sys.stderr)
        return 1
    reused = f", {result.reused_shards} kept from the interrupted run" if result.reused_shards else ""
    print(f"wrote {result.tensors} tensors ({result.total_bytes / 1e9:.2f} GB) in {len(result.files)} file(s) to "
          f"{result.directory}{reused}; copied {', '.join(result.copied) or 'no other files'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_convert_arguments(argparse.ArgumentParser(prog="dsv3 convert", description=__doc__.split("\n")[0]))
    return run_convert(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
