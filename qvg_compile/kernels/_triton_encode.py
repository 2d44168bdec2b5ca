"""Triton kernels of the QVG encode: k-means assignment, deterministic centroid update (alone or
fused with the assignment), and the fused residual quantizer.

Every kernel takes up to two inputs of the same shape, dtype and strides (K and V of one layer)
and treats their ``G0 + G1`` (batch x head) sets as one grid, so one launch fills the GPU for both.

- `assign`: distances ``||c||^2 - 2 x.c`` of a tile of tokens to the whole codebook on the tensor
  cores, reduced to the arg-min in registers: no N x C matrix reaches memory. Each program walks a
  contiguous token range of one set and keeps the codebook in shared memory.
- `lloyd_step`: one Lloyd iteration in one pass over x: per token tile, the distances (centroids
  as the rows, so the one-hot matrix comes out in the layout of the next product) and the arg-min,
  then one-hot^T @ x into per-program cluster sums; `_finish_kernel` adds the programs' sums in a
  fixed order. No atomics: the result is the same on every run.
- `update`: the same sums for given assignments (the ``qvg::kmeans_update`` op).
- `quantize`: for a tile of tokens: subtract the centroids of every stage (stage order, fp32),
  per-group scale (rounded up to its storage type exactly like `round_to_storage`), codes and
  packing, in one read of the input; flags out-of-range scales and non-finite inputs per token.

Floors (H100, one bf16 tensor [1, 12, 37440, 128], C=256, counted): x is 115 MB (0.039 ms at
~3 TB/s); one assignment or one update is 2*G*N*C*D = 29.4 GFLOP (0.037 ms at ~790 TFLOP/s), so
a fused Lloyd step is compute-bound at ~0.075 ms, the final assignment ~0.04 ms and the quantizer
(reads x, writes 16 MB) ~0.044 ms: ~0.23 ms per tensor with 2 iterations, ~0.47 ms for K+V.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._jit import MODE_IDS, load_centroids, small_float_decode, small_float_encode

# (EXP, MAN, BIAS) of the scale storage types.
FLOAT_FORMATS = {torch.float8_e4m3fn: (4, 3, 7), torch.float16: (5, 10, 15)}
# Codebooks up to this many bytes stay in shared memory for a whole program; larger ones (fp32
# inputs on the GPU, head_dim 256) are streamed in blocks of centroids per token tile.
RESIDENT_BOOK_BYTES = 64 * 1024
# The fused Lloyd step keeps C x D fp32 sums in registers (16 warps); the update kernel at most
# half as many per program (8 warps), a quarter for fp32 inputs (3-pass TF32 needs the room).
MAX_SUM_ELEMENTS = 256 * 128
# Quantize flags (bits): a scale or zero point exceeds the scale dtype; a non-finite input.
FLAG_RANGE = tl.constexpr(1)
FLAG_NONFINITE = tl.constexpr(2)


def _precision(x: torch.Tensor) -> str:
    return "tf32x3" if x.is_cuda else "ieee"


@triton.jit
def _set_base(g, x0, x1, s0, s1, g0, b2):
    """Base pointer of set ``g`` (64-bit offsets): sets ``[0, g0)`` are x0's, the rest x1's."""
    if g < g0:
        base = x0 + (g // b2).to(tl.int64) * s0 + (g % b2).to(tl.int64) * s1
    else:
        h = g - g0
        base = x1 + (h // b2).to(tl.int64) * s0 + (h % b2).to(tl.int64) * s1
    return base


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """``a @ b`` accumulated in fp32; fp32 operands at ``PREC`` (3-pass TF32 on the GPU)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision=PREC)
    else:
        return tl.dot(a, b)


@triton.jit
def _nearest(dist, idx, AXIS: tl.constexpr, EXACT: tl.constexpr):
    """Arg-min of fp32 ``dist`` along ``AXIS`` (ties -> lowest ``idx``, the centroid numbers
    broadcast like ``dist``). Not ``EXACT`` (16-bit inputs): one int32 min instead of a
    (value, index) pair, over the distance's order-preserving bits with the index in the low 8
    bits; that drops 2^-15 of relative resolution, far below the 16-bit rounding of the dot."""
    if EXACT:
        return tl.argmin(dist, AXIS).to(tl.int32)
    else:
        bits = dist.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return tl.min((key & -256) | idx, AXIS) & 255


