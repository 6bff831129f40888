"""dsv3.memory: weights a loader allocates sit on 2 MiB-aligned memory advised for transparent huge pages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv3 import DeepseekV3ForCausalLM, memory
from tests.published import RAGGED_128, build_published

needs_thp = pytest.mark.skipif(memory.thp_mode() not in ("always", "madvise"),
                               reason=f"transparent huge pages: {memory.thp_mode() or 'not available'}")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_large_weights_are_aligned_and_advised() -> None:
    t = memory.weight_empty((3, 1 << 20), torch.bfloat16)                    # 6 MiB
    assert t.shape == (3, 1 << 20) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % memory.HUGE_PAGE == 0
    assert "hg" in _vm_flags(t.data_ptr())                                    # MADV_HUGEPAGE on its pages
    t.fill_(1.5)
    assert float(t.float().sum()) == 1.5 * t.numel()
    # (no negative control with torch.empty: the allocator may hand back memory of a freed, advised tensor — CI saw it)


def test_small_meta_and_non_thp_allocations_are_plain_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    small = memory.weight_empty((100, 100), torch.float32)
    assert small.untyped_storage().nbytes() == small.nbytes                  # no slack below 2 MiB
    with torch.device("meta"):
        assert memory.weight_empty((4096, 4096), torch.float32).is_meta       # the ambient device is respected
    monkeypatch.setattr(memory, "_madvise", lambda: None)                   # THP "never" / not Linux
    big = memory.weight_empty((1 << 20,), torch.float32)
    assert big.untyped_storage().nbytes() == big.nbytes


@needs_thp
@pytest.mark.parametrize("kwargs", [dict(torch_dtype=torch.bfloat16), dict(torch_dtype=torch.float32,
                                                                           quantization="int8")])
def test_loaded_weights_sit_on_advised_huge_pages(tmp_path: Path, kwargs: dict) -> None:
    ckpt = build_published(tmp_path, {**RAGGED_128, "vocab_size": 16384}, None, mtp=False, seed=1)
    model = DeepseekV3ForCausalLM.from_pretrained(ckpt.path, kernels="off", **kwargs)
    big = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.nbytes >= memory.HUGE_PAGE]
    assert {n.split(".")[-2] for n, _ in big} >= {"embed_tokens", "lm_head"}
    for name, t in big:
        assert t.data_ptr() % memory.HUGE_PAGE == 0, name
        assert "hg" in _vm_flags(t.data_ptr()), name


_CYCLES = """
import resource, sys, torch
from dsv3 import memory
print(memory.keep_freed_memory())
def cycle(i):   # three temporaries alive together, then freed; each cycle's a little larger, as prompts differ
    n = (4 << 20) + i * (16 << 10)   # 16 MB + i * 64 KB of fp32
    a, b, c = torch.ones(n), torch.ones(n), torch.ones(n)
    del a, b, c
for i in range(3):
    cycle(i)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(3, 13):
    cycle(i)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 10)
"""


def _faults_per_cycle(keep: str) -> tuple[bool, float]:
    import os
    import subprocess
    import sys

    env = dict(os.environ, **{memory.KEEP_FREED_ENV: keep})
    out = subprocess.run([sys.executable, "-c", _CYCLES], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", float(faults)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="page-fault counts need Linux")
def test_keeping_freed_memory_saves_the_page_faults_of_large_temporaries() -> None:
    """Two fresh processes make the same large temporaries: with glibc's defaults (opted out) a block larger than the
    last one freed is at or above its dynamic mmap threshold and comes from a fresh mapping (~12,650 page faults per
    cycle: 48 MB of 4 KiB pages); with freed memory kept the heap is reused and only its growth faults."""
    kept, keeping = _faults_per_cycle("1")
    opted_out, default = _faults_per_cycle("0")
    if not kept:
        pytest.skip("not glibc: mallopt is not available")
    assert opted_out is False
    assert default > 10_000, default
    assert keeping < 500, keeping             # 3 × 64 KB of heap growth per cycle: ~48 pages
