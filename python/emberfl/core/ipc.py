"""BlazeFL 2.x's ``IPCMode``, accepted so that 2.x scripts run unchanged.

BlazeFL 2.x lets a process-pool trainer move tensors either through files
(``STORAGE``) or through shared memory (``SHARED_MEMORY``). emberfl has one transport
for both cases -- memory-mapped safetensors files, which are shared memory backed by
the page cache -- so either member selects it, and the process-pool trainers log once
that the setting has no further effect.
"""

from __future__ import annotations

import enum
import logging

__all__ = ["IPCMode", "accept_ipc_mode"]

logger = logging.getLogger("emberfl.core")


class IPCMode(str, enum.Enum):
    """Inter-process communication modes of BlazeFL 2.x (both mean the same here)."""

    STORAGE = "STORAGE"
    SHARED_MEMORY = "SHARED_MEMORY"

    def __str__(self) -> str:
        return self.value


_told = False


def accept_ipc_mode(mode: IPCMode | str | None) -> IPCMode | None:
    """``mode`` checked and converted; logs once per process (INFO) that it is ignored."""
    global _told
    if mode is None:
        return None
    try:
        value = IPCMode(mode)
    except ValueError:
        members = ", ".join(m.value for m in IPCMode)
        raise ValueError(f"ipc_mode must be one of {members}, got {mode!r}") from None
    if not _told:
        _told = True
        logger.info(
            "ipc_mode=%s is accepted for BlazeFL 2.x compatibility and has no effect: "
            "emberfl always moves tensors through memory-mapped files",
            value.value,
        )
    return value
