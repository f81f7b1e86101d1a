"""How many CPUs this process may use, alone or as one rank of a torchrun node."""

from __future__ import annotations

import os

__all__ = ["available_cpus", "rank_cpus"]


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def rank_cpus() -> int:
    """This process's share of :func:`available_cpus`: under torchrun the ranks of a node
    (``LOCAL_WORLD_SIZE``) share its CPUs evenly, so that they do not oversubscribe them."""
    try:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local_ranks = 1
    return max(1, available_cpus() // max(1, local_ranks))
