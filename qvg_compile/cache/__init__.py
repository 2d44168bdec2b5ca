"""The storage layer: `QVGCache`, a dense-looking KV cache holding 2-bit QVG segments."""

from .api import compress, memory_report
from .stats import reset_stats, stats
from .tensor import QVGCache

__all__ = ["QVGCache", "compress", "memory_report", "stats", "reset_stats"]
