"""Quantized segments: the stored form of one K or V tensor, and their common interface.

A segment remembers the original shape, dtype and sequence dim, holds only the tensors that are
stored (so ``nbytes`` is the real memory), and rebuilds the original with ``dequantize()``.

Internally every segment uses the *normalised* layout ``[*lead, N, ...]``: the sequence dim moved
next to last, the channel dim D last, every other dim a leading batch-like dim (for
``[B, H, N, D]`` and ``[B, N, H, D]`` alike, ``lead = (B, H)``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from .group import GroupCodes, group_dequantize


def normalise_seq_dim(shape: torch.Size, seq_dim: int) -> int:
    """``seq_dim`` as a non-negative index of a rank>=3 ``shape`` that is not the last (channel) dim."""
    rank = len(shape)
    if rank < 3:
        raise ValueError(f"x: expected rank >= 3 ([B, H, N, D] or [B, N, H, D]), got shape {list(shape)}")
    if not isinstance(seq_dim, int) or not -rank <= seq_dim < rank:
        raise ValueError(f"seq_dim: expected an int in [-{rank}, {rank}), got {seq_dim!r}")
    seq_dim %= rank
    if seq_dim == rank - 1:
        raise ValueError("seq_dim: the last dim holds the channels (head_dim), it cannot be the sequence")
    return seq_dim


def to_normalised(x: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """View of ``x`` with the sequence dim moved next to last: ``[*lead, N, D]``."""
    return x.movedim(seq_dim, -2)


def from_normalised(y: torch.Tensor, shape: torch.Size, dtype: torch.dtype, seq_dim: int) -> torch.Tensor:
    """A contiguous tensor of ``shape``/``dtype`` whose normalised view holds ``y`` ``[*lead, N, D]``."""
    out = torch.empty(shape, dtype=dtype, device=y.device)
    out.movedim(seq_dim, -2).copy_(y)
    return out


class Segment:
    """Common interface of every quantized segment (QVG, RTN, KIVI, QuaRot)."""

    shape: torch.Size
    dtype: torch.dtype
    seq_dim: int

    def dequantize(self) -> torch.Tensor:
        """The reconstructed tensor, in the original shape, layout and dtype."""
        raise NotImplementedError

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the segment keeps, by name (what ``nbytes`` counts)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value
        return out

    @property
    def nbytes(self) -> int:
        """Bytes actually stored, metadata tensors included."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def bits_per_element(self) -> float:
        """Stored bits per element of the original tensor."""
        return self.nbytes * 8 / self.numel

    @property
    def compression(self) -> float:
        """Bytes of the original tensor in BF16 over stored bytes."""
        return self.numel * 2 / self.nbytes

    @property
    def device(self) -> torch.device:
        return next(iter(self.stored_tensors().values())).device


@dataclass
class QVGSegment(Segment):
    """QVG (and, with zero stages, RTN) storage of one tensor, normalised layout ``[*lead, N, D]``.

    Attributes:
        codes: uint8 ``[*lead, N, D*bits/8]`` packed residual codes (`packing` layout).
        scales: ``[*lead, N, D/G]`` FP8 E4M3 or FP16 per-group scales.
        zeros: same shape as ``scales`` (asymmetric mode) or None.
        assignments: uint8 ``[S, *lead, N]``: the centroid of every token at every stage.
        centroids: ``[S, *lead, C, D]`` in the centroid dtype.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    assignments: torch.Tensor
    centroids: torch.Tensor
    bits: int
    group_size: int
    code_mode: str
    shape: torch.Size
    dtype: torch.dtype
    seq_dim: int

    @property
    def stages(self) -> int:
        return self.assignments.shape[0]

    def dequantize_normalised(self, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``[*lead, N, D]`` reconstruction: group codes, then centroids added last stage first."""
        r = group_dequantize(GroupCodes(self.codes, self.scales, self.zeros), self.bits,
                             self.group_size, self.code_mode)
        for s in reversed(range(self.stages)):
            r += gather_centroids(self.centroids[s], self.assignments[s])
        return r.to(out_dtype or self.dtype)

    def dequantize(self) -> torch.Tensor:
        return from_normalised(self.dequantize_normalised(torch.float32), self.shape, self.dtype, self.seq_dim)


def residual_energy(x: torch.Tensor, seg: "QVGSegment") -> torch.Tensor:
    """How much of ``x``'s energy its centroids leave: ``||x - sum_s c_s(x)||^2 / ||x||^2``, a
    0-dim fp32 tensor on x's device (no sync). ``x`` ``[*lead, N, D]`` (sequence next to last)
    are the tokens ``seg`` coded; near 0 when the codebook fits them, 1 or more when it does not
    (a codebook fitted to other content)."""
    if x.shape[-2] != seg.assignments.shape[-1]:
        raise ValueError(f"x: expected {seg.assignments.shape[-1]} tokens, got {x.shape[-2]}")
    residual = x.float()
    for s in range(seg.centroids.shape[0]):
        residual = residual - gather_centroids(seg.centroids[s], seg.assignments[s])
    return residual.square().sum() / x.float().square().sum().clamp_min(torch.finfo(torch.float32).tiny)


def gather_centroids(centroids: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """``centroids[..., a, :]`` per token: ``[*lead, C, D]`` x ``[*lead, N]`` -> ``[*lead, N, D]`` fp32."""
    d = centroids.shape[-1]
    idx = assignments.long().unsqueeze(-1).expand(*assignments.shape, d)
    return torch.gather(centroids.float(), -2, idx)
