"""External client tools the interop tests drive."""

from __future__ import annotations

import shutil

import pytest


def require_tools(*tools: str) -> None:
    """Fail (not skip): scripts/test.sh installs every tool, so a missing one is a bug."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"required tools missing: {', '.join(missing)} (run scripts/test.sh)")
