"""Baseline quantizers with the QVG segment interface: KIVI and QuaRot (RTN is QVG with 0 stages).

- KIVI: keys per channel (groups of G tokens), values per token (groups of G channels), both
  asymmetric; the ``R`` most recent tokens (plus the keys' remainder that does not fill a token
  group) stay in the input precision.
- QuaRot (KV only): normalised Hadamard rotation of the channel dim, then per-token asymmetric
  group RTN with a clip ratio. ``dequantize`` rotates back; an attention kernel may instead rotate
  the query (``q H`` against ``k H``), which leaves ``q k^T`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import QVGConfig
from .group import GroupCodes, group_dequantize, group_quantize
from .hadamard import hadamard
from .qvg import check_input
from .segment import Segment, from_normalised, to_normalised


@dataclass
class KIVISegment(Segment):
    """KIVI storage, normalised layout.

    Keys: ``codes`` ``[*lead, D, Nq*b/8]``, ``scales``/``zeros`` ``[*lead, D, Nq/G]`` (per channel,
    groups along tokens). Values: ``codes`` ``[*lead, Nq, D*b/8]``, ``scales``/``zeros``
    ``[*lead, Nq, D/G]``. ``window`` ``[*lead, N-Nq, D]`` the most recent tokens, unquantized.
    """

    codes: Optional[torch.Tensor]
    scales: Optional[torch.Tensor]
    zeros: Optional[torch.Tensor]
    window: torch.Tensor
    per_channel: bool
    bits: int
    group_size: int
    code_mode: str
    shape: torch.Size
    dtype: torch.dtype
    seq_dim: int

    def dequantize(self) -> torch.Tensor:
        parts = []
        if self.codes is not None:
            q = group_dequantize(GroupCodes(self.codes, self.scales, self.zeros), self.bits,
                                 self.group_size, self.code_mode)
            parts.append(q.transpose(-1, -2) if self.per_channel else q)
        parts.append(self.window.float())
        return from_normalised(torch.cat(parts, dim=-2), self.shape, self.dtype, self.seq_dim)


@dataclass
class QuaRotSegment(Segment):
    """Per-token group RTN of the Hadamard-rotated tensor: ``codes`` ``[*lead, N, D*b/8]``,
    ``scales``/``zeros`` ``[*lead, N, D/G]``."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    code_mode: str
    shape: torch.Size
    dtype: torch.dtype
    seq_dim: int

    def dequantize_rotated(self) -> torch.Tensor:
        """The rotated reconstruction ``[*lead, N, D]`` fp32 (what a rotated-query kernel reads)."""
        return group_dequantize(GroupCodes(self.codes, self.scales, self.zeros), self.bits,
                                self.group_size, self.code_mode)

    def dequantize(self) -> torch.Tensor:
        return from_normalised(hadamard(self.dequantize_rotated()), self.shape, self.dtype, self.seq_dim)


def encode_kivi(x: torch.Tensor, config: QVGConfig, seq_dim: int = -2, role: str = "key") -> KIVISegment:
    """KIVI-quantize ``x`` (``role`` ``"key"``: per channel; ``"value"``: per token)."""
    seq_dim = check_input(x, config, seq_dim)
    bits = config.bits_for(role)
    xs = to_normalised(x, seq_dim)
    n = xs.shape[-2]
    per_channel = role == "key"
    g = config.group_size
    if per_channel:
        nq = max(0, (n - config.residual_window) // g * g)
    else:
        nq = max(0, n - config.residual_window)
    codes = scales = zeros = None
    if nq:
        head = xs[..., :nq, :].float()
        if per_channel:
            head = head.transpose(-1, -2)
        q = group_quantize(head, bits, g, config.code_mode, config.torch_scale_dtype)
        codes, scales, zeros = q.codes, q.scales, q.zeros
    window = xs[..., nq:, :].contiguous()
    return KIVISegment(codes, scales, zeros, window, per_channel, bits, g, config.code_mode,
                       x.shape, x.dtype, seq_dim)


def encode_quarot(x: torch.Tensor, config: QVGConfig, seq_dim: int = -2, role: str = "key") -> QuaRotSegment:
    """Hadamard-rotate the channel dim of ``x`` then group-RTN it per token with clipping."""
    seq_dim = check_input(x, config, seq_dim)
    bits = config.bits_for(role)
    rotated = hadamard(to_normalised(x, seq_dim))
    q = group_quantize(rotated, bits, config.group_size, config.code_mode, config.torch_scale_dtype,
                       clip_ratio=config.clip_ratio)
    return QuaRotSegment(q.codes, q.scales, q.zeros, bits, config.group_size, config.code_mode,
                         x.shape, x.dtype, seq_dim)
