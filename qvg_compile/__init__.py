"""qvg-compile: a 2-bit QVG KV cache for auto-regressive video diffusion models via torch.compile.

``torch.compile(model, backend=qvg_compile.qvg_backend)`` finds the KV caches in the traced
graphs and moves them into `QVGCache` storage; see `explain` for what it found and did.
"""

from .backend import QVGBackend, QVGBackendWarning, ValidationError, backend, qvg_backend, register
from .cache import QVGCache, compress, memory_report, reset_stats, seal, stats
from .explain import explain
from .patch import PatchHandle, patch
from .quant import QVGConfig, quantize

register()

__all__ = [
    "QVGConfig", "quantize", "QVGCache", "compress", "memory_report", "seal", "stats", "reset_stats",
    "qvg_backend", "backend", "QVGBackend", "QVGBackendWarning", "ValidationError", "explain", "patch",
    "PatchHandle",
]
__version__ = "0.1.0"
