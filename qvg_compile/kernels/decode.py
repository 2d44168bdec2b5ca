"""Decode (dequantize) QVG tokens to a dense tensor: ``qvg::decode``.

Reference: `PackedStore.dequantize` (math layer). On CUDA the Triton kernel does the unpack,
scale and centroid gather-add in one pass over the packed tokens and writes the output dtype
directly; elsewhere (and for 3-bit codes or head dims that are not a power of two) the
reference runs.

Exactness: the kernel reproduces the reference's fp32 arithmetic step for step; the GPU compiler
may fuse a multiply and an add into one FMA, so outputs agree to 1 ulp of fp32 before the final
rounding (BF16/FP16 outputs: equal or 1 ulp apart). Under the Triton interpreter they are equal.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quant.segment import QVGSegment
from ..quant.packed import PackedStore
from ._common import check_store, make_store, triton_supports

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def dequantize_store(store: PackedStore, start: int, end: int,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Tokens ``[start, end)`` of ``store`` as a dense ``[B, H, end - start, D]`` tensor of ``out_dtype``."""
    check_store(store, "store")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {OUT_DTYPES}, got {out_dtype}")
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= store.capacity):
        raise ValueError(f"start, end: expected ints with 0 <= start <= end <= {store.capacity}, got {start!r}, {end!r}")
    return torch.ops.qvg.decode(store.codes, store.scales, store.zeros, store.assignments, store.centroids,
                                store.segment_ids, store.bits, store.group_size, store.code_mode,
                                start, end, out_dtype)


def dequantize_segment(seg: QVGSegment, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``seg.dequantize()`` in ``out_dtype`` (default the segment's dtype), original shape and layout.

    On CUDA the kernel writes straight into the output's layout (no intermediate copy).
    """
    if not isinstance(seg, QVGSegment):
        raise TypeError(f"seg: expected a QVGSegment, got {type(seg).__name__}")
    out_dtype = out_dtype or seg.dtype
    store = segment_as_store(seg)
    out = torch.empty(seg.shape, dtype=out_dtype, device=seg.codes.device)
    view = out.movedim(seg.seq_dim, -2)
    view = view.reshape(store.codes.shape[0], store.codes.shape[1], *view.shape[-2:]) if view.dim() != 4 else view
    if seg.codes.is_cuda and triton_supports(store) and out_dtype in OUT_DTYPES and view.data_ptr() == out.data_ptr():
        from ._triton_decode import decode_into

        decode_into(store, 0, store.capacity, view)
        return out
    return seg.dequantize().to(out_dtype)


def segment_as_store(seg: QVGSegment) -> PackedStore:
    """A one-segment `PackedStore` view of ``seg`` (normalised layout, lead flattened to 2 dims)."""
    lead = seg.codes.shape[:-2]
    n = seg.codes.shape[-2]
    b, h = (int(torch.Size(lead[:-1]).numel()), lead[-1]) if lead else (1, 1)
    s = seg.assignments.shape[0]
    c = seg.centroids.shape[-2] if s else 1
    d = seg.scales.shape[-1] * seg.group_size
    codes = seg.codes.reshape(b, h, n, -1)
    scales = seg.scales.reshape(b, h, n, -1)
    zeros = None if seg.zeros is None else seg.zeros.reshape(b, h, n, -1)
    assign = seg.assignments.reshape(s, b, h, n)
    cents = seg.centroids.reshape(1, s, b, h, c, d) if s else seg.codes.new_zeros(1, 0, b, h, 1, d, dtype=torch.bfloat16)
    seg_ids = torch.zeros(n, dtype=torch.int32, device=seg.codes.device)
    return make_store(codes, scales, zeros, assign, cents, seg_ids, seg.bits, seg.group_size, seg.code_mode)


@torch.library.custom_op("qvg::decode", mutates_args=())
def _decode_op(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], assignments: torch.Tensor,
               centroids: torch.Tensor, segment_ids: torch.Tensor, bits: int, group_size: int, code_mode: str,
               start: int, end: int, out_dtype: torch.dtype) -> torch.Tensor:
    store = make_store(codes, scales, zeros, assignments, centroids, segment_ids, bits, group_size, code_mode)
    if codes.is_cuda and triton_supports(store):
        from ._triton_decode import decode_into

        b, h = codes.shape[:2]
        out = torch.empty(b, h, end - start, store.head_dim, dtype=out_dtype, device=codes.device)
        return decode_into(store, start, end, out)
    return store.dequantize(start, end, out_dtype)


@_decode_op.register_fake
def _decode_fake(codes, scales, zeros, assignments, centroids, segment_ids, bits, group_size, code_mode,
                 start, end, out_dtype):
    b, h = codes.shape[:2]
    d = scales.shape[-1] * group_size
    return codes.new_empty(b, h, end - start, d, dtype=out_dtype)
