"""Triton kernel of `gather.gather_pair`: one launch fills a K and a V workspace from packed
tokens and dense rows, driven by a run table built once per cache state."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from ..quant.packed import PackedStore
from ._common import kernel_store_args, scale_format
from ._jit import MODE_IDS, decode_tile
from .launch import Prebound


@triton.jit
def _put(ptrs, values, mask, STREAM: tl.constexpr):
    """Store a workspace tile; with ``STREAM`` as streaming stores (``.cs``: written once, read
    by the SDPA that follows, so they need not displace the codebooks other programs read from L2)."""
    if STREAM:
        tl.store(ptrs, values, mask=mask, cache_modifier=".cs")
    else:
        tl.store(ptrs, values, mask=mask)


@triton.jit
def _gather_block(
    codes, s_cb, s_ch, s_cn, s_cd,
    scales, s_sb, s_sh, s_sn, s_sg,
    zeros, s_zb, s_zh, s_zn, s_zg,
    assign, s_as, s_ab, s_ah, s_an,
    cents, s_xk, s_xs, s_xb, s_xh, s_xc, s_xd,
    seg_ids,
    tail, s_tb, s_th, s_tn, s_td,
    out, s_ob, s_oh, s_on, s_od,
    side_table, runs, H,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    MODE: tl.constexpr, STAGES: tl.constexpr, SCALE_FP8: tl.constexpr, GROUPED: tl.constexpr,
    STREAM: tl.constexpr, PACKED_LOADS: tl.constexpr, BY_GROUP: tl.constexpr,
):
    """Block ``program_id(0)`` of one side's runs ``(kind, src, dst, n, first block)``, for one
    (batch, head): up to ``BLOCK_N`` tokens decoded from store positions (kind 0) or copied from
    dense rows (kind 1) into rows of ``out``. ``BY_GROUP``: decode one scale group of channels
    at a time (``[BLOCK_N, GROUP]`` tiles, each with one scale per token: no per-channel select of
    the group's scale, and half the live registers for two groups)."""
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    # The run holding this block: the last one whose first block is <= it (runs are few).
    run = 0
    for r in range(1, runs):
        run = tl.where(tl.load(side_table + r * 5 + 4) <= blk, r, run)
    entry = side_table + run * 5
    local = blk - tl.load(entry + 4)
    kind = tl.load(entry)
    src = tl.load(entry + 1).to(tl.int64) + local * BLOCK_N
    dst = tl.load(entry + 2).to(tl.int64) + local * BLOCK_N
    n = tl.load(entry + 3) - local * BLOCK_N
    offs = tl.arange(0, BLOCK_N)
    mask = offs < n
    offs_d = tl.arange(0, D)
    ptrs = out + b * s_ob + h * s_oh + (dst + offs)[:, None] * s_on + offs_d[None, :] * s_od
    if kind == 0 and BY_GROUP:
        PER: tl.constexpr = 8 // BITS
        # Every pointer moved to the group's first channel: the tile decodes channels [0, GROUP).
        for g in tl.static_range(D // GROUP):
            decoded = decode_tile(
                codes + b * s_cb + h * s_ch + (g * GROUP // PER) * s_cd, s_cn, s_cd,
                scales + b * s_sb + h * s_sh + g * s_sg, s_sn, s_sg,
                zeros + b * s_zb + h * s_zh + g * s_zg, s_zn, s_zg,
                assign + b * s_ab + h * s_ah, s_as, s_an,
                cents + b * s_xb + h * s_xh + g * GROUP * s_xd, s_xk, s_xs, s_xc, s_xd,
                seg_ids, src + offs, mask, tl.arange(0, GROUP),
                BITS, GROUP, MODE, STAGES, SCALE_FP8, False, PACKED_LOADS,
            )
            offs_g = g * GROUP + tl.arange(0, GROUP)
            gptrs = out + b * s_ob + h * s_oh + (dst + offs)[:, None] * s_on + offs_g[None, :] * s_od
            _put(gptrs, decoded.to(out.dtype.element_ty), mask[:, None], STREAM)
    elif kind == 0:
        decoded = decode_tile(
            codes + b * s_cb + h * s_ch, s_cn, s_cd,
            scales + b * s_sb + h * s_sh, s_sn, s_sg,
            zeros + b * s_zb + h * s_zh, s_zn, s_zg,
            assign + b * s_ab + h * s_ah, s_as, s_an,
            cents + b * s_xb + h * s_xh, s_xk, s_xs, s_xc, s_xd,
            seg_ids, src + offs, mask, offs_d,
            BITS, GROUP, MODE, STAGES, SCALE_FP8, GROUPED, PACKED_LOADS,
        )
        _put(ptrs, decoded.to(out.dtype.element_ty), mask[:, None], STREAM)
    else:
        rows = tail + b * s_tb + h * s_th + (src + offs)[:, None] * s_tn + offs_d[None, :] * s_td
        copied = tl.load(rows, mask=mask[:, None], other=0.0)
        _put(ptrs, copied.to(out.dtype.element_ty), mask[:, None], STREAM)


@triton.jit
def _gather_pair_kernel(
    k_codes, k_s_cb, k_s_ch, k_s_cn, k_s_cd,
    k_scales, k_s_sb, k_s_sh, k_s_sn, k_s_sg,
    k_zeros, k_s_zb, k_s_zh, k_s_zn, k_s_zg,
    k_assign, k_s_as, k_s_ab, k_s_ah, k_s_an,
    k_cents, k_s_xk, k_s_xs, k_s_xb, k_s_xh, k_s_xc, k_s_xd,
    k_seg_ids,
    k_tail, k_s_tb, k_s_th, k_s_tn, k_s_td,
    v_codes, v_s_cb, v_s_ch, v_s_cn, v_s_cd,
    v_scales, v_s_sb, v_s_sh, v_s_sn, v_s_sg,
    v_zeros, v_s_zb, v_s_zh, v_s_zn, v_s_zg,
    v_assign, v_s_as, v_s_ab, v_s_ah, v_s_an,
    v_cents, v_s_xk, v_s_xs, v_s_xb, v_s_xh, v_s_xc, v_s_xd,
    v_seg_ids,
    v_tail, v_s_tb, v_s_th, v_s_tn, v_s_td,
    k_out, k_s_ob, k_s_oh, k_s_on, k_s_od,
    v_out, v_s_ob, v_s_oh, v_s_on, v_s_od,
    table, runs, H,
    D: tl.constexpr, BLOCK_N: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    GROUP: tl.constexpr, K_MODE: tl.constexpr, V_MODE: tl.constexpr, STAGES: tl.constexpr,
    SCALE_FP8: tl.constexpr, GROUPED: tl.constexpr, STREAM: tl.constexpr, PACKED_LOADS: tl.constexpr,
    BY_GROUP: tl.constexpr,
):
    # Grid: (blocks, batch * heads, 2); axis 2 picks K or V, whose runs may differ.
    side = tl.program_id(2)
    side_table = table + side * runs * 5
    if side == 0:
        _gather_block(k_codes, k_s_cb, k_s_ch, k_s_cn, k_s_cd, k_scales, k_s_sb, k_s_sh, k_s_sn, k_s_sg,
                      k_zeros, k_s_zb, k_s_zh, k_s_zn, k_s_zg, k_assign, k_s_as, k_s_ab, k_s_ah, k_s_an,
                      k_cents, k_s_xk, k_s_xs, k_s_xb, k_s_xh, k_s_xc, k_s_xd, k_seg_ids,
                      k_tail, k_s_tb, k_s_th, k_s_tn, k_s_td, k_out, k_s_ob, k_s_oh, k_s_on, k_s_od,
                      side_table, runs, H, D, BLOCK_N, K_BITS, GROUP, K_MODE, STAGES, SCALE_FP8, GROUPED, STREAM,
                      PACKED_LOADS, BY_GROUP)
    else:
        _gather_block(v_codes, v_s_cb, v_s_ch, v_s_cn, v_s_cd, v_scales, v_s_sb, v_s_sh, v_s_sn, v_s_sg,
                      v_zeros, v_s_zb, v_s_zh, v_s_zn, v_s_zg, v_assign, v_s_as, v_s_ab, v_s_ah, v_s_an,
                      v_cents, v_s_xk, v_s_xs, v_s_xb, v_s_xh, v_s_xc, v_s_xd, v_seg_ids,
                      v_tail, v_s_tb, v_s_th, v_s_tn, v_s_td, v_out, v_s_ob, v_s_oh, v_s_on, v_s_od,
                      side_table, runs, H, D, BLOCK_N, V_BITS, GROUP, V_MODE, STAGES, SCALE_FP8, GROUPED, STREAM,
                      PACKED_LOADS, BY_GROUP)


class GatherLaunch:
    """The launch of `_gather_pair_kernel` for one K/V pair of stores and their dense rows, with
    every store argument (pointers, strides, meta-parameters) computed once: a read that reuses
    it passes only the outputs and the run table (its host cost is Triton's launch alone)."""

    def __init__(self, k_store: PackedStore, v_store: PackedStore, k_tail: torch.Tensor, v_tail: torch.Tensor,
                 block_tokens: int, num_warps: int = 4, grouped: bool = False, stream: bool = False,
                 scale_decode: Optional[int] = None, packed_loads: bool = True, by_group: bool = False) -> None:
        """``scale_decode`` overrides the ``SCALE_FP8`` meta-parameter `scale_format` picks (the
        integer FP8 decode on a GPU that has the conversion, to compare the two); ``packed_loads``
        False loads a code byte and a scale per channel (`_jit.decode_tile`), to compare;
        ``by_group`` decodes one scale group of channels at a time (`_gather_block`)."""
        self.heads = k_store.codes.shape[1]
        self.rows = k_store.codes.shape[0] * self.heads
        self.args = [*kernel_store_args(k_store), k_tail, *k_tail.stride(),
                     *kernel_store_args(v_store), v_tail, *v_tail.stride()]
        self.meta = dict(D=k_store.head_dim, BLOCK_N=block_tokens, K_BITS=k_store.bits, V_BITS=v_store.bits,
                         GROUP=k_store.group_size, K_MODE=MODE_IDS[k_store.code_mode],
                         V_MODE=MODE_IDS[v_store.code_mode], STAGES=k_store.stages,
                         SCALE_FP8=scale_format(k_store.scales) if scale_decode is None else scale_decode,
                         GROUPED=grouped, STREAM=stream, PACKED_LOADS=packed_loads,
                         BY_GROUP=by_group and k_store.group_size < k_store.head_dim, num_warps=num_warps)

    def __call__(self, table: torch.Tensor, blocks: int, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """Fill ``k_out``/``v_out`` from ``table`` ``[2, R, 5]`` int32 with ``blocks`` programs per
        (batch, head) and side."""
        if blocks == 0:
            return
        _gather_pair_kernel[(blocks, self.rows, 2)](*self._args(table, k_out, v_out), **self.meta)

    def prebind(self, table: torch.Tensor, blocks: int, k_out: torch.Tensor, v_out: torch.Tensor) -> Callable[[], None]:
        """`__call__` with these arguments as a launch that only launches (`launch.Prebound`)."""
        if blocks == 0:
            return lambda: None
        return Prebound(_gather_pair_kernel, (blocks, self.rows, 2), self._args(table, k_out, v_out), self.meta)

    def _args(self, table: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor) -> list:
        return [*self.args, k_out, *k_out.stride(), v_out, *v_out.stride(), table, table.shape[1], self.heads]
