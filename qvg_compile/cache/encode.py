"""Quantize the tokens of one segment, with a new codebook or with a shared one.

A new codebook runs the QVG encoder with C centroids (warm-started from the previous codebook
when given). A shared codebook skips k-means: each stage only assigns every token to the nearest
of the given centroids and subtracts it, then the residual is group-quantized as usual, so the
stored form (and its decode) is exactly that of `QVGSegment`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quant.config import QVGConfig
from ..quant.group import group_quantize
from ..quant.kmeans import assign
from ..quant.qvg import check_input, encode_qvg
from ..quant.segment import QVGSegment, gather_centroids


def encode_new(x: torch.Tensor, config: QVGConfig, role: str, centroids: int,
               warm: Optional[torch.Tensor]) -> QVGSegment:
    """QVG of ``x`` ``[*lead, n, D]`` with a new codebook of ``centroids`` rows.

    ``warm`` ``[S, *lead, centroids, D]`` starts every stage's k-means (the previous codebook).
    """
    return encode_qvg(x, config.replace(centroids=centroids), -2, role, warm)


def encode_shared(x: torch.Tensor, config: QVGConfig, role: str, centroids: torch.Tensor) -> QVGSegment:
    """QVG of ``x`` ``[*lead, n, D]`` against the fixed codebook ``centroids`` ``[S, *lead, C, D]``."""
    check_input(x, config, -2)
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    sets = int(torch.Size(lead).numel())
    stages, c = centroids.shape[0], centroids.shape[-2]
    residual = x.reshape(sets, n, d).float()
    assignments = torch.empty(stages, sets, n, dtype=torch.uint8, device=x.device)
    for s in range(stages):
        cents = centroids[s].reshape(sets, c, d)
        a, _ = assign(residual, cents)
        assignments[s] = a.to(torch.uint8)
        residual -= gather_centroids(cents, assignments[s])
    g = group_quantize(residual, config.bits_for(role), config.group_size, config.code_mode,
                       config.torch_scale_dtype)
    return QVGSegment(
        codes=g.codes.view(*lead, n, -1), scales=g.scales.view(*lead, n, -1),
        zeros=None if g.zeros is None else g.zeros.view(*lead, n, -1),
        assignments=assignments.view(stages, *lead, n), centroids=centroids,
        bits=config.bits_for(role), group_size=config.group_size, code_mode=config.code_mode,
        shape=x.shape, dtype=x.dtype, seq_dim=x.dim() - 2,
    )
