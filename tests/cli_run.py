"""``emberfl`` run as a user types it, in a fresh interpreter, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable

from emberfl.crashpoints import CRASH_ENV

#: Variables of the test's environment a child must not inherit: thread counts a CI
#: machine may set, and an armed crash point.
DROPPED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", CRASH_ENV)


def emberfl(
    *args: str,
    env: dict[str, str] | None = None,
    crash: str | None = None,
    drop: Iterable[str] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``python -m emberfl ARGS`` with ``env`` added and ``drop`` removed; ``crash``
    arms a crash point (``EMBERFL_CRASH_AT``). The child leads its own session: a
    crash point kills its process group, not pytest's."""
    removed = {*DROPPED, *drop}
    child = {k: v for k, v in os.environ.items() if k not in removed}
    child.update(env or {})
    if crash is not None:
        child[CRASH_ENV] = crash
    return subprocess.run(
        [sys.executable, "-m", "emberfl", *args],
        capture_output=True,
        text=True,
        env=child,
        timeout=timeout,
        check=False,
        start_new_session=True,
    )
