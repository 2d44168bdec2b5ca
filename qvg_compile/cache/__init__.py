"""The storage layer: `QVGCache`, a dense-looking KV cache holding 2-bit QVG segments."""

from . import dispatch as _dispatch  # noqa: F401  (fills QVGCache's op table)
from .api import compress, memory_report, seal
from .policy import CachePolicy
from .read_fast import release_workspace, workspace_bytes
from .tally import QVGFallbackWarning, reset_stats, stats
from .tensor import QVGCache

__all__ = ["QVGCache", "CachePolicy", "compress", "memory_report", "seal", "stats", "reset_stats",
           "QVGFallbackWarning", "workspace_bytes", "release_workspace"]