@triton.jit
def _assign_kernel(x0, x1, s0, s1, sn, sd, g0, b2, book, cnorm, out, N, per_split,
                   D: tl.constexpr, C_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                   PREC: tl.constexpr):
    split = tl.program_id(0)
    g = tl.program_id(1)
    base = _set_base(g, x0, x1, s0, s1, g0, b2)
    g64 = g.to(tl.int64)
    d = tl.arange(0, D)
    if BLOCK_C == C_PAD:
        # The whole codebook stays in shared memory for every tile of this program.
        oc = tl.arange(0, C_PAD)
        ct = tl.load(book + (g64 * C_PAD + oc[:, None]) * D + d[None, :])
        cn = tl.load(cnorm + g64 * C_PAD + oc)
    lo = split * per_split
    hi = tl.minimum(N, lo + per_split)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nm = offs_n < hi
        xt = tl.load(base + offs_n.to(tl.int64)[:, None] * sn + d[None, :] * sd, mask=nm[:, None], other=0.0)
        if BLOCK_C == C_PAD:
            arg = _nearest(cn[None, :] - 2.0 * _mm(xt, tl.trans(ct), PREC), oc[None, :], 1, xt.dtype == tl.float32)
        else:
            best = tl.full([BLOCK_N], float("inf"), tl.float32)
            arg = tl.zeros([BLOCK_N], tl.int32)
            for c0 in tl.static_range(0, C_PAD, BLOCK_C):
                oc = c0 + tl.arange(0, BLOCK_C)
                ctb = tl.load(book + (g64 * C_PAD + oc[:, None]) * D + d[None, :])
                dist = tl.load(cnorm + g64 * C_PAD + oc)[None, :] - 2.0 * _mm(xt, tl.trans(ctb), PREC)
                bmin = tl.min(dist, 1)
                barg = tl.argmin(dist, 1).to(tl.int32) + c0
                better = bmin < best
                best = tl.where(better, bmin, best)
                arg = tl.where(better, barg, arg)
        tl.store(out + g64 * N + offs_n, arg.to(tl.uint8), mask=nm)


@triton.jit
def _load_tokens(base, offs_n, nm, sn, sd, D: tl.constexpr):
    """Rows ``offs_n`` of one set, ``[BLOCK_N, D]`` (zeros past ``nm``)."""
    d = tl.arange(0, D)
    return tl.load(base + offs_n.to(tl.int64)[:, None] * sn + d[None, :] * sd, mask=nm[:, None], other=0.0)


@triton.jit
def _add_onehot(acc, cnt, onehot, xt, PREC: tl.constexpr):
    """Add the tokens ``xt [N, D]`` picked by ``onehot [C, N]`` to the per-centroid sums and counts."""
    return acc + _mm(onehot.to(xt.dtype), xt, PREC), cnt + tl.sum(onehot.to(tl.float32), 1)


@triton.jit
def _store_partial(sums, counts, row, acc, cnt, D: tl.constexpr):
    """One program's partial sums ``[C, D]`` and counts ``[C]`` at rows ``row`` of the split buffers."""
    d = tl.arange(0, D)
    tl.store(sums + row[:, None] * D + d[None, :], acc)
    tl.store(counts + row, cnt)


