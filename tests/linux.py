"""POSIX test helpers: what a test reads from /proc (or a skip elsewhere, e.g. macOS),
and how a test starts a child that it will interrupt."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest


def proc_self(name: str) -> Path:
    """``/proc/self/<name>``; skips the calling test where there is no such file."""
    path = Path("/proc/self") / name
    if not path.exists():
        pytest.skip(f"needs Linux's {path}")
    return path


def default_sigint() -> None:
    """``preexec_fn`` of a child a test interrupts: SIGINT at its default.

    A shell starts background jobs with SIGINT ignored and children inherit that, so
    a child of a backgrounded pytest would install no KeyboardInterrupt handler and
    ignore the test's Ctrl-C; this makes the child independent of how pytest started.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
