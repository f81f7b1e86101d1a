"""Gaussian noise for differential privacy, from a keyed stream or the OS's entropy.

A *seeded* draw is keyed by ``(seed, round, purpose[, cid])`` through NumPy's
``SeedSequence`` and drawn by PCG64 with NumPy's own normal sampler, which is the same
scalar code on every machine: the noise of a round does not depend on which worker,
rank or node draws it, nor on a resume. That is right for a simulation, where reruns
must agree, and wrong for a deployment, where anyone who knows the seed can subtract
the noise: there use ``os`` (``--dp-noise-source os``), which draws every value from
``os.urandom``. Floating-point Gaussian noise is still open to the attacks on its low
bits that Mironov (CCS 2012) describes; a deployment needs a discrete or
snapping mechanism as well.
"""

from __future__ import annotations

import enum
import math
import os

import numpy as np
import torch

__all__ = [
    "NOISE_SOURCES",
    "NoiseStream",
    "Purpose",
    "gaussian",
    "gaussian_from_os",
    "seeded_gaussian",
]

#: The ``--dp-noise-source`` choices.
NOISE_SOURCES: tuple[str, ...] = ("seeded", "os")


class Purpose(enum.IntEnum):
    """What a draw is for: each purpose has its own stream."""

    UPDATE = 1  # the server's noise on the round's sum of clipped updates
    COUNT = 2  # the server's noise on the clipped count (adaptive clipping)
    LOCAL = 3  # a client's own noise on its update (local DP)
    SAMPLE = 4  # a client's DP-SGD noise, step after step (sample-level DP)


def seeded_gaussian(
    n: int, seed: int, round: int, purpose: Purpose, cid: int | None = None
) -> torch.Tensor:
    """``n`` standard normal float64 values of the stream keyed by the arguments (the
    first draw of its :class:`NoiseStream`)."""
    return NoiseStream(seed, round, purpose, cid).draw(n)


def gaussian_from_os(n: int) -> torch.Tensor:
    """``n`` standard normal float64 values from ``os.urandom`` (Box--Muller)."""
    pairs = (n + 1) // 2
    words = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    # 53 random bits each, in (0, 1]: the logarithm is finite.
    u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (words[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    values = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
    return torch.from_numpy(np.ascontiguousarray(values))


class NoiseStream:
    """Successive standard normal float64 draws of the stream keyed by ``(seed, round,
    purpose[, cid])``, or of the OS's entropy when ``seed`` is None (a DP-SGD client
    draws once per local step)."""

    def __init__(
        self, seed: int | None, round: int, purpose: Purpose, cid: int | None = None
    ) -> None:
        self._generator: np.random.Generator | None = None
        if seed is not None:
            spawn = (int(purpose),) if cid is None else (int(purpose), int(cid))
            sequence = np.random.SeedSequence([int(seed), int(round)], spawn_key=spawn)
            self._generator = np.random.Generator(np.random.PCG64(sequence))

    def draw(self, n: int) -> torch.Tensor:
        if self._generator is None:
            return gaussian_from_os(n)
        return torch.from_numpy(self._generator.standard_normal(n))


def gaussian(
    n: int, seed: int | None, round: int, purpose: Purpose, cid: int | None = None
) -> torch.Tensor:
    """``n`` standard normal float64 values: the seeded stream, or the OS's entropy when
    ``seed`` is None."""
    return NoiseStream(seed, round, purpose, cid).draw(n)
