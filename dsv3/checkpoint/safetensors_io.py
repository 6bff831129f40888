"""Reading and writing HF safetensors checkpoints, with the checks a 700 GB download needs.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
JSON `{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}` padded with
spaces, then the tensor bytes, back to back, offsets relative to the end of the header. A sharded
checkpoint adds `model.safetensors.index.json` = `{"metadata": {"total_size": ...}, "weight_map":
{name: shard file}}`.

Reading. `CheckpointReader` validates the whole directory before a single tensor is touched: the index
parses, every shard it names exists and holds the tensors it claims, and every file's own header parses
and its tensor data exactly fills the file. We parse the headers ourselves (a few KB per file) because
the usual failure is a truncated or half-downloaded shard, and the cheap header-vs-size comparison names
the file, the tensor that is cut off, and how many bytes are missing — instead of a bare error from
deep inside a load an hour later; our parse also gives the byte offsets `read` needs. Before the first
data access to a file, `safetensors.safe_open(framework="pt")` opens it too: safetensors' own header
validation (the rules every other reader applies), cross-checked against ours. Opening maps the file
without reading it (not done at construction: a header-only check of a 700 GB checkpoint must not map it).

Three ways to get data, none of which needs numpy (not a dsv3 dependency; bytes move through
`byte_view`, a ctypes view of a tensor's own memory):
* `read` copies a tensor with plain `pread`s straight into a destination tensor (the loader's final
  parameter): pages of an mmap stay resident and count towards the process's memory until it is unmapped,
  so a loader that went through the mmap would briefly hold the file *and* the model — two copies.
* `read_slice` returns rows [a, b) and/or columns [c, d) through `get_slice`, touching only the pages of
  those rows — what a tensor-parallel rank loading its shard needs (`fp8.read_fp8_slice` adds the scale
  block rows of an FP8 weight). The slice is copied out of the mapping.
* `get` / `get_slice` hand out safetensors' mmap-backed tensor / lazy slice as they are.

Writing. `save_safetensors_sharded` streams: tensors are grouped into shards in the order given, and a
shard is written as soon as it is full, so at most one shard's tensors are held (for a generator
input), plus one contiguous copy of a tensor that was not contiguous. `write_safetensors_file` takes
*lazy* entries (name, dtype, shape, producer): the header needs only names, dtypes and shapes, so each
tensor can be produced (read, dequantised, cast) just before its bytes are written and dropped after —
`dsv3 convert` holds one tensor at a time. We write the bytes ourselves
(header, then each tensor's memory), which also makes tensors that share storage a non-issue. Every
file goes to a hidden temporary name first; only when all shards and the index are complete do they
`os.replace` into their final names, so a failed save leaves the previous checkpoint as it was and
never a half-written file under a real name. Stale shards of a previous save with another shard count
are removed afterwards, in an order where the reader's view of the directory stays consistent.
"""

from __future__ import annotations

import ctypes
import difflib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm
from typing_extensions import Self

