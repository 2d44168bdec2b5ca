"""`PackedStore`: sealed QVG tokens of one K or V cache, contiguous along the token dim.

This is the contract between the compressed cache (which owns and fills it) and the kernels
(which read it). Tokens ``[0, capacity)`` sit in one set of arrays; token ``n`` was quantized in
segment ``segment_ids[n]`` and decodes with that segment's codebooks:

    x[b, h, n] = group_dequant(codes[b, h, n], scales[b, h, n], zeros[b, h, n])
                 + sum_s centroids[segment_ids[n], s, b, h, assignments[s, b, h, n]]

Shapes (``H`` the cache's heads, ``Dp = D*bits/8``, ``K`` segment slots, ``C`` the largest codebook):
    codes        uint8               [B, H, capacity, Dp]
    scales       fp8_e4m3 or fp16    [B, H, capacity, D/G]
    zeros        same as scales or None
    assignments  uint8               [S, B, H, capacity]
    centroids    bf16/fp16/fp32      [K, S, B, H, C, D]
    segment_ids  int16 or int32      [capacity]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .group import GroupCodes, group_dequantize
from .segment import gather_centroids


@dataclass
class PackedStore:
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    assignments: torch.Tensor
    centroids: torch.Tensor
    segment_ids: torch.Tensor
    bits: int
    group_size: int
    code_mode: str

    @property
    def capacity(self) -> int:
        return self.codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.centroids.shape[-1] if self.stages else self.scales.shape[-1] * self.group_size

    @property
    def stages(self) -> int:
        return self.assignments.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scales": self.scales, "assignments": self.assignments,
               "centroids": self.centroids, "segment_ids": self.segment_ids}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, start: int, end: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reference decode of tokens ``[start, end)``: ``[B, H, end - start, D]`` in ``out_dtype``."""
        if not 0 <= start <= end <= self.capacity:
            raise ValueError(f"start, end: expected 0 <= start <= end <= {self.capacity}, got {start}, {end}")
        sl = slice(start, end)
        zeros = None if self.zeros is None else self.zeros[:, :, sl]
        r = group_dequantize(GroupCodes(self.codes[:, :, sl], self.scales[:, :, sl], zeros),
                             self.bits, self.group_size, self.code_mode)
        seg = self.segment_ids[sl].long()
        for s in reversed(range(self.stages)):
            # [K, B, H, C, D] -> per token codebook [B, H, n, C, D] would be large; gather per segment.
            for k in torch.unique(seg).tolist():
                mask = seg == k
                r[:, :, mask] += gather_centroids(self.centroids[k, s], self.assignments[s][:, :, sl][:, :, mask])
        return r.to(out_dtype)
