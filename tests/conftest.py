"""Shared pytest set-up: a summary of the worst differences each comparison saw."""

from __future__ import annotations

import pytest
import torch

from tests.oracle import PARITY_REPORT

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture
def single_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine lose a lot to contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if not PARITY_REPORT:
        return
    terminalreporter.section("worst differences per comparison")
    groups: dict[str, float] = {}
    for label, worst in PARITY_REPORT.items():
        key = label.split(" ")[0] if label.startswith(("grad", "hidden")) else label
        groups[key] = max(groups.get(key, 0.0), worst)
    for label, worst in sorted(groups.items()):
        terminalreporter.write_line(f"  {label:<40s} {worst:.2e}")
