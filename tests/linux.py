"""Linux-only test helpers: what a test reads from /proc, or a skip elsewhere (macOS)."""

from __future__ import annotations

from pathlib import Path

import pytest


def proc_self(name: str) -> Path:
    """``/proc/self/<name>``; skips the calling test where there is no such file."""
    path = Path("/proc/self") / name
    if not path.exists():
        pytest.skip(f"needs Linux's {path}")
    return path
