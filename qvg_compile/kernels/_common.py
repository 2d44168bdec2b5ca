"""Validation and (un)flattening of `PackedStore` for the kernels and their custom ops.

Custom ops only take tensors and plain values, so a store crosses the op boundary as the six
tensors of `STORE_FIELDS` plus ``bits``, ``group_size`` and ``code_mode``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..quant.group import CODE_MODES
from ..quant.packed import PackedStore

STORE_FIELDS = ("codes", "scales", "zeros", "assignments", "centroids", "segment_ids")
TRITON_BITS = (2, 4, 8)
SCALE_DTYPES = (torch.float8_e4m3fn, torch.float16)


def check_store(store: PackedStore, name: str) -> tuple[int, int, int, int]:
    """Validate ``store``'s shapes and dtypes; returns ``(B, H, capacity, D)``."""
    if not isinstance(store, PackedStore):
        raise TypeError(f"{name}: expected a PackedStore, got {type(store).__name__}")
    if store.code_mode not in CODE_MODES:
        raise ValueError(f"{name}.code_mode: expected one of {CODE_MODES}, got {store.code_mode!r}")
    if store.codes.dtype != torch.uint8 or store.codes.dim() != 4:
        raise TypeError(f"{name}.codes: expected uint8 [B, H, capacity, D*bits/8], got "
                        f"{store.codes.dtype} {list(store.codes.shape)}")
    b, h, cap, _ = store.codes.shape
    d = store.head_dim
    if store.scales.dtype not in SCALE_DTYPES:
        raise TypeError(f"{name}.scales: expected float8_e4m3fn or float16, got {store.scales.dtype}")
    if tuple(store.scales.shape) != (b, h, cap, d // store.group_size) or d % store.group_size:
        raise ValueError(f"{name}.scales: expected [{b}, {h}, {cap}, D/G], got {list(store.scales.shape)}")
    if store.code_mode == "asymmetric":
        if store.zeros is None or store.zeros.shape != store.scales.shape or store.zeros.dtype != store.scales.dtype:
            raise ValueError(f"{name}.zeros: asymmetric codes need zeros shaped and typed like scales")
    if store.assignments.dtype != torch.uint8 or tuple(store.assignments.shape[1:]) != (b, h, cap):
        raise ValueError(f"{name}.assignments: expected uint8 [S, {b}, {h}, {cap}], got "
                         f"{store.assignments.dtype} {list(store.assignments.shape)}")
    s = store.stages
    cents = store.centroids
    if cents.dim() != 6 or tuple(cents.shape[1:4]) != (s, b, h) or cents.shape[-1] != d:
        raise ValueError(f"{name}.centroids: expected [K, {s}, {b}, {h}, C, {d}], got {list(cents.shape)}")
    if store.segment_ids.dtype not in (torch.int16, torch.int32) or tuple(store.segment_ids.shape) != (cap,):
        raise ValueError(f"{name}.segment_ids: expected int16 or int32 [{cap}], got "
                         f"{store.segment_ids.dtype} {list(store.segment_ids.shape)}")
    if store.codes.shape[-1] * 8 != d * store.bits:
        raise ValueError(f"{name}.codes: last dim {store.codes.shape[-1]} does not hold {d} codes of {store.bits} bits")
    devices = {t.device for t in store.tensors().values()}
    if len(devices) != 1:
        raise ValueError(f"{name}: tensors on several devices {sorted(map(str, devices))}")
    return b, h, cap, d


def triton_supports(store: PackedStore) -> bool:
    """Whether the Triton decoder handles this store (the reference covers the rest)."""
    d = store.head_dim
    return store.bits in TRITON_BITS and d >= 16 and d & (d - 1) == 0 and store.group_size <= d


def make_store(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], assignments: torch.Tensor,
               centroids: torch.Tensor, segment_ids: torch.Tensor, bits: int, group_size: int,
               code_mode: str) -> PackedStore:
    return PackedStore(codes, scales, zeros, assignments, centroids, segment_ids, bits, group_size, code_mode)


def scale_format(scales: torch.Tensor) -> int:
    """The ``SCALE_FP8`` meta-parameter of the decoding kernels for ``scales``: 0 fp16; FP8 E4M3
    decoded by the hardware's conversion (2) on a GPU that has one (compute capability 8.9+),
    by integer ops (1) elsewhere (the Triton interpreter, older GPUs)."""
    if scales.dtype != torch.float8_e4m3fn:
        return 0
    native = (scales.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
              and torch.cuda.get_device_capability(scales.device) >= (8, 9))
    return 2 if native else 1


def kernel_store_args(store: PackedStore) -> list:
    """Pointers and strides of a store in the order of `_jit.decode_tile` (after the batch and
    head strides of each array): codes, scales, zeros, assignments, centroids, segment_ids. FP8
    scales, zero points and centroids go as their uint8 codes (the interpreter has no FP8 type)."""
    scales = store.scales.view(torch.uint8) if store.scales.dtype == torch.float8_e4m3fn else store.scales
    zeros = store.zeros if store.zeros is not None else store.scales
    if zeros.dtype == torch.float8_e4m3fn:
        zeros = zeros.view(torch.uint8)
    a, c = store.assignments, store.centroids
    if c.dtype == torch.float8_e4m3fn:
        c = c.view(torch.uint8)
    if not store.stages:
        # Unused by the kernel (STAGES == 0) but must still be a valid pointer.
        a, c = store.codes.new_zeros(1, 1, 1, 1), store.codes.new_zeros(1, 1, 1, 1, 1, 1)
    return [
        store.codes, *store.codes.stride(),
        scales, *scales.stride(),
        zeros, *zeros.stride(),
        a, a.stride(0), a.stride(1), a.stride(2), a.stride(3),
        c, c.stride(0), c.stride(1), c.stride(2), c.stride(3), c.stride(4), c.stride(5),
        store.segment_ids,
    ]
