"""Triton device functions shared by the QVG kernels: small-float codecs and the tile decoder.

Scales and zero points are handled as raw integer codes so the same code runs in the Triton
interpreter (which has no FP8 type) and on the GPU, and so rounding is *directed* exactly like
`qvg_compile.quant.group.round_to_storage`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# code_mode -> constexpr id used by every kernel.
MODE_IDS = {"symmetric": 0, "symmetric_full": 1, "asymmetric": 2}


@triton.jit
def small_float_decode(bits, EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr):
    """Integer codes of a small IEEE-like float (FP8 E4M3: 4, 3, 7) -> fp32 values."""
    bits = bits.to(tl.int32)
    sign = (bits >> (EXP + MAN)) & 1
    e = (bits >> MAN) & ((1 << EXP) - 1)
    m = bits & ((1 << MAN) - 1)
    normal = ((e + (127 - BIAS)) << 23) | (m << (23 - MAN))
    unit = tl.full([], (1 - BIAS - MAN + 127) << 23, tl.int32).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * unit
    val = tl.where(e > 0, normal.to(tl.float32, bitcast=True), sub)
    return tl.where(sign == 1, -val, val)


@triton.jit
def small_float_encode(v, UP: tl.constexpr, EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr):
    """fp32 ``v`` (finite, in range) -> int32 code of the nearest small float toward +inf (UP)
    or -inf: the smallest representable value >= v, or the largest <= v."""
    neg = v < 0
    a = tl.abs(v)
    ab = a.to(tl.int32, bitcast=True)
    ex = (ab >> 23) - 127
    mant = ab & 0x7FFFFF
    code_n = ((ex + BIAS) << MAN) | (mant >> (23 - MAN))
    rem_n = (mant & ((1 << (23 - MAN)) - 1)) != 0
    # Below the smallest normal the target is a multiple of its subnormal unit: scale exactly.
    inv_unit = tl.full([], (BIAS + MAN - 1 + 127) << 23, tl.int32).to(tl.float32, bitcast=True)
    t = a * inv_unit
    ft = tl.floor(t)
    code_s = ft.to(tl.int32)
    rem_s = t != ft
    is_norm = ex >= 1 - BIAS
    code = tl.where(is_norm, code_n, code_s)
    rem = tl.where(is_norm, rem_n, rem_s)
    # Rounding up a positive or down a negative value grows the magnitude.
    if UP:
        grow = rem & (v > 0)
    else:
        grow = rem & neg
    code = code + grow.to(tl.int32)
    return tl.where(neg & (code != 0), code | (1 << (EXP + MAN)), code)


@triton.jit
def load_scale(ptr, mask, SCALE_FP8: tl.constexpr):
    """Scales / zero points as fp32: fp16 (``SCALE_FP8`` 0), or FP8 E4M3 stored as uint8 codes,
    decoded by integer ops (1: the interpreter has no FP8 type) or by the hardware's conversion
    (2: one instruction instead of ~15 per value; the decoded tile is replicated per channel, so
    this is most of a decode's arithmetic). Both give the same value for every finite code."""
    if SCALE_FP8 == 2:
        return tl.load(ptr, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif SCALE_FP8 == 1:
        return small_float_decode(tl.load(ptr, mask=mask, other=0), 4, 3, 7)
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_centroids(ptrs, mask, SCALE_FP8: tl.constexpr):
    """Centroid values as fp32 from ``ptrs``: a float type, or FP8 E4M3 passed as uint8 codes
    (`kernel_store_args`), decoded by the hardware's conversion where ``SCALE_FP8`` says the GPU
    has one and by integer ops elsewhere (as `load_scale`)."""
    if ptrs.dtype.element_ty == tl.uint8:
        # FP8 centroids also where the scales are not FP8 (SCALE_FP8 == 0): integer decode then.
        if SCALE_FP8 == 2:
            c = load_scale(ptrs, mask, 2)
        else:
            c = load_scale(ptrs, mask, 1)
    else:
        c = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return c


@triton.jit
def unpack_codes(rows, s_cd, m2, BN: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Codes of ``BITS`` (2, 4 or 8) -> fp32 ``[BN, D]`` from the byte rows at ``rows`` (``[BN, 1]``
    pointers): each byte loaded once, in contiguous rows, and its codes spread over the channels
    by joins (low bits first, as `quant.pack` packs them)."""
    PER: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    byte = tl.load(rows + tl.arange(0, D // PER)[None, :] * s_cd, mask=m2, other=0).to(tl.int32)
    if PER == 1:
        q = byte
    elif PER == 2:
        q = tl.reshape(tl.join(byte & MASK, (byte >> BITS) & MASK), (BN, D))
    else:
        lo = tl.join(byte & MASK, (byte >> (2 * BITS)) & MASK)
        hi = tl.join((byte >> BITS) & MASK, (byte >> (3 * BITS)) & MASK)
        q = tl.reshape(tl.join(lo, hi), (BN, D))
    return q.to(tl.float32)


@triton.jit
def group_scales(rows, s_sg, n_mask, offs_d, GROUP: tl.constexpr, NG: tl.constexpr, SCALE_FP8: tl.constexpr):
    """Scales (or zero points) of ``NG`` groups -> fp32 ``[BN, D]``, from the rows at ``rows``
    (``[BN]`` pointers): one load per token and group, spread over the group's channels by selects."""
    group = (offs_d // GROUP)[None, :]
    out = tl.broadcast_to(load_scale(rows, n_mask, SCALE_FP8)[:, None], (rows.shape[0], offs_d.shape[0]))
    for g in tl.static_range(1, NG):
        out = tl.where(group == g, load_scale(rows + g * s_sg, n_mask, SCALE_FP8)[:, None], out)
    return out


@triton.jit
def decode_tile(
    codes, s_cn, s_cd,
    scales, s_sn, s_sg,
    zeros, s_zn, s_zg,
    assign, s_as, s_an,
    cents, s_xk, s_xs, s_xc, s_xd,
    seg_ids,
    offs_n, n_mask, offs_d,
    BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, STAGES: tl.constexpr,
    SCALE_FP8: tl.constexpr, GROUPED: tl.constexpr = False, PACKED_LOADS: tl.constexpr = False,
):
    """Decode tokens ``offs_n`` (``[BN]``) of one (batch, head) of a `PackedStore` -> fp32 ``[BN, D]``.

    Pointers are already offset to the (batch, head); the arithmetic and the order of the
    centroid additions (last stage first) are those of `PackedStore.dequantize`.
    """
    PER: tl.constexpr = 8 // BITS
    m2 = n_mask[:, None]
    BN: tl.constexpr = offs_n.shape[0]
    D: tl.constexpr = offs_d.shape[0]
    NG: tl.constexpr = D // GROUP
    if PACKED_LOADS and NG == 1:
        # One scale per token: the code's offset folds into the scale as one more per-token
        # value, one fused multiply-add per channel. Bit-equal to ``(q - c) * s``: q * s and c * s
        # are exact in fp32 (at most 8 and 11 significant bits multiplied), so is their sum.
        q = unpack_codes(codes + offs_n[:, None] * s_cn, s_cd, m2, BN, D, BITS)
        sv = load_scale(scales + offs_n * s_sn, n_mask, SCALE_FP8)
        if MODE == 0:
            off = sv * -((1 << (BITS - 1)) - 1)
        elif MODE == 1:
            off = sv * -((1 << (BITS - 1)) - 0.5)
        else:
            off = load_scale(zeros + offs_n * s_zn, n_mask, SCALE_FP8)
        x = q * sv[:, None] + off[:, None]
    else:
        if PACKED_LOADS:
            # Each code byte and each group's scale loaded once per token (the gather's tile).
            q = unpack_codes(codes + offs_n[:, None] * s_cn, s_cd, m2, BN, D, BITS)
            s = group_scales(scales + offs_n * s_sn, s_sg, n_mask, offs_d, GROUP, NG, SCALE_FP8)
            if MODE == 2:
                z = group_scales(zeros + offs_n * s_zn, s_zg, n_mask, offs_d, GROUP, NG, SCALE_FP8)
        else:
            byte = tl.load(codes + offs_n[:, None] * s_cn + (offs_d // PER)[None, :] * s_cd, mask=m2, other=0)
            q = ((byte.to(tl.int32) >> ((offs_d % PER) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
            if GROUPED:
                # One scale load and decode per group, broadcast over the group's channels.
                g = tl.arange(0, NG)[None, :]
                s = tl.reshape(load_scale(scales + offs_n[:, None] * s_sn + g * s_sg, m2, SCALE_FP8), (BN, NG, 1))
                q = tl.reshape(q, (BN, NG, GROUP))
                if MODE == 2:
                    z = tl.reshape(load_scale(zeros + offs_n[:, None] * s_zn + g * s_zg, m2, SCALE_FP8), (BN, NG, 1))
            else:
                g = (offs_d // GROUP)[None, :]
                s = load_scale(scales + offs_n[:, None] * s_sn + g * s_sg, m2, SCALE_FP8)
                if MODE == 2:
                    z = load_scale(zeros + offs_n[:, None] * s_zn + g * s_zg, m2, SCALE_FP8)
        if MODE == 0:
            x = (q - ((1 << (BITS - 1)) - 1)) * s
        elif MODE == 1:
            x = (q - ((1 << (BITS - 1)) - 0.5)) * s
        else:
            x = q * s + z
    if GROUPED and not PACKED_LOADS:
        x = tl.reshape(x, (BN, D))
    if STAGES > 0:
        seg = tl.load(seg_ids + offs_n, mask=n_mask, other=0).to(tl.int64)
        base = cents + seg * s_xk
        for i in tl.static_range(STAGES):
            st = STAGES - 1 - i
            a = tl.load(assign + st * s_as + offs_n * s_an, mask=n_mask, other=0).to(tl.int64)
            row = base + st * s_xs + a * s_xc
            x += load_centroids(row[:, None] + offs_d[None, :] * s_xd, m2, SCALE_FP8)
    return x
