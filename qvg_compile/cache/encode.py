"""Quantize the tokens of one segment, with a new codebook or with a shared one.

A new codebook runs the QVG encoder with C centroids, warm-started from the previous codebook
when one of the same size is given. A shared codebook runs it with zero k-means iterations from
the given centroids: tokens are only assigned to them, and the codebook is stored once.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quant.config import QVGConfig
from ..kernels.encode import encode_qvg
from ..quant.segment import QVGSegment


def encode_segment(x: torch.Tensor, config: QVGConfig, role: str, centroids: int,
                   init: Optional[torch.Tensor], shared: bool) -> QVGSegment:
    """QVG of ``x`` ``[*lead, n, D]`` (sequence next to last) with a codebook of ``centroids``.

    ``init`` ``[S, *lead, centroids, D]``: the previous codebook, the k-means warm start, or (with
    ``shared``) the codebook itself, kept as it is.
    """
    cfg = config.replace(centroids=centroids, kmeans_iters=0) if shared else config.replace(centroids=centroids)
    return encode_qvg(x, cfg, -2, role, init)
