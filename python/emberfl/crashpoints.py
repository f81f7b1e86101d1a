"""Fault injection for tests: kill the run at a named point, as ``kill -9`` would.

``EMBERFL_CRASH_AT=<point>:<n>`` (``n`` defaults to 1) makes the process that passes
:func:`crash_point` ``<point>`` for the ``n``-th time send ``SIGKILL`` to its whole
process group (so its worker processes die with it), exactly there. The kill-9 tests
(``tests/test_kill_sweep.py``) use it to stop a run at every step that writes the run
directory and check that a resume still ends bit for bit where an uninterrupted run
does. The variable is read once, at import; unset, a point costs one comparison.

The points (:data:`POINTS`; ``<file>`` and ``<dir>`` are the names of the target):

``simulation.setup``
    The run directory is locked and ``config.json`` written; no data is loaded and
    no worker started yet (the set-up takes seconds for a large dataset).
``round.client``
    A client's uplink reached the server (the parent), in client-list order: the
    round is partly trained, its clients' state files partly rewritten.
``metrics.row``
    A round's row was appended to ``metrics.csv``; its checkpoint is not written yet.
``checkpoint.begin`` / ``.server`` / ``.metrics`` / ``.state`` / ``.written``
    Inside a checkpoint's temporary directory: created; ``server.safetensors``,
    the copy of ``metrics.csv``, the client state links, ``manifest.json`` written.
``checkpoint.renamed``
    The checkpoint renamed into place; ``latest`` still names the previous one.
``checkpoint.latest``
    ``latest`` names the new checkpoint; the previous one is not deleted yet.
``checkpoint.prune``
    One entry of the previous checkpoint deleted (hit once per entry).
``checkpoint.done``
    The previous checkpoint is gone.
``write.<file>``
    An atomic write of ``<file>`` (:mod:`emberfl.fileio`) has its temporary file
    complete, not yet renamed over the target: ``write.latest``,
    ``write.metrics.csv`` (its header, its copy into a checkpoint, its restore on
    resume), ``write.manifest.json``, ``write.config.json``.
``publish.<dir>``
    :func:`~emberfl.fileio.publish_dir` moved an existing ``<dir>`` aside and has not
    renamed the new one in: ``publish.client_state`` when a resume restores it.
``restore.metrics``
    A resume restored ``metrics.csv``, not yet the client state.
``simulation.model``
    The final ``model.safetensors`` is written.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "POINTS", "crash_point"]

#: The environment variable that arms one point: ``<point>:<n>``.
CRASH_ENV = "EMBERFL_CRASH_AT"

#: Every fixed point name; ``write.<file>`` and ``publish.<dir>`` take the target's name.
POINTS: tuple[str, ...] = (
    "simulation.setup",
    "round.client",
    "metrics.row",
    "checkpoint.begin",
    "checkpoint.server",
    "checkpoint.metrics",
    "checkpoint.state",
    "checkpoint.written",
    "checkpoint.renamed",
    "checkpoint.latest",
    "checkpoint.prune",
    "checkpoint.done",
    "restore.metrics",
    "simulation.model",
)


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    name, sep, count = value.rpartition(":")
    if not sep:
        return value, 1
    try:
        n = int(count)
    except ValueError:
        return None
    return (name, n) if name and n >= 1 else None


_armed = _parse(os.environ.get(CRASH_ENV))
_seen = 0


def crash_point(name: str) -> None:
    """A fault-injection point for tests: SIGKILL this process group here when
    ``EMBERFL_CRASH_AT`` names ``name`` and this is its ``n``-th pass; else nothing."""
    global _seen
    if _armed is None or name != _armed[0]:
        return
    _seen += 1
    if _seen < _armed[1]:
        return
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)
