"""Group quantization along the last dimension: per-group scale (and zero point), b-bit codes.

For ``x`` ``[..., D]`` and group size ``G``, every run of ``G`` consecutive elements of the last
dim shares one scale (and, in asymmetric mode, one zero point), stored in FP8 E4M3 or FP16.
Codes are unsigned integers in ``[0, 2**b)`` packed by `packing.pack`.

Dequantization, which every kernel reproduces exactly (``q`` the code, ``s`` the scale, ``z``
the zero point, all in fp32):

=================  ==========================  =========================================
code mode          levels                      value
=================  ==========================  =========================================
symmetric          2**b - 1, centred on 0      ``(q - (2**(b-1) - 1)) * s``
symmetric_full     2**b, odd multiples of s/2  ``(q - 2**(b-1) + 0.5) * s``
asymmetric         2**b, from the group min    ``q * s + z``
=================  ==========================  =========================================

Scales are rounded *up* and zero points *down* to their storage dtype before the codes are
computed, so (with ``clip_ratio == 1``) no code is clipped and every element satisfies
``|x - dequant(x)| <= s / 2`` (`error_bound`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .packing import pack, unpack

CODE_MODES = ("symmetric", "symmetric_full", "asymmetric")


@dataclass
class GroupCodes:
    """Packed codes ``[..., D*b/8]`` uint8, scales ``[..., D/G]``, optional zeros ``[..., D/G]``."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]


def group_quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    code_mode: str,
    scale_dtype: torch.dtype,
    clip_ratio: float = 1.0,
) -> GroupCodes:
    """Quantize ``x`` ``[..., D]`` (float) in groups of ``group_size`` along the last dim."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if code_mode not in CODE_MODES:
        raise ValueError(f"code_mode: expected one of {CODE_MODES}, got {code_mode!r}")
    d = x.shape[-1]
    if group_size <= 0 or d % group_size:
        raise ValueError(f"group_size: expected a positive divisor of the last dim {d}, got {group_size}")
    xg = x.float().reshape(*x.shape[:-1], d // group_size, group_size)
    finfo = torch.finfo(scale_dtype)
    zeros = None
    if code_mode == "asymmetric":
        lo = xg.amin(-1) * clip_ratio
        hi = xg.amax(-1) * clip_ratio
        _check_range(torch.maximum(lo.abs(), hi.abs()), finfo, "zero point")
        zeros = round_to_storage(lo, scale_dtype, up=False)
        levels = (1 << bits) - 1
        scale = (hi - zeros.float()) / levels
    else:
        amax = xg.abs().amax(-1) * clip_ratio
        levels = (1 << (bits - 1)) - 1 if code_mode == "symmetric" else (1 << (bits - 1)) - 0.5
        scale = amax / levels
    _check_range(scale, finfo, "scale")
    smallest_subnormal = finfo.tiny * finfo.eps
    scales = round_to_storage(scale.clamp_min(smallest_subnormal), scale_dtype, up=True)
    s = scales.float().unsqueeze(-1)
    if code_mode == "symmetric":
        half = (1 << (bits - 1)) - 1
        q = torch.round(xg / s).clamp_(-half, half) + half
    elif code_mode == "symmetric_full":
        q = torch.floor(xg / s).add_(1 << (bits - 1)).clamp_(0, (1 << bits) - 1)
    else:
        q = torch.round((xg - zeros.float().unsqueeze(-1)) / s).clamp_(0, (1 << bits) - 1)
    codes = pack(q.to(torch.uint8).reshape(x.shape), bits)
    return GroupCodes(codes, scales, zeros)


def group_dequantize(
    g: GroupCodes,
    bits: int,
    group_size: int,
    code_mode: str,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `group_quantize`: ``[..., D]`` in ``out_dtype`` (computed in fp32)."""
    q = unpack(g.codes, bits).float()
    d = q.shape[-1]
    qg = q.reshape(*q.shape[:-1], d // group_size, group_size)
    s = g.scales.float().unsqueeze(-1)
    if code_mode == "symmetric":
        x = (qg - ((1 << (bits - 1)) - 1)) * s
    elif code_mode == "symmetric_full":
        x = (qg - ((1 << (bits - 1)) - 0.5)) * s
    elif code_mode == "asymmetric":
        if g.zeros is None:
            raise ValueError("zeros: asymmetric codes need a zero point, got None")
        x = qg * s + g.zeros.float().unsqueeze(-1)
    else:
        raise ValueError(f"code_mode: expected one of {CODE_MODES}, got {code_mode!r}")
    return x.reshape(q.shape).to(out_dtype)


def error_bound(scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Largest possible ``|x - dequant(x)|`` per element: half a step, ``[..., D]`` fp32."""
    return (scales.float() / 2).repeat_interleave(group_size, dim=-1)


def round_to_storage(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Round fp32 ``x`` to ``dtype`` toward +inf (``up``) or -inf, exactly, via its bit pattern."""
    y = x.to(dtype)
    wrong = y.float() < x if up else y.float() > x
    if not bool(wrong.any()):
        return y
    nbits = dtype.itemsize * 8
    itype = {1: torch.uint8, 2: torch.int16}[dtype.itemsize]
    raw = y.view(itype).to(torch.int32) & ((1 << nbits) - 1)
    sign = raw >> (nbits - 1)
    mag = raw & ((1 << (nbits - 1)) - 1)
    # Moving away from zero adds one to the magnitude; toward zero subtracts one; crossing zero
    # lands on the smallest subnormal of the other sign.
    away = (sign == 0) if up else (sign == 1)
    cross = ~away & (mag == 0)
    new_mag = torch.where(away, mag + 1, torch.where(cross, torch.ones_like(mag), mag - 1))
    new_sign = torch.where(cross, 1 - sign, sign)
    stepped = ((new_sign << (nbits - 1)) | new_mag)
    if itype == torch.int16:
        stepped = torch.where(stepped >= 1 << 15, stepped - (1 << 16), stepped)
    stepped = stepped.to(itype).view(dtype)
    return torch.where(wrong, stepped, y)


def _check_range(v: torch.Tensor, finfo: torch.finfo, what: str) -> None:
    # Non-finite values are the caller's policy (QVGConfig.check_finite), not a range problem.
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    if v.numel() and float(v.max()) > finfo.max / 1.25:
        raise ValueError(
            f"x: the {what} {float(v.max()):.4g} exceeds the range of the scale dtype "
            f"(max {finfo.max}); use scale_dtype='fp16' or normalise the input"
        )