from dsv3.checkpoint.atomic import create_temp_file
from dsv3.checkpoint.errors import CheckpointError

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SHARD_RE = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_TMP_PREFIX = ".dsv3-tmp-"
_MAX_HEADER_BYTES = 100_000_000            # safetensors' own limit
_FIX = "re-download it or re-save the checkpoint"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; offsets are relative to the start of the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes — its own memory, no copy and no numpy.

    torch tensors do not export the buffer protocol and `Tensor.numpy()` needs numpy, which dsv3 does not
    depend on; ctypes wraps the data pointer instead. The view does not keep `t` alive: the caller holds it."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"byte_view needs a contiguous CPU tensor, got {t.device} contiguous={t.is_contiguous()}")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one file's header against its size -> ({name: TensorInfo}, __metadata__)."""
    infos, metadata, _ = _read_header(Path(path))
    return infos, metadata


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """read_safetensors_header plus the file offset where the data section starts (8 + header length)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if n < 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: not a valid safetensors file — it is {size} bytes and its first 8 bytes give a "
                    f"header length of {n if n >= 0 else 'nothing'} bytes (expected at most "
                    f"{max(size - 8, 0)}). The file is truncated or corrupt; {_FIX}.")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header ({n} bytes) is not valid JSON ({e}); the file "
                              f"is corrupt — {_FIX}.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, expected "
                              f"an object of tensor entries; the file is corrupt — {_FIX}.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {metadata!r}; {_FIX}.")
    infos = {key: _parse_entry(path, key, entry) for key, entry in header.items()}

    # The data must tile [0, data_size) exactly, as safetensors itself requires.
    data_size = size - 8 - n
    expected = 0
    for key, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != expected:
            raise CheckpointError(
                f"{path}: tensor {key} has data_offsets [{info.begin}, {info.end}] but the previous tensor "
                f"ends at {expected}; tensors must be stored back to back. The header is corrupt — {_FIX}.")
        if info.end > data_size:
            raise CheckpointError(
                f"{path}: truncated — the header says tensor {key} occupies bytes [{info.begin}, {info.end}) "
                f"of the data section and the tensors need {8 + n + max(i.end for i in infos.values())} "
                f"bytes in all, but the file is only {size} bytes. The download or save was cut short; "
                f"{_FIX}.")
        expected = info.end
    if expected != data_size:
        raise CheckpointError(
            f"{path}: the header accounts for {8 + n + expected} bytes but the file is {size} bytes "
            f"({data_size - expected} unexpected trailing bytes); the file is corrupt — {_FIX}.")
    return infos, metadata, 8 + n


def _parse_entry(path: Path, key: str, entry: Any) -> TensorInfo:
    ok = (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
          and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
          and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
          and all(isinstance(o, int) for o in entry["data_offsets"])
          and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1])
    if not ok:
        raise CheckpointError(f"{path}: header entry for tensor {key} is malformed: expected "
                              f'{{"dtype", "shape", "data_offsets": [begin, end]}}, got {entry!r}; {_FIX}.')
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {key} has dtype {entry.get('dtype')!r}, which dsv3 cannot "
                              f"read; supported: {sorted(DTYPES)}.")
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    need = math.prod(shape) * dtype.itemsize
    if end - begin != need:
        raise CheckpointError(f"{path}: tensor {key} ({entry['dtype']}, shape {list(shape)}) needs {need} "
                              f"bytes but its data_offsets [{begin}, {end}] span {end - begin}; {_FIX}.")
    return TensorInfo(dtype, shape, begin, end)


def _open_validated(path: Path, infos: Mapping[str, TensorInfo]) -> Any:
    """`safe_open` the file (safetensors' own header validation) and check it sees what our parser saw.

    Our parser runs first because it names the truncated tensor and the missing byte count; safetensors'
    checks are the reference for everything else (its rules are the ones every other reader applies)."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: safetensors rejects the file ({e}); {_FIX}.") from e
    except RuntimeError as e:             # torch could not map it (e.g. larger than the memory it may map)
        raise CheckpointError(f"{path}: cannot map the file ({e})") from e
    if set(handle.keys()) != set(infos):
        raise CheckpointError(f"{path}: safetensors and dsv3 disagree on the tensor names in the header; {_FIX}.")
    for key, info in infos.items():
        sl = handle.get_slice(key)
        if tuple(sl.get_shape()) != info.shape or DTYPES.get(sl.get_dtype()) != info.dtype:
            raise CheckpointError(f"{path}: tensor {key}: safetensors reads {sl.get_dtype()} {sl.get_shape()}, "
                                  f"dsv3 {DTYPE_NAMES[info.dtype]} {list(info.shape)}; {_FIX}.")
    return handle