@triton.jit
def _lloyd_kernel(x0, x1, s0, s1, sn, sd, g0, b2, book, cnorm, sums, counts, N, per_split,
                  D: tl.constexpr, C_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    split = tl.program_id(0)
    g = tl.program_id(1)
    base = _set_base(g, x0, x1, s0, s1, g0, b2)
    g64 = g.to(tl.int64)
    d = tl.arange(0, D)
    oc = tl.arange(0, C_PAD)
    ct = tl.load(book + (g64 * C_PAD + oc[:, None]) * D + d[None, :])
    cn = tl.load(cnorm + g64 * C_PAD + oc)
    acc = tl.zeros([C_PAD, D], tl.float32)
    cnt = tl.zeros([C_PAD], tl.float32)
    lo = split * per_split
    hi = tl.minimum(N, lo + per_split)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nm = offs_n < hi
        xt = _load_tokens(base, offs_n, nm, sn, sd, D)
        # Centroids as rows: the arg-min runs down the columns and the one-hot matrix is already
        # in the accumulator layout that the second product takes from registers.
        dist = cn[:, None] - 2.0 * _mm(ct, tl.trans(xt), PREC)
        arg = tl.where(nm, _nearest(dist, oc[:, None], 0, xt.dtype == tl.float32), -1)
        acc, cnt = _add_onehot(acc, cnt, oc[:, None] == arg[None, :], xt, PREC)
    _store_partial(sums, counts, (split.to(tl.int64) * tl.num_programs(1) + g64) * C_PAD + oc, acc, cnt, D)


@triton.jit
def _update_kernel(x0, x1, s0, s1, sn, sd, g0, b2, assign, sums, counts, N, per_split,
                   D: tl.constexpr, C_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                   PREC: tl.constexpr):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    base = _set_base(g, x0, x1, s0, s1, g0, b2)
    g64 = g.to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C, D], tl.float32)
    cnt = tl.zeros([BLOCK_C], tl.float32)
    lo = split * per_split
    hi = tl.minimum(N, lo + per_split)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nm = offs_n < hi
        a = tl.load(assign + g64 * N + offs_n, mask=nm, other=0).to(tl.int32)
        a = tl.where(nm, a, -1)
        xt = _load_tokens(base, offs_n, nm, sn, sd, D)
        acc, cnt = _add_onehot(acc, cnt, offs_c[:, None] == a[None, :], xt, PREC)
    _store_partial(sums, counts, (split.to(tl.int64) * tl.num_programs(2) + g64) * C_PAD + offs_c, acc, cnt, D)


