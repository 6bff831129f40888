"""Weights on transparent huge pages: `weight_empty` allocates the tensors a loader fills.

Decoding on a CPU streams every weight once per token. On 4 KiB pages a 450 MB read is ~110 000 TLB entries and
the hardware prefetchers stop at every page edge; on 2 MiB pages it is ~220. Measured on the bench machine
(2-core EPYC Zen 4): the same int8 kernel over 7 copies of a 21888×2048 matrix, calls interleaved in one
process, 27–32 GB/s on 4 KiB pages against 29–43 GB/s on huge pages (medians of 280 calls, two runs); whole
compiled decode steps on the bench shape, two processes stepping in turn: int4 +4.7 %, bf16 +0.5 %.

Linux backs an anonymous region with huge pages on first touch when the region is 2 MiB-aligned and advised
(`madvise(MADV_HUGEPAGE)`, THP mode "madvise") or always (mode "always"). `weight_empty` over-allocates by one
huge page, advises the aligned part and returns a view of it; the unused slack is never touched, so it is
address space, not memory. Elsewhere (mode "never", not Linux, tensors under 2 MiB, other devices) it is
`torch.empty`. PyTorch's own switch, the environment variable THP_MEM_ALLOC_ENABLE=1, does this for every
allocation but only when set before torch's first allocation — not something a library can rely on.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def thp_mode() -> str:
    """The kernel's THP mode ("always", "madvise", "never"), or "" where there is none (not Linux)."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return ""
    return text[text.index("[") + 1: text.index("]")] if "[" in text else ""


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:
    if thp_mode() not in ("always", "madvise"):
        logger.info("weights on 4 KiB pages (transparent huge pages: %s)", thp_mode() or "not available")
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    logger.info("weights of 2 MiB and more on transparent huge pages (THP mode %s)", thp_mode())
    return fn


def weight_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype, device=device)`, on 2 MiB-aligned, huge-page-advised memory where the
    tensor is a CPU tensor of at least 2 MiB and the kernel offers transparent huge pages."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < HUGE_PAGE or (madvise := _madvise()) is None:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8, device=device)
    offset = -raw.data_ptr() % HUGE_PAGE
    start = raw.data_ptr() + offset
    if madvise(start, nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE) != 0:   # whole huge pages only
        logger.warning("madvise(MADV_HUGEPAGE) failed (errno %d); weights on 4 KiB pages", ctypes.get_errno())
        return torch.empty(shape, dtype=dtype, device=device)
    return raw[offset: offset + nbytes].view(dtype).view(shape)



# -- keeping freed memory: prefill's large temporaries without page faults ------------------------------------------
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3            # glibc mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20                           # the largest mmap threshold glibc accepts on 64-bit
KEEP_FREED_ENV = "DSV3_KEEP_FREED_MEMORY"               # "0": leave glibc's defaults alone


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (blocks up to 32 MiB from the heap, no trimming), once per
    process; True where it took effect (Linux with glibc, not opted out through DSV3_KEEP_FREED_MEMORY=0).

    A prefill allocates and frees hundreds of MB of temporaries ([rows, hidden] activations, expert outputs). With
    glibc's defaults large blocks come from fresh mmaps or a trimmed heap and every 4 KiB page faults on first touch —
    measured on the bench shape (2-core Xeon VM, 512 tokens): 41–57 thousand faults and 55–98 ms of system time per
    prefill, 441–453 ms against 405–409 ms with freed memory kept (0 faults). The cost: the process keeps its peak
    heap (freed memory is reused, not returned to the OS). dsv3.kernels.select_kernels calls this when it picks the
    CPU kernels (inference on the CPU); `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` do the same by hand."""
    if os.environ.get(KEEP_FREED_ENV, "1") == "0":
        logger.info("malloc: glibc defaults kept (%s=0)", KEEP_FREED_ENV)
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        logger.info("malloc: not glibc (no mallopt); freed memory is returned as the C library decides")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    if ok:
        logger.info("malloc: freed memory kept for reuse (blocks up to 32 MiB from the heap, no trimming), so large "
                    "temporaries do not page-fault again; %s=0 keeps glibc's defaults", KEEP_FREED_ENV)
    else:
        logger.warning("malloc: glibc refused mallopt; freed memory is returned as usual")
    return ok