class CheckpointReader:
    """Validated, mmap-backed access to `model.safetensors` or an indexed set of shards in a directory.

    Use as a context manager; tensors returned by `get` stay valid after `close()` (they hold the mmap).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.index_path: Path | None = None
        self._key_file: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._metadata: dict[str, str] = {}
        self._handles: dict[Path, Any] = {}
        self._data_start: dict[Path, int] = {}
        self._fds: dict[Path, int] = {}
        self._file_infos: dict[Path, dict[str, TensorInfo]] = {}
        by_file = self._locate()
        for path, keys in by_file.items():
            infos, metadata, self._data_start[path] = _read_header(path)
            self._file_infos[path] = infos
            if keys is None:                         # single file: everything in it
                keys = list(infos)
            absent = [k for k in keys if k not in infos]
            if absent:
                raise CheckpointError(
                    f"{path}: {INDEX_NAME} says this shard holds {len(absent)} tensors that it does not "
                    f"contain (e.g. {', '.join(absent[:5])}); the index and the shards come from different "
                    "saves — re-download them together or re-save the checkpoint.")
            extra = sorted(set(infos) - set(keys))
            if extra:
                logger.warning("%s holds %d tensors that %s does not list (e.g. %s); ignoring them",
                               path, len(extra), INDEX_NAME, ", ".join(extra[:3]))
            for k in keys:
                self._key_file[k] = path
                self._infos[k] = infos[k]
            for k, v in metadata.items():
                self._metadata.setdefault(k, v)
        logger.debug("checkpoint %s: %d tensors in %d files", self.directory, len(self), len(by_file))

    def _locate(self) -> dict[Path, list[str] | None]:
        """{file: keys it must hold (None = all of a single file)}, in file order."""
        d = self.directory
        if d.is_file() and d.suffix == ".safetensors":
            return {d: None}
        if not d.is_dir():
            raise CheckpointError(f"{d}: no such checkpoint directory (expected a directory holding "
                                  f"{SINGLE_NAME} or {INDEX_NAME} and its shards)")
        if (d / INDEX_NAME).is_file():
            self.index_path = d / INDEX_NAME
            return self._read_index(self.index_path)
        if (d / SINGLE_NAME).is_file():
            return {d / SINGLE_NAME: None}
        found = sorted(p for p in d.glob("*.safetensors") if not p.name.startswith("."))
        if len(found) == 1:
            return {found[0]: None}
        if not found:
            raise CheckpointError(f"{d}: no {SINGLE_NAME}, {INDEX_NAME} or other *.safetensors file; "
                                  "expected a Hugging Face checkpoint directory")
        names = ", ".join(p.name for p in found[:5]) + (", ..." if len(found) > 5 else "")
        raise CheckpointError(f"{d}: {len(found)} *.safetensors files ({names}) but no {INDEX_NAME} saying "
                              "which tensor is in which; restore the index file or re-save the checkpoint.")

    def _read_index(self, index: Path) -> dict[Path, list[str] | None]:
        layout = 'JSON {"metadata": {"total_size": N}, "weight_map": {tensor name: shard file name}}'
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid index ({e}); expected {layout}. "
                                  f"{_FIX.capitalize()}.") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
            raise CheckpointError(f"{index}: missing, empty or malformed weight_map; expected {layout}. "
                                  f"{_FIX.capitalize()}.")
        by_name: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_name.setdefault(fname, []).append(key)
        bad = [f for f in by_name if Path(f).name != f]
        if bad:
            raise CheckpointError(f"{index}: shard names must be plain file names in {self.directory}, "
                                  f"got {bad[:3]}")
        missing = [f for f in by_name if not (self.directory / f).is_file()]
        if missing:
            first = by_name[missing[0]]
            raise CheckpointError(
                f"{index}: {len(missing)} of {len(by_name)} shards are missing from {self.directory}: "
                f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}. {missing[0]} should hold "
                f"{len(first)} tensors (e.g. {', '.join(first[:3])}). Download the missing shards, or "
                "re-save the checkpoint.")
        return {self.directory / f: keys for f, keys in by_name.items()}

    # -- queries (header only, no data read) ----------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._key_file)

    def __contains__(self, key: object) -> bool:
        return key in self._key_file

    def __len__(self) -> int:
        return len(self._key_file)

    def __iter__(self) -> Iterator[str]:
        return iter(self._key_file)

    def _info(self, key: str) -> TensorInfo:
        info = self._infos.get(key)
        if info is None:
            close = difflib.get_close_matches(key, self._infos, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CheckpointError(f"{self.directory}: no tensor named {key!r} in this checkpoint "
                                  f"({len(self._infos)} tensors){hint}")
        return info

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._info(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._info(key).dtype

    def nbytes(self, key: str) -> int:
        return self._info(key).nbytes

    def file_of(self, key: str) -> str:
        self._info(key)
        return str(self._key_file[key])

    def files(self) -> list[str]:
        return list(dict.fromkeys(str(p) for p in self._key_file.values()))

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self._infos.values())

    def metadata(self) -> dict[str, str]:
        """The files' `__metadata__` merged (first file wins on a conflict), e.g. {"format": "pt"}."""
        return dict(self._metadata)

    # -- data (mmap) ---------------------------------------------------------------------------------------
    def _handle(self, key: str) -> tuple[Path, Any]:
        """The file's `safe_open` handle, opened (and its header validated by safetensors) on first use."""
        self._info(key)
        path = self._key_file[key]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = _open_validated(path, self._file_infos[path])
        return path, handle

    def get(self, key: str) -> torch.Tensor:
        """The tensor, backed by the mmap'd file (read-only in spirit: copy before writing into it)."""
        path, handle = self._handle(key)
        try:
            return handle.get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor {key} ({e}); {_FIX}.") from e

    def get_slice(self, key: str) -> Any:
        """A lazy safetensors slice: index it (`s[0:128]`) to read only those rows from disk."""
        path, handle = self._handle(key)
        try:
            return handle.get_slice(key)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor {key} ({e}); {_FIX}.") from e

    def read_slice(self, key: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [r0, r1) and/or columns [c0, c1) of a 2-D (or stacked 3-D: the last two dims) tensor, read
        through `get_slice` — only the bytes of those rows are touched, not the whole tensor (what a
        tensor-parallel rank loading its shard needs). Returns a private copy, or fills `out`."""
        info = self._info(key)
        if len(info.shape) < 2:
            raise ValueError(f"read_slice({key!r}): needs a tensor of 2 or more dims, it has shape {list(info.shape)}")
        index = []
        for name, bounds, size in (("rows", rows, info.shape[-2]), ("cols", cols, info.shape[-1])):
            lo, hi = (0, size) if bounds is None else bounds
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= size):
                raise ValueError(f"read_slice({key!r}): {name}={bounds!r} is not a range [a, b) within "
                                 f"[0, {size}] (tensor shape {list(info.shape)})")
            index.append(slice(lo, hi))
        path, handle = self._handle(key)
        try:
            part = handle.get_slice(key)[(*([slice(None)] * (len(info.shape) - 2)), *index)]
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor {key} ({e}); {_FIX}.") from e
        # `part` is a view into the file's mapping (only its own pages are read when touched): copy those
        # out, so the result neither pins the mapping nor shares pages with it.
        if out is None:
            return part.clone(memory_format=torch.contiguous_format)
        if out.dtype != part.dtype or tuple(out.shape) != tuple(part.shape):
            raise ValueError(f"read_slice({key!r}): out must be {part.dtype} {list(part.shape)}, got {out.dtype} "
                             f"{list(out.shape)}")
        return out.copy_(part)

    def read(self, key: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A private copy of the tensor, read with `pread` (no mmap): into `out` when given (a contiguous CPU
        tensor of the same dtype and element count, e.g. a slice of a stacked parameter), else a new one.
        `rows` (r0, r1): only rows [r0, r1) of dim 0 (their bytes are contiguous in the file)."""
        info = self._info(key)
        if rows is not None:
            r0, r1 = rows
            if not (info.shape and 0 <= r0 <= r1 <= info.shape[0]):
                raise ValueError(f"read({key!r}): rows={rows!r} is not a range of rows of shape {list(info.shape)}")
            row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
            info = TensorInfo(info.dtype, (r1 - r0, *info.shape[1:]), info.begin + r0 * row_bytes,
                              info.begin + r1 * row_bytes)
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        elif (out.dtype != info.dtype or out.numel() != math.prod(info.shape) or out.device.type != "cpu"
              or not out.is_contiguous()):
            raise ValueError(f"read({key!r}): out must be a contiguous CPU {info.dtype} tensor of "
                             f"{math.prod(info.shape)} elements, got {out.dtype} {tuple(out.shape)} on {out.device}")
        if out.numel() == 0:
            return out
        path = self._key_file[key]
        fd = self._fds.get(path)
        if fd is None:
            self._handle(key)                               # safetensors' header checks, once per file
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open the file ({e}); {_FIX}.") from e
        view = byte_view(out)
        offset, done = self._data_start[path] + info.begin, 0
        while done < info.nbytes:                           # one pread returns at most ~2 GiB on Linux
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot read tensor {key} ({e}); {_FIX}.") from e
            if n == 0:
                raise CheckpointError(f"{path}: tensor {key} ends at byte {offset + info.nbytes} but the file "
                                      f"ended at byte {offset + done} (it shrank after it was opened); {_FIX}.")
            done += n
        return out

    def close(self) -> None:
        self._handles.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CheckpointReader({str(self.directory)!r}, {len(self)} tensors, {len(self.files())} files, "
                f"{self.total_bytes() / 2**30:.2f} GiB)")


# -- writing -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LazyTensor:
    """A tensor to be written, known by dtype and shape before it exists; `produce()` makes it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors_file(path: str | os.PathLike, entries: Iterable[tuple[str, LazyTensor]],
                           metadata: Mapping[str, str] | None = None,
                           on_bytes: Callable[[int], object] = lambda n: None) -> None:
    """Write one safetensors file at `path` (not atomically: write to a temporary name and rename), producing
    and writing one tensor at a time, and fsync it. A produced tensor must match its declared dtype and shape."""
    # Largest itemsize first (then by name, as safetensors does): with the 8-byte-aligned header every
    # tensor then starts at a multiple of its own itemsize, so mmap'd views are aligned.
    ordered = sorted(entries, key=lambda kv: (-kv[1].dtype.itemsize, kv[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, lazy in ordered:
        header[key] = {"dtype": DTYPE_NAMES[lazy.dtype], "shape": list(lazy.shape),
                       "data_offsets": [offset, offset + lazy.nbytes]}
        offset += lazy.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, lazy in ordered:
            t = lazy.produce()
            if t.dtype != lazy.dtype or tuple(t.shape) != tuple(lazy.shape):
                raise CheckpointError(f"{path}: tensor {key} was declared {lazy.dtype} {list(lazy.shape)} but "
                                      f"produced as {t.dtype} {list(t.shape)}")
            # Copies only a non-contiguous or non-CPU tensor; a view into shared storage writes just its own
            # bytes, so tensors sharing storage need no special case.
            data = t.detach().to("cpu").resolve_conj().contiguous()
            del t
            if data.numel():
                f.write(byte_view(data))             # the tensor's own memory: no copy
            on_bytes(lazy.nbytes)
            del data
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors_file(path: Path, items: list[tuple[str, torch.Tensor]], metadata: Mapping[str, str],
                            on_bytes: Callable[[int], object] = lambda n: None) -> None:
    entries = [(k, LazyTensor(t.dtype, tuple(t.shape), lambda t=t: t)) for k, t in items]
    write_safetensors_file(path, entries, metadata, on_bytes)


def _temp_path(directory: Path, stem: str) -> Path:
    """A new empty hidden file in `directory` (mode 0o666 minus the umask, as the final file should have)."""
    fd, path = create_temp_file(directory, prefix=f"{_TMP_PREFIX}{stem}-", suffix=".tmp")
    os.close(fd)
    return path


def _check_tensor(key: Any, t: Any, seen: set[str]) -> None:
    if not isinstance(key, str) or key == "__metadata__":
        raise CheckpointError(f"cannot save a tensor under the name {key!r}: names must be strings other "
                              "than '__metadata__'")
    if key in seen:
        raise CheckpointError(f"tensor {key} is given twice; every name must be unique in a checkpoint")
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"tensor {key} is a {type(t).__name__}, expected a torch.Tensor")
    if t.layout != torch.strided or t.is_meta:
        raise CheckpointError(f"tensor {key} is {'on the meta device' if t.is_meta else f'{t.layout}'}; only "
                              "materialised dense tensors can be saved")
    if t.dtype not in DTYPE_NAMES:
        raise CheckpointError(f"tensor {key} has dtype {t.dtype}, which safetensors cannot store; convert it "
                              f"to one of {sorted(str(d) for d in DTYPE_NAMES)}")
    seen.add(key)


def _previous_shards(directory: Path) -> set[Path]:
    """Files a previous save left here: standard shard names plus whatever an existing index names."""
    stale = {p for p in directory.iterdir() if _SHARD_RE.match(p.name)}
    try:
        weight_map = json.loads((directory / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        stale |= {directory / f for f in set(weight_map.values()) if isinstance(f, str) and Path(f).name == f}
    except (OSError, ValueError, KeyError, TypeError):
        pass                                  # no index, or an unreadable one: the pattern above suffices
    return stale


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors_sharded(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                             directory: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
                             metadata: Mapping[str, str] | None = None, progress: bool = False) -> list[str]:
    """Write `tensors` as a HF checkpoint in `directory`; returns the safetensors file paths written.

    One shard -> `model.safetensors` (and no index); more -> `model-0000i-of-0000N.safetensors` plus
    `model.safetensors.index.json`, as transformers writes them. Tensors fill shards in the order
    given; a tensor larger than `max_shard_bytes` gets a shard of its own. `metadata` (default
    {"format": "pt"}, which transformers checks for) goes into every file's header. The save is atomic
    per file and the directory never mixes two saves; shards of an earlier save are removed.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be positive")
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"metadata={meta!r}: safetensors metadata maps strings to strings")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(f"{_TMP_PREFIX}*.tmp"):       # from a save that was killed outright
        leftover.unlink(missing_ok=True)

    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    total = sum(getattr(t, "nbytes", 0) for t in tensors.values()) if isinstance(tensors, Mapping) else None
    temps: list[Path] = []
    shard_keys: list[list[str]] = []
    tensor_bytes: dict[str, int] = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"Saving {directory.name}", disable=not progress)
    try:
        seen: set[str] = set()
        pending: list[tuple[str, torch.Tensor]] = []
        pending_bytes = 0
        for key, t in items:
            _check_tensor(key, t, seen)
            nbytes = t.numel() * t.element_size()
            if pending and pending_bytes + nbytes > max_shard_bytes:
                _flush_shard(directory, pending, meta, temps, shard_keys, bar)
                pending, pending_bytes = [], 0
            pending.append((key, t))
            pending_bytes += nbytes
            tensor_bytes[key] = nbytes
        if pending or not temps:
            _flush_shard(directory, pending, meta, temps, shard_keys, bar)
        del pending

        n = len(temps)
        names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if n > 1 else [SINGLE_NAME]
        finals = [directory / name for name in names]
        index_tmp = None
        if n > 1:
            index = {"metadata": {"total_size": sum(tensor_bytes.values())},
                     "weight_map": {k: f for f, keys in zip(names, shard_keys, strict=True) for k in keys}}
            index_tmp = _temp_path(directory, "index")
            temps.append(index_tmp)
            with open(index_tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        _commit(directory, temps[:n], finals, index_tmp)
    except BaseException:
        for p in temps:
            p.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    logger.info("saved %d tensors (%.2f GiB) to %s in %d file(s)", len(tensor_bytes),
                sum(tensor_bytes.values()) / 2**30, directory, n)
    return [str(p) for p in finals]


def _flush_shard(directory: Path, pending: list[tuple[str, torch.Tensor]], meta: Mapping[str, str],
                 temps: list[Path], shard_keys: list[list[str]], bar: tqdm) -> None:
    tmp = _temp_path(directory, f"shard{len(temps) + 1:05d}")
    temps.append(tmp)                          # registered first, so a failed write is cleaned up
    _write_safetensors_file(tmp, pending, meta, bar.update)
    shard_keys.append([k for k, _ in pending])


def _commit(directory: Path, temps: list[Path], finals: list[Path], index_tmp: Path | None) -> None:
    """Move complete files into place so that a reader sees the old save or the new one, never a mix.

    The reader prefers the index, then model.safetensors. Sharded: an old index must never point into a
    new shard, so it goes first if any shard name is reused; the new index lands after its shards.
    Single: model.safetensors lands first (an old index still shadows it, consistently), then the old
    index goes. Stale shards are deleted last, when nothing refers to them.
    """
    stale = _previous_shards(directory)
    index_path = directory / INDEX_NAME
    if index_tmp is not None:
        if any(p.exists() for p in finals):
            index_path.unlink(missing_ok=True)
        for tmp, final in zip(temps, finals, strict=True):
            os.replace(tmp, final)
        os.replace(index_tmp, index_path)
        stale.add(directory / SINGLE_NAME)
    else:
        os.replace(temps[0], finals[0])
        index_path.unlink(missing_ok=True)
    for p in stale - set(finals):
        if p.is_file():
            p.unlink()
            logger.debug("removed stale shard %s", p)
    _fsync_dir(directory)