@triton.jit
def _finish_kernel(sums, counts, prev, shifts, thresh, cents, book, cnorm, splits, rows, C, it, part_rows, parts,
                   D: tl.constexpr, C_PAD: tl.constexpr, BLOCK_R: tl.constexpr, TRACK: tl.constexpr):
    """New centroids from the programs' partial sums, added in split order: fp32 ``cents``
    ``[G, C, D]`` (empty clusters keep ``prev``), plus the codebook rounded to the input type
    (``book`` ``[G, C_PAD, D]``) and its squared norms (``cnorm``) for the next assignment.
    ``splits == 0`` only converts ``prev``. With ``TRACK`` (the early stop, `EarlyStop`): the sets
    of a part (``part_rows`` rows each) whose largest centroid move in an earlier iteration
    (``shifts[j, part]``, ``j < it``) was <= ``thresh[part]`` keep ``prev``, and this iteration's
    largest move per part goes to ``shifts[it, part]`` (atomic max of non-negative values: the
    same result in any order)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < rows
    g = (r // C).to(tl.int64)
    c = r % C
    d = tl.arange(0, D)
    prow = g * C_PAD + c
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    cnt = tl.zeros([BLOCK_R], tl.float32)
    for s in range(splits):
        q = s * (rows // C) * C_PAD + prow
        acc += tl.load(sums + q[:, None] * D + d[None, :], mask=rm[:, None], other=0.0)
        cnt += tl.load(counts + q, mask=rm, other=0.0)
    old = tl.load(prev + r.to(tl.int64)[:, None] * D + d[None, :], mask=rm[:, None], other=0.0)
    keep = cnt == 0
    if TRACK:
        part = r // part_rows
        limit = tl.load(thresh + part, mask=rm, other=0.0)
        for j in range(it):
            keep = keep | (tl.load(shifts + j * parts + part, mask=rm, other=float("inf")) <= limit)
    new = tl.where(keep[:, None], old, tl.math.div_rn(acc, tl.maximum(cnt, 1.0)[:, None]))
    tl.store(cents + r.to(tl.int64)[:, None] * D + d[None, :], new, mask=rm[:, None])
    q16 = new.to(book.dtype.element_ty)
    qf = q16.to(tl.float32)
    tl.store(book + prow[:, None] * D + d[None, :], q16, mask=rm[:, None])
    tl.store(cnorm + prow, tl.sum(qf * qf, 1), mask=rm)
    if TRACK:
        move = tl.where(rm, tl.sqrt(tl.sum((new - old) * (new - old), 1)), 0.0)
        first = tl.program_id(0) * BLOCK_R
        if first // part_rows == (tl.minimum(first + BLOCK_R, rows) - 1) // part_rows:
            tl.atomic_max(shifts + it * parts + first // part_rows, tl.max(move, 0))
        else:
            tl.atomic_max(shifts + it * parts + part, move, mask=rm)


@triton.jit
def _quantize_kernel(x, s_x0, s_x1, s_xn, s_xd, B2, cents, assign, codes, scales, zeros, flags, energy, N, C, G, limit,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                     MODE: tl.constexpr, STAGES: tl.constexpr, EXP: tl.constexpr, MAN: tl.constexpr,
                     BIAS: tl.constexpr, CHECK_FINITE: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < N
    d = tl.arange(0, D)
    r = tl.load(x + (g // B2) * s_x0 + (g % B2) * s_x1 + offs_n.to(tl.int64)[:, None] * s_xn + d[None, :] * s_xd,
                mask=nm[:, None], other=0.0).to(tl.float32)
    if CHECK_FINITE:
        # The check_finite policy, answered in the same read of x (no separate pass, no extra sync).
        nonfinite = tl.max(((r != r) | (tl.abs(r) == float("inf"))).to(tl.int32), 1)
    else:
        nonfinite = tl.zeros([BLOCK_N], tl.int32)
    x_energy = tl.sum(tl.sum(r * r, 1), 0)
    for s in tl.static_range(STAGES):
        a = tl.load(assign + (s * G + g) * N + offs_n, mask=nm, other=0).to(tl.int64)
        r -= load_centroids(cents + ((s * G + g) * C + a[:, None]) * D + d[None, :], nm[:, None], 1)
    NG: tl.constexpr = D // GROUP
    rg = tl.reshape(r, (BLOCK_N, NG, GROUP))
    unit = tl.full([], (1 - BIAS - MAN + 127) << 23, tl.int32).to(tl.float32, bitcast=True)
    if MODE == 2:
        levels: tl.constexpr = (1 << BITS) - 1
        lo = tl.min(rg, 2)
        hi = tl.max(rg, 2)
        zc = small_float_encode(lo, False, EXP, MAN, BIAS)
        z = small_float_decode(zc, EXP, MAN, BIAS)
        scale = tl.math.div_rn(hi - z, tl.full([], levels, tl.float32))
        big = tl.maximum(tl.abs(lo), tl.abs(hi))
        # Like the reference, non-finite values are the check_finite policy's business.
        bad = ((big > limit) & (big != float("inf"))) | ((scale > limit) & (scale != float("inf")))
    else:
        amax = tl.max(tl.abs(rg), 2)
        if MODE == 0:
            scale = tl.math.div_rn(amax, tl.full([], (1 << (BITS - 1)) - 1, tl.float32))
        else:
            scale = tl.math.div_rn(amax, tl.full([], (1 << (BITS - 1)) - 0.5, tl.float32))
        bad = (scale > limit) & (scale != float("inf"))
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
    # One flag byte and one (residual, input) energy pair per program: the encode's summary and
    # codebook fit are then a reduction over a few thousand values (`_close_kernel`).
    block = g * tl.num_programs(0) + pid_n
    any_bad = tl.max(tl.max(bad.to(tl.int32), 1), 0)
    tl.store(flags + block, (any_bad * FLAG_RANGE | tl.max(nonfinite, 0) * FLAG_NONFINITE).to(tl.int8))
    tl.store(energy + block * 2, tl.sum(tl.sum(r * r, 1), 0))
    tl.store(energy + block * 2 + 1, x_energy)


@triton.jit
def _close_kernel(flags, energy, fits, summary, per_part, parts, BLOCK: tl.constexpr):
    """One program: each part's codebook fit ``sum r^2 / sum x^2`` over its ``per_part`` blocks of
    `_quantize_kernel` partials, added in a fixed order, and the refusal summary ``[range,
    non-finite]`` over every block."""
    offs = tl.arange(0, BLOCK)
    bad = tl.zeros([BLOCK], tl.int32)
    for p in range(parts):
        res = tl.zeros([BLOCK], tl.float32)
        tot = tl.zeros([BLOCK], tl.float32)
        for b0 in range(p * per_part, (p + 1) * per_part, BLOCK):
            b = b0 + offs
            m = b < (p + 1) * per_part
            res += tl.load(energy + b * 2, mask=m, other=0.0)
            tot += tl.load(energy + b * 2 + 1, mask=m, other=0.0)
            bad = bad | tl.load(flags + b, mask=m, other=0).to(tl.int32)
        tiny = tl.full([], 1.1754943508222875e-38, tl.float32)
        tl.store(fits + p, tl.sum(res, 0) / tl.maximum(tl.sum(tot, 0), tiny))
    tl.store(summary, (tl.max(bad & FLAG_RANGE, 0) != 0).to(tl.int8))
    tl.store(summary + 1, (tl.max(bad & FLAG_NONFINITE, 0) != 0).to(tl.int8))



def _x_args(x: torch.Tensor) -> tuple:
    """``x`` ``[B1, B2, N, D]`` as (tensor, strides..., B2)."""
    return (x, *x.stride(), x.shape[1])


def check_sets(xs: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    """One or two inputs ``[B1, B2, N, D]`` that share one grid: same shape, strides, dtype and
    device. Returns (sets of all inputs, N, D)."""
    if not 1 <= len(xs) <= 2:
        raise ValueError(f"xs: expected one or two tensors, got {len(xs)}")
    x0 = xs[0]
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"xs[{i}]: expected a [B1, B2, N, D] tensor")
        if x.shape != x0.shape or x.stride() != x0.stride() or x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(f"xs[{i}]: shape, strides, dtype and device must equal xs[0]'s "
                             f"({list(x.shape)} {x.stride()} {x.dtype} {x.device} vs "
                             f"{list(x0.shape)} {x0.stride()} {x0.dtype} {x0.device})")
    b1, b2, n, d = x0.shape
    return len(xs) * b1 * b2, n, d


def _grid_args(xs: Sequence[torch.Tensor]) -> list:
    x0, x1 = xs[0], xs[-1]
    s0, s1, sn, sd = x0.stride()
    return [x0, x1, s0, s1, sn, sd, x0.shape[0] * x0.shape[1], x0.shape[1]]


def pad_centroids(c: int) -> int:
    """Codebook rows as the kernels hold them: a power of two, at least 16 (a tensor-core tile)."""
    return max(16, triton.next_power_of_2(c))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


@functools.lru_cache(maxsize=1024)
def choose_splits(n: int, block_n: int, sets: int, device: torch.device, per_sm: int = 1,
                  overhead_tiles: int = 8) -> int:
    """Token ranges per set for the persistent kernels: the count that minimises (waves of
    programs) x (tiles per program + a fixed cost for loading the codebook and writing the
    partial sums), so that e.g. 24 sets on 132 SMs run as 264 programs in 2 full waves instead of
    144 in 1.1. On the CPU (interpreter): 2 ranges, to exercise the fixed-order sum. Memoised: a
    seal asks it the same question every time, and the search costs ~0.5 ms of host time."""
    tiles = -(-n // block_n)
    sms = _sm_count(device)
    if not sms:
        return min(2, tiles)
    slots = sms * per_sm
    best, best_cost = 1, math.inf
    for s in range(1, min(tiles, 64) + 1):
        cost = -(-sets * s // slots) * (-(-tiles // s) + overhead_tiles)
        if cost < best_cost:
            best, best_cost = s, cost
    return best


def codebook_buffers(sets: int, c: int, d: int, dtype: torch.dtype, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment kernels' view of a codebook: centroids rounded to the input type ``[G, C_PAD,
    D]`` and their squared norms fp32 ``[G, C_PAD]``; padding rows are zero with norm +inf, so
    they are never the nearest."""
    c_pad = pad_centroids(c)
    if c_pad == c:
        return (torch.empty(sets, c_pad, d, dtype=dtype, device=device),
                torch.empty(sets, c_pad, dtype=torch.float32, device=device))
    return (torch.zeros(sets, c_pad, d, dtype=dtype, device=device),
            torch.full((sets, c_pad), float("inf"), dtype=torch.float32, device=device))


