"""Per-layer K/V error of a cache method on one set of K/V: the dense rollout's.

Each method's video drifts from the dense one, so its own caches hold different K/V; to compare
quantizers on equal inputs, the dense rollout's final caches are written again chunk by chunk
into the method's cache exactly as the pipeline wrote them (`QVGCache`: slice writes of whole
chunks, then `seal`; simulated methods: `quantize` of each chunk), and each layer's
reconstruction is compared with the written K/V over every token. This is the error a method
makes per sealed chunk on this model's real K/V, free of the drift it causes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..cache import QVGCache
from ..quant.api import quantize
from ..quant.config import QVGConfig
from ..quant.metrics import rel_mse

ROLES = (("k", "key"), ("v", "value"))


def _replay(dense: torch.Tensor, config: QVGConfig, role: str, chunk_tokens: int, simulated: bool,
            options: dict[str, Any]) -> torch.Tensor:
    """``dense`` ``[B, S, H, D]`` as the method stores and reads it back, same shape and dtype."""
    if simulated:
        parts = [quantize(x, config, seq_dim=1, role=role).dequantize()
                 for x in dense.split(chunk_tokens, dim=1)]
        return torch.cat(parts, dim=1)
    cache = QVGCache.empty_like(dense, 1, config, role=role, **options)
    for start in range(0, dense.shape[1], chunk_tokens):
        cache[:, start:start + chunk_tokens] = dense[:, start:start + chunk_tokens]
    return cache.seal().dequantize()


def layer_errors(reference: list[dict], config: QVGConfig, chunk_tokens: int, simulated: bool = False,
                 cache_options: Optional[dict[str, Any]] = None) -> list[dict[str, float]]:
    """``[{"layer", "k_rel_mse", "v_rel_mse"}]`` per layer of ``reference`` (a dense cache as
    `allocate_cache` makes it, ``{"k", "v": [B, S, H, D]}`` per layer, filled by a rollout) under
    ``config``: in `QVGCache` with ``cache_options``, or with the math layer per chunk of
    ``chunk_tokens`` tokens when ``simulated`` (KIVI, QuaRot)."""
    if not isinstance(config, QVGConfig):
        raise TypeError(f"config: expected a QVGConfig, got {type(config).__name__}")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected a positive int, got {chunk_tokens!r}")
    if not reference or any(set(layer) != {"k", "v"} for layer in reference):
        raise ValueError("reference: expected a non-empty list of {'k', 'v'} dense caches per layer")
    options = dict(cache_options or {})
    rows = []
    with torch.no_grad():
        for i, layer in enumerate(reference):
            row: dict[str, float] = {"layer": i}
            for name, role in ROLES:
                dense = layer[name]
                if isinstance(dense, QVGCache):
                    raise TypeError(f"reference[{i}][{name!r}]: expected the dense rollout's tensor, got a QVGCache")
                row[f"{name}_rel_mse"] = rel_mse(dense, _replay(dense, config, role, chunk_tokens, simulated, options))
            rows.append(row)
    return rows
