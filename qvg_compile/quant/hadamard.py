"""Normalised fast Walsh-Hadamard transform along the last dim, O(D log D), self-inverse."""

from __future__ import annotations

import math

import torch


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H / sqrt(D)`` for the Sylvester Hadamard matrix H; D a power of two; fp32 result."""
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"x: the last dim must be a power of two for the Hadamard rotation, got {d}")
    y = x.float().reshape(-1, d)
    h = 1
    while h < d:
        pairs = y.view(-1, d // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(-1, d)
        h *= 2
    return (y / math.sqrt(d)).view(x.shape)
