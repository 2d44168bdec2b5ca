"""The dense tensor a `QVGCache` view stands for.

Below `tensor` (it reads a cache's handle, view and dense pieces, nothing of its class), so that
`QVGCache.dequantize` and the dispatch rules above share it without an import cycle.
"""

from __future__ import annotations

from typing import Any

import torch

from . import ops as _ops  # noqa: F401  (registers qvg::cache_decode)
from .codec import flat_lead, flat_pieces
from .view import RUN


def decode_view(t: Any) -> torch.Tensor:
    """The dense tensor the `QVGCache` ``t`` stands for, built from its store
    (``qvg::cache_decode``) and its dense pieces: a new contiguous tensor of ``t``'s shape."""
    spec, view = t._handle.spec, t._view
    runs = flat_pieces(view, runs_only=True)
    parts = torch.ops.qvg.cache_decode(t._handle.arrays, runs, flat_lead(view), list(view.parts), spec.json)
    decoded = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if t._dense:
        pieces, pos = [], 0
        for kind, a, n in view.pieces:
            if kind == RUN:
                pieces.append(decoded[..., pos:pos + n, :])
                pos = pos + n
            else:
                pieces.append(t._dense[a].to(decoded.dtype))
        decoded = torch.cat(pieces, dim=-2)
    return view.from_normalised(decoded).contiguous()