@dataclasses.dataclass(frozen=True)
class EarlyStop:
    """The k-means early stop of one encode, kept on the device: a part (one input's sets) whose
    centroids moved at most ``threshold[part]`` (fp32 ``[parts]``) in some iteration keeps them for
    the rest, which is what stopping would have returned. ``shifts`` fp32 ``[iterations, parts]``
    (zeros at the start) collects each iteration's largest move; ``iteration`` is the step's."""

    shifts: torch.Tensor
    threshold: torch.Tensor
    iteration: int


def finish(sums: Optional[torch.Tensor], counts: Optional[torch.Tensor], previous: torch.Tensor,
           book: torch.Tensor, cnorm: torch.Tensor, stop: Optional[EarlyStop] = None) -> torch.Tensor:
    """Centroids fp32 ``[G, C, D]`` from partial sums ``[splits, G, C_PAD, D]`` and counts (added in
    split order; empty clusters, and the parts ``stop`` has stopped, keep ``previous``), and
    ``book``/``cnorm`` refreshed in place. ``sums=None`` only rounds ``previous`` into them."""
    g, c, d = previous.shape
    prev = previous.float().contiguous()
    out = torch.empty_like(prev)
    splits = 0 if sums is None else sums.shape[0]
    block_r = 16 if prev.is_cuda else 32
    parts = 1 if stop is None else stop.shifts.shape[1]
    if g % parts:
        raise ValueError(f"stop: {parts} parts do not divide {g} sets")
    _finish_kernel[(triton.cdiv(g * c, block_r),)](
        sums if sums is not None else prev, counts if counts is not None else prev, prev,
        stop.shifts if stop is not None else prev, stop.threshold if stop is not None else prev,
        out, book, cnorm, splits, g * c, c, 0 if stop is None else stop.iteration, g // parts * c, parts,
        D=d, C_PAD=book.shape[1], BLOCK_R=block_r, TRACK=stop is not None, num_warps=4)
    return out


