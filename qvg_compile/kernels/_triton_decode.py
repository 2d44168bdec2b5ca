"""Triton decode of a token range of one `PackedStore`, or of a K and a V store in one launch, into dense (strided) BF16/FP16/FP32 tensors."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.packed import PackedStore
from ._common import kernel_store_args, scale_format
from ._jit import MODE_IDS, decode_tile

BLOCK_TOKENS = 64
# Decode one scale per group and broadcast it (True), or gather a scale per element (False): the
# gather measured faster on H100 (0.154 vs 0.183 ms, K+V [1,12,37440,128]; the reshape costs more).
GROUPED = False


@triton.jit
def _decode_block(
    codes, s_cb, s_ch, s_cn, s_cd,
    scales, s_sb, s_sh, s_sn, s_sg,
    zeros, s_zb, s_zh, s_zn, s_zg,
    assign, s_as, s_ab, s_ah, s_an,
    cents, s_xk, s_xs, s_xb, s_xh, s_xc, s_xd,
    seg_ids,
    out, s_ob, s_oh, s_on, s_od,
    start, n, H,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    MODE: tl.constexpr, STAGES: tl.constexpr, SCALE_FP8: tl.constexpr, GROUPED: tl.constexpr,
):
    """This program's ``BLOCK_N`` tokens of one (batch, head) of the range, decoded into ``out``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < n
    offs_d = tl.arange(0, D)
    x = decode_tile(
        codes + b * s_cb + h * s_ch, s_cn, s_cd,
        scales + b * s_sb + h * s_sh, s_sn, s_sg,
        zeros + b * s_zb + h * s_zh, s_zn, s_zg,
        assign + b * s_ab + h * s_ah, s_as, s_an,
        cents + b * s_xb + h * s_xh, s_xk, s_xs, s_xc, s_xd,
        seg_ids, start + offs, mask, offs_d,
        BITS, GROUP, MODE, STAGES, SCALE_FP8, GROUPED,
    )
    ptrs = out + b * s_ob + h * s_oh + offs[:, None].to(tl.int64) * s_on + offs_d[None, :] * s_od
    tl.store(ptrs, x.to(out.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _decode_kernel(
    codes, s_cb, s_ch, s_cn, s_cd,
    scales, s_sb, s_sh, s_sn, s_sg,
    zeros, s_zb, s_zh, s_zn, s_zg,
    assign, s_as, s_ab, s_ah, s_an,
    cents, s_xk, s_xs, s_xb, s_xh, s_xc, s_xd,
    seg_ids,
    out, s_ob, s_oh, s_on, s_od,
    start, n, H,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    MODE: tl.constexpr, STAGES: tl.constexpr, SCALE_FP8: tl.constexpr, GROUPED: tl.constexpr,
):
    # Not the pair kernel with one program on axis 2: its doubled argument list makes each
    # launch slower, which shows at ~0.07 ms of work (benchmarks/RESULTS.md).
    _decode_block(codes, s_cb, s_ch, s_cn, s_cd, scales, s_sb, s_sh, s_sn, s_sg, zeros, s_zb, s_zh, s_zn, s_zg,
                  assign, s_as, s_ab, s_ah, s_an, cents, s_xk, s_xs, s_xb, s_xh, s_xc, s_xd, seg_ids,
                  out, s_ob, s_oh, s_on, s_od, start, n, H,
                  D, BLOCK_N, BITS, GROUP, MODE, STAGES, SCALE_FP8, GROUPED)


@triton.jit
def _decode_pair_kernel(
    k_codes, k_s_cb, k_s_ch, k_s_cn, k_s_cd,
    k_scales, k_s_sb, k_s_sh, k_s_sn, k_s_sg,
    k_zeros, k_s_zb, k_s_zh, k_s_zn, k_s_zg,
    k_assign, k_s_as, k_s_ab, k_s_ah, k_s_an,
    k_cents, k_s_xk, k_s_xs, k_s_xb, k_s_xh, k_s_xc, k_s_xd,
    k_seg_ids,
    k_out, k_s_ob, k_s_oh, k_s_on, k_s_od,
    v_codes, v_s_cb, v_s_ch, v_s_cn, v_s_cd,
    v_scales, v_s_sb, v_s_sh, v_s_sn, v_s_sg,
    v_zeros, v_s_zb, v_s_zh, v_s_zn, v_s_zg,
    v_assign, v_s_as, v_s_ab, v_s_ah, v_s_an,
    v_cents, v_s_xk, v_s_xs, v_s_xb, v_s_xh, v_s_xc, v_s_xd,
    v_seg_ids,
    v_out, v_s_ob, v_s_oh, v_s_on, v_s_od,
    start, n, H,
    D: tl.constexpr, BLOCK_N: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    GROUP: tl.constexpr, K_MODE: tl.constexpr, V_MODE: tl.constexpr, STAGES: tl.constexpr,
    SCALE_FP8: tl.constexpr, GROUPED: tl.constexpr,
):
    # Grid axis 2 picks the store: one launch decodes a K block and its V block.
    if tl.program_id(2) == 0:
        _decode_block(k_codes, k_s_cb, k_s_ch, k_s_cn, k_s_cd, k_scales, k_s_sb, k_s_sh, k_s_sn, k_s_sg,
                      k_zeros, k_s_zb, k_s_zh, k_s_zn, k_s_zg, k_assign, k_s_as, k_s_ab, k_s_ah, k_s_an,
                      k_cents, k_s_xk, k_s_xs, k_s_xb, k_s_xh, k_s_xc, k_s_xd, k_seg_ids,
                      k_out, k_s_ob, k_s_oh, k_s_on, k_s_od, start, n, H,
                      D, BLOCK_N, K_BITS, GROUP, K_MODE, STAGES, SCALE_FP8, GROUPED)
    else:
        _decode_block(v_codes, v_s_cb, v_s_ch, v_s_cn, v_s_cd, v_scales, v_s_sb, v_s_sh, v_s_sn, v_s_sg,
                      v_zeros, v_s_zb, v_s_zh, v_s_zn, v_s_zg, v_assign, v_s_as, v_s_ab, v_s_ah, v_s_an,
                      v_cents, v_s_xk, v_s_xs, v_s_xb, v_s_xh, v_s_xc, v_s_xd, v_seg_ids,
                      v_out, v_s_ob, v_s_oh, v_s_on, v_s_od, start, n, H,
                      D, BLOCK_N, V_BITS, GROUP, V_MODE, STAGES, SCALE_FP8, GROUPED)


def decode_into(store: PackedStore, start: int, end: int, out: torch.Tensor, grouped: bool = GROUPED) -> torch.Tensor:
    """Decode tokens ``[start, end)`` of ``store`` into ``out`` ``[B, H, end - start, D]`` (any strides)."""
    b, h, _, d = store.codes.shape[0], store.codes.shape[1], store.capacity, store.head_dim
    n = end - start
    if n == 0 or out.numel() == 0:
        return out
    grid = (triton.cdiv(n, BLOCK_TOKENS), b * h)
    _decode_kernel[grid](
        *kernel_store_args(store), out, *out.stride(), start, n, h,
        D=d, BLOCK_N=BLOCK_TOKENS, BITS=store.bits, GROUP=store.group_size,
        MODE=MODE_IDS[store.code_mode], STAGES=store.stages,
        SCALE_FP8=scale_format(store.scales), GROUPED=grouped,
        num_warps=4,
    )
    return out


def pairable(k_store: PackedStore, v_store: PackedStore) -> bool:
    """Whether `decode_pair_into` takes these stores: same layout and scale format (bits and code
    modes may differ)."""
    return (k_store.codes.shape[:2] == v_store.codes.shape[:2] and k_store.head_dim == v_store.head_dim
            and k_store.group_size == v_store.group_size
            and k_store.stages == v_store.stages and k_store.scales.dtype == v_store.scales.dtype)


def decode_pair_into(k_store: PackedStore, v_store: PackedStore, start: int, end: int,
                     k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """`decode_into` of tokens ``[start, end)`` of both stores in one launch (`pairable` stores;
    outputs ``[B, H, end - start, D]``, any strides). Half the launches of two calls: the
    streamed attention decodes a K and a V block per step, and its launches are host-bound."""
    b, h, d = k_store.codes.shape[0], k_store.codes.shape[1], k_store.head_dim
    n = end - start
    if n == 0 or k_out.numel() == 0:
        return
    grid = (triton.cdiv(n, BLOCK_TOKENS), b * h, 2)
    _decode_pair_kernel[grid](
        *kernel_store_args(k_store), k_out, *k_out.stride(),
        *kernel_store_args(v_store), v_out, *v_out.stride(), start, n, h,
        D=d, BLOCK_N=BLOCK_TOKENS, K_BITS=k_store.bits, V_BITS=v_store.bits, GROUP=k_store.group_size,
        K_MODE=MODE_IDS[k_store.code_mode], V_MODE=MODE_IDS[v_store.code_mode], STAGES=k_store.stages,
        SCALE_FP8=scale_format(k_store.scales), GROUPED=GROUPED,
        num_warps=4,
    )
