"""Kernels layer: Triton kernels for QVG encode, decode and attention over compressed KV, each
registered as a ``qvg::`` custom op that runs Triton on CUDA and the math-layer reference elsewhere.

Public entry points:
- `attention.qvg_attention`: softmax attention over sealed `PackedStore` ranges plus a dense tail.
- `decode.dequantize_store` / `decode.dequantize_segment`: packed tokens -> BF16/FP16/FP32.
- `encode.encode_qvg`: the kernel version of `qvg_compile.quant.qvg.encode_qvg`.
"""

from .attention import qvg_attention, reference_attention
from .decode import dequantize_segment, dequantize_store
from .encode import encode_qvg

__all__ = ["qvg_attention", "reference_attention", "dequantize_store", "dequantize_segment", "encode_qvg"]
