"""Seeding and snapshots of the process-global random state."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from emberfl.reproducibility.generator import check_seed, setup_reproducibility

__all__ = ["RandomStateSnapshot", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed the global generators of Python, NumPy (legacy API) and torch (CPU, CUDA).

    Also applies :func:`setup_reproducibility`. ``seed`` must fit in 32 bits because
    NumPy's legacy global generator accepts no more.
    """
    check_seed(seed)
    seed = int(seed)
    setup_reproducibility(seed)
    random.seed(seed)
    np.random.seed(seed)
    # torch.manual_seed also seeds every CUDA device (lazily if CUDA is not yet
    # initialised); the explicit calls keep the intent visible.
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)


@dataclass
class RandomStateSnapshot:
    """The global random state of Python, NumPy and torch at one moment.

    ``environ`` holds ``PYTHONHASHSEED``; the empty string stands for "not set"
    (Python itself treats an empty value as unset). ``torch_cuda`` is the state of
    the current CUDA device's generator, or ``None`` without CUDA.
    """

    environ: str
    python: tuple[Any, ...]
    numpy: tuple[str, npt.NDArray[np.uint32], int, int, float]
    torch_cpu: torch.Tensor
    torch_cuda: torch.Tensor | None

    @classmethod
    def capture(cls) -> RandomStateSnapshot:
        """Capture the current global random state."""
        legacy = np.random.get_state(legacy=True)
        if not isinstance(legacy, tuple):  # pragma: no cover - legacy=True is a tuple
            raise TypeError("numpy returned a non-legacy random state")
        name, key, pos, has_gauss, cached_gaussian = legacy
        return cls(
            environ=os.environ.get("PYTHONHASHSEED", ""),
            python=random.getstate(),
            # Copy the key: numpy hands out its own array and later draws must not
            # alter a snapshot.
            numpy=(
                str(name),
                np.array(key, dtype=np.uint32),
                int(pos),
                int(has_gauss),
                float(cached_gaussian),
            ),
            torch_cpu=torch.get_rng_state(),
            torch_cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        )

    @staticmethod
    def restore(snapshot: RandomStateSnapshot) -> None:
        """Make ``snapshot`` the current global random state."""
        if snapshot.environ:
            os.environ["PYTHONHASHSEED"] = snapshot.environ
        else:
            os.environ.pop("PYTHONHASHSEED", None)
        random.setstate(snapshot.python)
        np.random.set_state(snapshot.numpy)
        torch.set_rng_state(snapshot.torch_cpu)
        if snapshot.torch_cuda is not None:
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "snapshot holds a CUDA generator state but CUDA is not available"
                )
            torch.cuda.set_rng_state(snapshot.torch_cuda)
