"""Environment set-up and isolated random-number-generator suites."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "RNGSuite",
    "check_client_id",
    "check_seed",
    "create_rng_suite",
    "setup_reproducibility",
]


def check_seed(seed: object, what: str = "seed", bits: int = 32) -> int:
    """``seed`` as an int after checking it lies in ``[0, 2**bits)``; the one validator
    of seeds, client ids and round indices.

    Per-client streams hash (seed, client id, round) as one 32-bit word each (see
    :func:`~emberfl.reproducibility.client_seed`), so 32 bits is the default;
    generator suites accept 64. Raises :class:`TypeError` for a non-integer (``bool``
    included: ``True`` as a seed is almost certainly a mistake) and
    :class:`ValueError` for an integer out of range, both naming ``what``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(
            f"{what} must be an int in [0, 2**{bits}), got {seed!r} ({type(seed).__name__})"
        )
    if not 0 <= int(seed) < 2**bits:
        raise ValueError(f"{what} must be an int in [0, 2**{bits}), got {seed!r}")
    return int(seed)


def check_client_id(cid: object, what: str = "client id") -> int:
    """A client id checked like a seed: an int in ``[0, 2**32)`` (it keys a stream)."""
    return check_seed(cid, what)


def setup_reproducibility(seed: int) -> None:
    """Configure the process environment for deterministic runs.

    Sets ``PYTHONHASHSEED`` (inherited by every worker process started afterwards,
    which is where it matters: the running interpreter's hash seed is fixed at start
    up) and makes cuDNN pick deterministic kernels instead of benchmarking.
    """
    check_seed(seed, bits=64)
    os.environ["PYTHONHASHSEED"] = str(int(seed))
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@dataclass
class RNGSuite:
    """Independent generators for Python, NumPy and torch (CPU and, if present, CUDA).

    Code that draws from a suite instead of the global generators gets a random
    stream of its own that nothing else in the process can disturb.
    """

    python: random.Random
    numpy: np.random.Generator
    torch_cpu: torch.Generator
    torch_cuda: torch.Generator | None = None


def create_rng_suite(seed: int) -> RNGSuite:
    """A new :class:`RNGSuite` whose generators are all seeded with ``seed``.

    A CUDA generator (on the current device) is included when CUDA is available.
    """
    seed = check_seed(seed, bits=64)
    cuda = None
    if torch.cuda.is_available():
        cuda = torch.Generator(device="cuda").manual_seed(seed)
    return RNGSuite(
        python=random.Random(seed),
        numpy=np.random.default_rng(seed),
        torch_cpu=torch.Generator(device="cpu").manual_seed(seed),
        torch_cuda=cuda,
    )