def assign_book(xs: Sequence[torch.Tensor], book: torch.Tensor, cnorm: torch.Tensor, block_n: int = 0,
                warps: int = 0, splits: int = 0) -> torch.Tensor:
    """Nearest codebook row of every token of the sets of ``xs`` (see `check_sets`): uint8 ``[G, N]``."""
    sets, n, d = check_sets(xs)
    x = xs[0]
    c_pad = book.shape[1]
    block_n = block_n or (64 if x.is_cuda else 32)
    resident = c_pad * d * book.element_size() <= RESIDENT_BOOK_BYTES
    splits = splits or choose_splits(n, block_n, sets, x.device, 1, 4)
    out = torch.empty(sets, n, dtype=torch.uint8, device=x.device)
    _assign_kernel[(splits, sets)](*_grid_args(xs), book, cnorm, out, n, triton.cdiv(triton.cdiv(n, splits), block_n) * block_n,
                                   D=d, C_PAD=c_pad, BLOCK_N=block_n, BLOCK_C=c_pad if resident else min(c_pad, 64),
                                   PREC=_precision(x), num_warps=(warps or 8) if x.is_cuda else 4,
                                   num_stages=3 if resident else 1)
    return out


def fused_step_supported(xs: Sequence[torch.Tensor], c: int) -> bool:
    """Whether `lloyd_step` can fuse assignment and update: the C x D sums fit the registers and
    the codebook fits shared memory next to the token tiles (16-bit inputs on the GPU)."""
    x = xs[0]
    c_pad, d = pad_centroids(c), x.shape[-1]
    return c_pad * d <= MAX_SUM_ELEMENTS and (c_pad * d * x.element_size() <= RESIDENT_BOOK_BYTES or not x.is_cuda)


