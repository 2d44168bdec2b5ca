"""qvg-compile: a 2-bit QVG KV cache for auto-regressive video diffusion models via torch.compile."""

from .quant import QVGConfig, quantize

__all__ = ["QVGConfig", "quantize"]
__version__ = "0.1.0"
