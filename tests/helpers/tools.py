"""External tools some tests need (promtool, helm): skip where absent, fail where CI requires them.

`.ci/run` sets PDSERVE_REQUIRE_TOOLS=1 after installing them, so on CI a missing tool fails the
test instead of skipping it silently; on a developer's machine it skips with the reason.
"""

from __future__ import annotations

import os
import shutil

import pytest


def tools_required() -> bool:
    return os.environ.get("PDSERVE_REQUIRE_TOOLS") == "1"


def missing_tool(reason: str) -> None:
    """Skip (or, where tools are required, fail) the calling test for want of a tool."""
    if tools_required():
        pytest.fail(f"{reason} (PDSERVE_REQUIRE_TOOLS=1: CI installs it, so its absence is an error)")
    pytest.skip(reason)


def require_tool(name: str, reason: str) -> str:
    """The tool's path; skips or fails the test (see `missing_tool`) when it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        missing_tool(reason)
    return path