def _partials(splits: int, sets: int, c_pad: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(splits, sets, c_pad, d, dtype=torch.float32, device=device),
            torch.empty(splits, sets, c_pad, dtype=torch.float32, device=device))


def lloyd_step(xs: Sequence[torch.Tensor], centroids: torch.Tensor, book: torch.Tensor, cnorm: torch.Tensor,
               stop: Optional[EarlyStop] = None, fused: Optional[bool] = None, block_n: int = 0,
               warps: int = 0, splits: int = 0) -> torch.Tensor:
    """One Lloyd iteration on the sets of ``xs`` from ``centroids`` fp32 ``[G, C, D]`` whose rounded
    copy is ``book``/``cnorm`` (refreshed in place to the result). Returns the new centroids.
    ``fused``: one pass (assignment + sums) when `fused_step_supported`, else assignment then
    update (two passes)."""
    sets, n, d = check_sets(xs)
    x = xs[0]
    c = centroids.shape[1]
    c_pad = book.shape[1]
    if fused is None:
        fused = fused_step_supported(xs, c)
    if fused:
        if not fused_step_supported(xs, c):
            raise ValueError(f"fused: a {c} x {d} codebook of {x.dtype} does not fit the fused Lloyd step")
        block_n = block_n or (64 if x.is_cuda else 32)
        splits = splits or choose_splits(n, block_n, sets, x.device)
        sums, counts = _partials(splits, sets, c_pad, d, x.device)
        _lloyd_kernel[(splits, sets)](*_grid_args(xs), book, cnorm, sums, counts, n,
                                      triton.cdiv(triton.cdiv(n, splits), block_n) * block_n,
                                      D=d, C_PAD=c_pad, BLOCK_N=block_n, PREC=_precision(x),
                                      num_warps=(warps or 8) if x.is_cuda else 4)
    else:
        sums, counts = _update_sums(xs, assign_book(xs, book, cnorm), c_pad, splits)
    return finish(sums, counts, centroids, book, cnorm, stop)


