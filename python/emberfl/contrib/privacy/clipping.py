"""Clipping a client's model update to an L2 norm: the bound every DP analysis rests on."""

from __future__ import annotations

import math

import torch

__all__ = ["clip_update", "l2_norm"]


def l2_norm(vector: torch.Tensor) -> float:
    """The L2 norm of ``vector``, summed in float64."""
    return float(torch.linalg.vector_norm(vector.detach().to(torch.float64)))


def clip_update(update: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """``update`` scaled to L2 norm at most ``clip``, and its norm before clipping.

    An update within the bound comes back as it is, bit for bit. A longer one is scaled
    by ``clip / norm`` in float64 and rounded to float32; rounding could leave it a hair
    above ``clip``, so the scale shrinks until the float32 result is within it: the
    bound holds for the bits that are folded. A NaN or Inf update is returned as it
    is, for the server's non-finite policy to refuse or drop.
    """
    norm = l2_norm(update)
    if not math.isfinite(norm) or norm <= clip:
        return update, norm
    wide = update.detach().to(torch.float64)
    scale = clip / norm
    while True:
        clipped = (wide * scale).to(update.dtype)
        if l2_norm(clipped) <= clip:
            return clipped, norm
        scale *= 1.0 - 2.0**-20
