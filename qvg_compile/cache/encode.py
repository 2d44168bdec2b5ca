"""Quantize the tokens of one segment, with a new codebook or with a shared one.

A new codebook runs the QVG encoder with C centroids, from seeded tokens or (with the policy's
``warm_start``) from the previous codebook of the same size. A shared codebook runs it with zero
k-means iterations from the given centroids: tokens are only assigned to them, and the codebook
is stored once.
On the CPU a refused encode raises here; on the GPU nothing waits for the encoder (the caller
reads its refusal summary back later).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..quant.config import QVGConfig
from ..kernels.encode_graph import encode_replayed
from ..quant.segment import QVGSegment


def encode_segment(x: torch.Tensor, config: QVGConfig, role: str, centroids: int, init: Optional[torch.Tensor],
                   shared: bool, tag: int = 0, fit: bool = False
                   ) -> tuple[QVGSegment, torch.Tensor, Optional[torch.Tensor]]:
    """QVG of ``x`` ``[*lead, n, D]`` (sequence next to last) with a codebook of ``centroids``, and
    the encoder's refusal summary (int8 ``[2]``, see `kernels.encode.encode_unchecked`).

    ``init`` ``[S, *lead, centroids, D]``: the previous codebook, the k-means warm start, or (with
    ``shared``) the codebook itself, kept as it is. On CUDA the encode is replayed from a captured
    graph (`kernels.encode_graph`): copy the results out before the next call; ``tag`` keeps the
    results of calls alive at the same time apart. With ``fit``, the third result is the segment's
    `residual_energy` over ``x`` (0-dim fp32 on x's device), else None.
    """
    return encode_replayed(x, segment_config(config, centroids, shared), role, init, tag, fit)


@functools.lru_cache(maxsize=64)
def segment_config(config: QVGConfig, centroids: int, shared: bool) -> QVGConfig:
    """``config`` with ``centroids`` (and no k-means iterations for a shared codebook); memoised:
    every seal of a cache asks for the same one."""
    if shared:
        return config.replace(centroids=centroids, kmeans_iters=0)
    return config.replace(centroids=centroids)