def _update_sums(xs: Sequence[torch.Tensor], assignments: torch.Tensor, c_pad: int, splits: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    sets, n, d = check_sets(xs)
    x = xs[0]
    per_program = MAX_SUM_ELEMENTS // (4 if x.dtype == torch.float32 else 2)
    block_c = max(16, min(c_pad, per_program // d))
    block_n = 64 if x.is_cuda else 32
    splits = splits or choose_splits(n, block_n, sets * (c_pad // block_c), x.device)
    sums, counts = _partials(splits, sets, c_pad, d, x.device)
    _update_kernel[(c_pad // block_c, splits, sets)](
        *_grid_args(xs), assignments, sums, counts, n, triton.cdiv(triton.cdiv(n, splits), block_n) * block_n,
        D=d, C_PAD=c_pad, BLOCK_N=block_n, BLOCK_C=block_c, PREC=_precision(x), num_warps=8 if x.is_cuda else 4,
        num_stages=2)
    return sums, counts


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per token: x ``[B1, B2, N, D]``, centroids ``[B1*B2, C, D]`` -> uint8 ``[B1*B2, N]``.
    Distances use the centroids rounded to x's type (exact for fp32 inputs)."""
    g, c, d = centroids.shape
    book, cnorm = codebook_buffers(g, c, d, x.dtype, x.device)
    finish(None, None, centroids, book, cnorm)
    return assign_book([x], book, cnorm)


def update(x: torch.Tensor, assignments: torch.Tensor, previous: torch.Tensor, splits: int = 0) -> torch.Tensor:
    """Cluster means fp32 ``[G, C, D]`` of x ``[B1, B2, N, D]`` for uint8 ``assignments`` ``[G, N]``
    (empty clusters keep ``previous``), deterministic."""
    g, c, d = previous.shape
    book, cnorm = codebook_buffers(g, c, d, x.dtype, x.device)
    sums, counts = _update_sums([x], assignments.contiguous(), book.shape[1], splits)
    return finish(sums, counts, previous, book, cnorm)


def quantize_blocks(n: int, block_n: int = 32) -> int:
    """Programs of `quantize` per set for ``n`` tokens: the length of its per-block outputs."""
    return triton.cdiv(n, block_n)


def quantize(x: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor, bits: int, group_size: int,
             code_mode: str, scale_dtype: torch.dtype, block_n: int = 32, warps: int = 4,
             flags: Optional[torch.Tensor] = None, energy: Optional[torch.Tensor] = None, check_finite: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual group quantization of x ``[B1, B2, N, D]`` after subtracting ``centroids`` ``[S, G, C, D]``
    picked by ``assignments`` ``[S, G, N]``. Returns codes uint8 ``[G, N, D*bits/8]``, scales
    ``[G, N, D/G]``, zeros (same, or ``[G, N, 0]``), and per block of ``block_n`` tokens
    (``NB = quantize_blocks(N, block_n)``): flags int8 ``[G, NB]`` (`FLAG_RANGE`: a scale or zero
    point exceeds the scale dtype; `FLAG_NONFINITE`: a NaN/Inf input, looked for only with
    ``check_finite``) and energies fp32 ``[G, NB, 2]`` (sum of squares of the residual after the
    centroids, and of x), written into ``flags`` and ``energy`` when given (see `close`)."""
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
    nb = quantize_blocks(n, block_n)
    if flags is None:
        flags = torch.empty(g, nb, dtype=torch.int8, device=x.device)
    if energy is None:
        energy = torch.empty(g, nb, 2, dtype=torch.float32, device=x.device)
    if tuple(flags.shape) != (g, nb) or tuple(energy.shape) != (g, nb, 2):
        raise ValueError(f"flags, energy: expected [{g}, {nb}] and [{g}, {nb}, 2], got {list(flags.shape)} "
                         f"and {list(energy.shape)}")
    cents = centroids.contiguous() if s else codes
    if cents.dtype == torch.float8_e4m3fn:
        cents = cents.view(torch.uint8)
    assign_ = assignments.contiguous() if s else codes
    _quantize_kernel[(nb, g)](
        *_x_args(x), cents, assign_, codes, scales, zeros if asym else scales, flags, energy, n, c, g,
        torch.finfo(scale_dtype).max / 1.25,
        D=d, BLOCK_N=block_n, BITS=bits, GROUP=group_size, MODE=MODE_IDS[code_mode], STAGES=s,
        EXP=exp, MAN=man, BIAS=bias, CHECK_FINITE=check_finite, num_warps=warps)
    return codes, scales.view(scale_dtype), zeros.view(scale_dtype), flags, energy


def close(flags: torch.Tensor, energy: torch.Tensor, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The end of an encode, one launch: from `quantize`'s per-block ``flags`` ``[G, NB]`` and
    ``energy`` ``[G, NB, 2]`` of ``parts`` inputs (each ``G / parts`` consecutive sets), each part's
    codebook fit ``||x - sum_s c_s(x)||^2 / ||x||^2`` (fp32 ``[parts]``, like
    `quant.segment.residual_energy` up to the order of summation) and the refusal summary int8
    ``[2]`` (``[range, non-finite]``, nonzero where any block has the flag)."""
    if flags.dim() != 2 or tuple(energy.shape) != (*flags.shape, 2) or flags.shape[0] % parts:
        raise ValueError(f"flags, energy: expected [G, NB] and [G, NB, 2] with G divisible by parts={parts}, "
                         f"got {list(flags.shape)} and {list(energy.shape)}")
    fits = torch.empty(parts, dtype=torch.float32, device=flags.device)
    summary = torch.empty(2, dtype=torch.int8, device=flags.device)
    _close_kernel[(1,)](flags, energy, fits, summary, flags.numel() // parts, parts, BLOCK=1024,
                        num_warps=4)
    return fits, summary
