"""Test-wide settings: this suite runs on 2-core machines, where torch's default thread pool
fights itself (and every worker process the integration tests start)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config) -> None:
    try:
        import torch
    except ImportError:  # the router-only tests run without torch
        return
    torch.set_num_threads(1)
