"""`CachePolicy`: when the compressed cache quantizes what it holds, and with which codebooks.

Auto-regressive video pipelines write one chunk of tokens several times (one write per denoising
step, then a clean pass) before moving on to the next chunk. The cache therefore keeps a few
*slots* of ``chunk_tokens`` tokens dense; a write that lands inside a slot rewrites it in place,
and a write that lands outside every slot takes a free slot, or seals (quantizes, exactly once)
the oldest slots first. Sealed slots become *segments*: tokens that share one k-means codebook.

Codebook storage costs ``stages * C * centroid_bits / N`` bits per element for a codebook of C
centroids over N tokens, which dominates for one-chunk segments (C=256 over 4,680 tokens is 0.87
bits on top of ~2.2 with BF16 centroids, 0.44 with FP8 ones). Two knobs bound it:
``codebook_bits`` picks the largest power-of-two C that fits the budget for the tokens the
codebook will cover, and ``codebook_chunks`` lets consecutive segments reuse one codebook (the
later ones only assign tokens to it). The defaults come from
``benchmarks/cache_tradeoff.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..quant.config import QVGConfig


@dataclass(frozen=True)
class CachePolicy:
    """How a `QVGCache` keeps, seals and codes its tokens (frozen: hashes, pickles, JSON-able).

    Attributes:
        chunk_tokens: tokens per dense slot; ``None`` takes the length of the first write.
        dense_chunks: dense slots (the open one included): at most this many chunks are BF16.
        seal_chunks: slots quantized together into one segment when a slot is needed
            (``1 <= seal_chunks <= dense_chunks``; the published QVG uses 8 and 8).
        codebook_chunks: consecutive segments sharing one codebook: the first runs k-means, the
            next ``codebook_chunks - 1`` only assign their tokens to its centroids. Sharing cuts
            the error ~12% on a continuous stream, but a chunk right after a scene cut that shares
            the previous scene's codebook has 7-8x the key error of its neighbours
            (`benchmarks/cache_tradeoff.py --scene-change --per-chunk`), unless ``share_fit``
            gives it its own codebook.
        codebook_bits: budget of centroid storage in bits per element: C is the largest power of
            two (at most ``config.centroids`` and the segment's tokens) within it.
        share_fit: a segment that would share a codebook gets one of its own (when a slot is
            free) if the codebook leaves more than ``share_fit`` times the energy of its tokens
            (`residual_energy`) than it left of the tokens it was fitted to: the chunk after a
            scene cut. Measured on video-like K/V (`benchmarks/cache_tradeoff.py`, 3 seeds): 1.2-1.7x
            for a chunk sharing its neighbour's codebook, 7-13x after a cut. None never checks.
            The check reads two scalars back per shared seal (on the GPU, a sync).
        warm_start: start each segment's k-means from the previous codebook of the same cache.
            Off by default: measured with `benchmarks/cache_tradeoff.py` (3 seeds), a seeded start
            is as good on a continuous stream and up to 2x better on keys after a scene cut,
            where two Lloyd steps from the old scene's centroids do not reach the new one.
        dense_sinks: leading tokens (attention sinks) that are written to the dense tail and
            never quantized.
        spare_segments: codebook slots allocated beyond what filling the capacity needs. A
            rolling window briefly holds one more live segment than a filled cache; with no free
            slot that segment shares the latest codebook (assignment only, a little more error)
            instead of failing. 0 by default: a spare costs ``1 / segments`` of the codebook
            bytes in every cache, enough to keep a 21-frame Wan cache under 6.5x.
    """

    chunk_tokens: Optional[int] = None
    dense_chunks: int = 1
    seal_chunks: int = 1
    codebook_chunks: int = 2
    codebook_bits: float = 0.25
    share_fit: Optional[float] = 3.0
    warm_start: bool = False
    dense_sinks: int = 0
    spare_segments: int = 0

    def __post_init__(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            low = 0 if allow_zero else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                kind = "non-negative" if allow_zero else "positive"
                raise ValueError(f"CachePolicy.{name}: expected a {kind} int, got {value!r}")

        if self.chunk_tokens is not None:
            positive("chunk_tokens")
        for name in ("dense_chunks", "seal_chunks", "codebook_chunks"):
            positive(name)
        for name in ("dense_sinks", "spare_segments"):
            positive(name, allow_zero=True)
        if self.seal_chunks > self.dense_chunks:
            raise ValueError(f"CachePolicy.seal_chunks: expected at most dense_chunks={self.dense_chunks}, "
                             f"got {self.seal_chunks}")
        if not isinstance(self.codebook_bits, (int, float)) or self.codebook_bits <= 0:
            raise ValueError(f"CachePolicy.codebook_bits: expected a positive float, got {self.codebook_bits!r}")
        fit = self.share_fit
        if fit is not None and (isinstance(fit, bool) or not isinstance(fit, (int, float)) or not fit > 0):
            raise ValueError(f"CachePolicy.share_fit: expected a positive float or None, got {self.share_fit!r}")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"CachePolicy.warm_start: expected a bool, got {self.warm_start!r}")

    def replace(self, **changes: Any) -> "CachePolicy":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def codebook_size(self, config: QVGConfig, tokens: int) -> int:
        """Centroids for a new codebook that will code ``tokens`` tokens of one segment, over the
        ``codebook_chunks`` segments that share it: ``<= config.centroids`` and ``<= tokens``."""
        if tokens < 1:
            raise ValueError(f"tokens: expected a positive int, got {tokens}")
        centroid_bits = config.torch_centroid_dtype.itemsize * 8
        stages = max(config.stages, 1)
        budget = self.codebook_bits * tokens * self.codebook_chunks / (stages * centroid_bits)
        c = 1
        while c * 2 <= min(budget, config.centroids):
            c *= 2
        return min(c, config.centroids, tokens)


def policy_from_options(policy: Optional[CachePolicy] = None, **options: Any) -> CachePolicy:
    """``policy`` (default `CachePolicy()`) with keyword overrides of its fields."""
    base = CachePolicy() if policy is None else policy
    if not isinstance(base, CachePolicy):
        raise TypeError(f"policy: expected a CachePolicy, got {type(base).__name__}")
    fields = {f.name for f in dataclasses.fields(CachePolicy)}
    unknown = set(options) - fields
    if unknown:
        raise TypeError(f"unknown cache options {sorted(unknown)}; expected fields of CachePolicy: {sorted(fields)}")
    return base.replace(**options) if options else base
