"""The math layer: the reference QVG algorithm, its baselines, packing, metrics, bit accounting.

Pure PyTorch on any device; every kernel is tested against it.
"""

from .api import analytic_bits_per_element, quantize
from .baselines import KIVISegment, QuaRotSegment
from .config import PRESETS, QVGConfig
from .lloyd import KMeansResult, kmeans
from .metrics import attention_rel_err, cosine_similarity, rel_mse, snr_db
from .segment import QVGSegment, Segment

__all__ = [
    "PRESETS", "QVGConfig", "quantize", "analytic_bits_per_element", "kmeans", "KMeansResult",
    "Segment", "QVGSegment", "KIVISegment", "QuaRotSegment",
    "rel_mse", "snr_db", "cosine_similarity", "attention_rel_err",
]
