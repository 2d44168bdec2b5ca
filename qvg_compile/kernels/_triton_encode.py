"""Triton kernels of the QVG encode: k-means assignment, deterministic centroid update, and the
fused residual quantizer.

- `assign`: distances ``||c||^2 - 2 x.c`` of a tile of tokens to blocks of centroids on the
  tensor cores, reduced to the arg-min in registers: no N x C matrix ever reaches memory.
- `update`: cluster sums as one-hot matrix products over split token ranges, then a fixed-order
  sum of the splits. No atomics, so the result is the same on every run. 16-bit inputs make the
  one-hot products exact (1 * x, fp32 accumulation); fp32 inputs use 3-pass TF32 (~fp32).
- `quantize`: for a tile of tokens: subtract the centroids of every stage (stage order, fp32),
  per-group scale (rounded up to its storage type exactly like `round_to_storage`), codes and
  packing, in one read of the input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import MODE_IDS, small_float_decode, small_float_encode

# (EXP, MAN, BIAS) of the scale storage types.
FLOAT_FORMATS = {torch.float8_e4m3fn: (4, 3, 7), torch.float16: (5, 10, 15)}
RINT_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds half to even (|v| < 2**22)


def _precision(x: torch.Tensor) -> str:
    return "tf32x3" if x.is_cuda else "ieee"


@triton.jit
def _assign_kernel(x, s_x0, s_x1, s_xn, s_xd, B2, cents, out, N, C,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < N
    d = tl.arange(0, D)
    xt = tl.load(x + (g // B2) * s_x0 + (g % B2) * s_x1 + offs_n[:, None] * s_xn + d[None, :] * s_xd,
                 mask=nm[:, None], other=0.0)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    arg = tl.zeros([BLOCK_N], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cm = offs_c < C
        ct = tl.load(cents + (g * C + offs_c[:, None]) * D + d[None, :], mask=cm[:, None], other=0.0)
        # 16-bit inputs: distances to the centroids rounded to the input type, on the tensor cores.
        ct = ct.to(xt.dtype)
        cf = ct.to(tl.float32)
        cn = tl.sum(cf * cf, 1)
        if xt.dtype == tl.float32:
            dots = tl.dot(xt, tl.trans(ct), input_precision=PREC)
        else:
            dots = tl.dot(xt, tl.trans(ct))
        dist = tl.where(cm[None, :], cn[None, :] - 2.0 * dots, float("inf"))
        bmin = tl.min(dist, 1)
        barg = tl.argmin(dist, 1).to(tl.int32) + c0
        better = bmin < best
        best = tl.where(better, bmin, best)
        arg = tl.where(better, barg, arg)
    tl.store(out + g * N + offs_n, arg.to(tl.uint8), mask=nm)


@triton.jit
def _update_kernel(x, s_x0, s_x1, s_xn, s_xd, B2, assign, sums, counts, N, C, G, per_split,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_C, D], tl.float32)
    cnt = tl.zeros([BLOCK_C], tl.float32)
    lo = split * per_split
    hi = tl.minimum(N, lo + per_split)
    base = x + (g // B2) * s_x0 + (g % B2) * s_x1
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nm = offs_n < hi
        a = tl.load(assign + g * N + offs_n, mask=nm, other=0).to(tl.int32)
        a = tl.where(nm, a, -1)
        onehot = offs_c[:, None] == a[None, :]
        xt = tl.load(base + offs_n[:, None] * s_xn + d[None, :] * s_xd, mask=nm[:, None], other=0.0)
        if xt.dtype == tl.float32:
            acc += tl.dot(onehot.to(tl.float32), xt, input_precision=PREC)
        else:
            acc += tl.dot(onehot.to(xt.dtype), xt)
        cnt += tl.sum(onehot.to(tl.float32), 1)
    cm = offs_c < C
    row = (split * G + g) * C + offs_c
    tl.store(sums + row[:, None] * D + d[None, :], acc, mask=cm[:, None])
    tl.store(counts + row, cnt, mask=cm)


@triton.jit
def _quantize_kernel(x, s_x0, s_x1, s_xn, s_xd, B2, cents, assign, codes, scales, zeros, flags, N, C, G, limit,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                     MODE: tl.constexpr, STAGES: tl.constexpr, EXP: tl.constexpr, MAN: tl.constexpr,
                     BIAS: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < N
    d = tl.arange(0, D)
    r = tl.load(x + (g // B2) * s_x0 + (g % B2) * s_x1 + offs_n[:, None] * s_xn + d[None, :] * s_xd,
                mask=nm[:, None], other=0.0).to(tl.float32)
    for s in tl.static_range(STAGES):
        a = tl.load(assign + (s * G + g) * N + offs_n, mask=nm, other=0).to(tl.int64)
        r -= tl.load(cents + ((s * G + g) * C + a[:, None]) * D + d[None, :], mask=nm[:, None], other=0.0).to(tl.float32)
    NG: tl.constexpr = D // GROUP
    rg = tl.reshape(r, (BLOCK_N, NG, GROUP))
    unit = tl.full([], (1 - BIAS - MAN + 127) << 23, tl.int32).to(tl.float32, bitcast=True)
    if MODE == 2:
        levels: tl.constexpr = (1 << BITS) - 1
        lo = tl.min(rg, 2)
        hi = tl.max(rg, 2)
        bad = tl.maximum(tl.abs(lo), tl.abs(hi)) > limit
        zc = small_float_encode(lo, False, EXP, MAN, BIAS)
        z = small_float_decode(zc, EXP, MAN, BIAS)
        scale = tl.math.div_rn(hi - z, tl.full([], levels, tl.float32))
    else:
        amax = tl.max(tl.abs(rg), 2)
        if MODE == 0:
            scale = tl.math.div_rn(amax, tl.full([], (1 << (BITS - 1)) - 1, tl.float32))
        else:
            scale = tl.math.div_rn(amax, tl.full([], (1 << (BITS - 1)) - 0.5, tl.float32))
        bad = amax != amax
    bad = bad | (scale > limit)
    sc = small_float_encode(tl.maximum(scale, unit), True, EXP, MAN, BIAS)
    sv = small_float_decode(sc, EXP, MAN, BIAS)[:, :, None]
    if MODE == 0:
        half: tl.constexpr = (1 << (BITS - 1)) - 1
        v = tl.math.div_rn(rg, sv)
        v = (v + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(v, -half), half) + half
    elif MODE == 1:
        q = tl.floor(tl.math.div_rn(rg, sv)) + (1 << (BITS - 1))
        q = tl.minimum(tl.maximum(q, 0.0), (1 << BITS) - 1)
    else:
        v = tl.math.div_rn(rg - z[:, :, None], sv)
        v = (v + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(v, 0.0), (1 << BITS) - 1)
    PER: tl.constexpr = 8 // BITS
    qi = tl.reshape(q.to(tl.int32), (BLOCK_N, D // PER, PER))
    shifts = tl.arange(0, PER) * BITS
    packed = tl.sum(qi << shifts[None, None, :], 2)
    DP: tl.constexpr = D // PER
    dp = tl.arange(0, DP)
    tl.store(codes + (g * N + offs_n[:, None]) * DP + dp[None, :], packed.to(tl.uint8), mask=nm[:, None])
    ng = tl.arange(0, NG)
    sptr = (g * N + offs_n[:, None]) * NG + ng[None, :]
    tl.store(scales + sptr, sc.to(scales.dtype.element_ty), mask=nm[:, None])
    if MODE == 2:
        tl.store(zeros + sptr, zc.to(zeros.dtype.element_ty), mask=nm[:, None])
    any_bad = tl.max(tl.where(nm[:, None], bad, False).to(tl.int32), 1)
    tl.store(flags + g * N + offs_n, any_bad.to(tl.int8), mask=nm)


def _x_args(x: torch.Tensor) -> tuple:
    """``x`` ``[B1, B2, N, D]`` as (tensor, strides..., B2)."""
    return (x, *x.stride(), x.shape[1])


def assign(x: torch.Tensor, centroids: torch.Tensor, block_n: int = 0, warps: int = 8) -> torch.Tensor:
    """Nearest centroid per token: x ``[B1, B2, N, D]``, centroids fp32 ``[B1*B2, C, D]`` -> uint8 ``[B1*B2, N]``."""
    b1, b2, n, d = x.shape
    g, c, _ = centroids.shape
    cents = centroids.float().contiguous()
    out = torch.empty(g, n, dtype=torch.uint8, device=x.device)
    block_n = block_n or (128 if x.is_cuda else 32)
    block_c = 128 if d <= 128 else 64
    _assign_kernel[(triton.cdiv(n, block_n), g)](*_x_args(x), cents, out, n, c, D=d, BLOCK_N=block_n,
                                                 BLOCK_C=min(block_c, triton.next_power_of_2(c)),
                                                 PREC=_precision(x), num_warps=warps if x.is_cuda else 4)
    return out


def update(x: torch.Tensor, assignments: torch.Tensor, previous: torch.Tensor, splits: int = 0) -> torch.Tensor:
    """Cluster means fp32 ``[G, C, D]`` (empty clusters keep ``previous``), deterministic."""
    b1, b2, n, d = x.shape
    g, c, _ = previous.shape
    block_c = min(128 if d <= 128 else 64, triton.next_power_of_2(c))
    block_n = 64 if x.is_cuda else 32
    if not splits:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        splits = max(1, min(triton.cdiv(n, 4 * block_n), triton.cdiv(2 * sms, g * triton.cdiv(c, block_c))))
    per_split = triton.cdiv(n, splits)
    sums = torch.empty(splits, g, c, d, dtype=torch.float32, device=x.device)
    counts = torch.empty(splits, g, c, dtype=torch.float32, device=x.device)
    _update_kernel[(triton.cdiv(c, block_c), splits, g)](
        *_x_args(x), assignments, sums, counts, n, c, g, per_split, D=d, BLOCK_N=block_n, BLOCK_C=block_c,
        PREC=_precision(x), num_warps=8 if x.is_cuda else 4)
    total = sums.sum(0)
    cnt = counts.sum(0)
    means = total / cnt.clamp_min(1).unsqueeze(-1)
    return torch.where((cnt > 0).unsqueeze(-1), means, previous.float())


def quantize(x: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor, bits: int, group_size: int,
             code_mode: str, scale_dtype: torch.dtype, block_n: int = 32, warps: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual group quantization of x ``[B1, B2, N, D]`` after subtracting ``centroids`` ``[S, G, C, D]``
    picked by ``assignments`` ``[S, G, N]``. Returns codes uint8 ``[G, N, D*bits/8]``, scales
    ``[G, N, D/G]``, zeros (same, or ``[G, N, 0]``) and a per-token out-of-range flag int8 ``[G, N]``."""
    b1, b2, n, d = x.shape
    s = assignments.shape[0]
    g = b1 * b2
    c = centroids.shape[-2] if s else 1
    exp, man, bias = FLOAT_FORMATS[scale_dtype]
    int_type = torch.uint8 if scale_dtype.itemsize == 1 else torch.int16
    codes = torch.empty(g, n, d * bits // 8, dtype=torch.uint8, device=x.device)
    scales = torch.empty(g, n, d // group_size, dtype=int_type, device=x.device)
    asym = code_mode == "asymmetric"
    zeros = torch.empty(g, n, d // group_size if asym else 0, dtype=int_type, device=x.device)
    flags = torch.empty(g, n, dtype=torch.int8, device=x.device)
    cents = centroids.contiguous() if s else codes
    assign_ = assignments.contiguous() if s else codes
    _quantize_kernel[(triton.cdiv(n, block_n), g)](
        *_x_args(x), cents, assign_, codes, scales, zeros if asym else scales, flags, n, c, g,
        torch.finfo(scale_dtype).max / 1.25,
        D=d, BLOCK_N=block_n, BITS=bits, GROUP=group_size, MODE=MODE_IDS[code_mode], STAGES=s,
        EXP=exp, MAN=man, BIAS=bias, num_warps=warps)
    return codes, scales.view(scale_dtype), zeros.view(scale_dtype), flags
