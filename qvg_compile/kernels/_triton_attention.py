"""Triton kernels of the attention read: fused dequantize-in-attention, and the LSE merge of the
streamed path.

`attend_fused`: one program per (block of queries, batch x query head). It walks the sealed
ranges in tiles of ``BLOCK_N`` tokens, decodes each K and V tile from its packed codes, scales
and centroids straight into registers (`_jit.decode_tile`), and folds it into an online softmax
(flash-attention style); then it walks the dense tail with its optional mask. No dense copy of
the history is ever written.

`merge_into`: ``(out, lse) <- merge((out, lse), (o_i, lse_i))`` in place, for partial results
of disjoint key sets (the streamed path).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..quant.packed import PackedStore
from ._common import kernel_store_args, scale_format
from ._jit import MODE_IDS, decode_tile

LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, grouped scales]) by head dim.
# Software pipelining of the gathered tile loads (num_stages 2) measured 2.3x slower than none at d=128.
FUSED_CONFIGS = {16: (64, 64, 4, 1), 32: (64, 64, 4, 1), 64: (128, 32, 4, 1), 128: (128, 32, 4, 1),
                 256: (64, 32, 4, 1)}


@triton.jit
def _online_step(s, v, m_i, l_i, acc):
    """One flash-attention update with scores ``s`` (log2 domain) and values ``v``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing kept yet stay at -inf: shift by 0 instead of producing NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attn_kernel(
    q, s_qb, s_qh, s_qm, s_qd,
    o, s_ob, s_oh, s_om, s_od,
    lse,
    kc, s_kcb, s_kch, s_kcn, s_kcd,
    ks, s_ksb, s_ksh, s_ksn, s_ksg,
    kz, s_kzb, s_kzh, s_kzn, s_kzg,
    ka, s_kas, s_kab, s_kah, s_kan,
    kx, s_kxk, s_kxs, s_kxb, s_kxh, s_kxc, s_kxd,
    kseg,
    vc, s_vcb, s_vch, s_vcn, s_vcd,
    vs, s_vsb, s_vsh, s_vsn, s_vsg,
    vz, s_vzb, s_vzh, s_vzn, s_vzg,
    va, s_vas, s_vab, s_vah, s_van,
    vx, s_vxk, s_vxs, s_vxb, s_vxh, s_vxc, s_vxd,
    vseg,
    ranges, num_ranges,
    tk, s_tkb, s_tkh, s_tkn, s_tkd,
    tv, s_tvb, s_tvh, s_tvn, s_tvd,
    T,
    mask, s_mb, s_mh, s_mm, s_mt,
    qk_scale, M, HQ, GROUPS,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, GROUP: tl.constexpr, K_MODE: tl.constexpr, V_MODE: tl.constexpr,
    K_STAGES: tl.constexpr, V_STAGES: tl.constexpr, SCALE_FP8: tl.constexpr, MASK_KIND: tl.constexpr,
    GROUPED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_d = tl.arange(0, D)
    qt = tl.load(q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                 mask=m_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    kc += b * s_kcb + hk * s_kch
    ks += b * s_ksb + hk * s_ksh
    kz += b * s_kzb + hk * s_kzh
    ka += b * s_kab + hk * s_kah
    kx += b * s_kxb + hk * s_kxh
    vc += b * s_vcb + hk * s_vch
    vs += b * s_vsb + hk * s_vsh
    vz += b * s_vzb + hk * s_vzh
    va += b * s_vab + hk * s_vah
    vx += b * s_vxb + hk * s_vxh
    for r in range(num_ranges):
        start = tl.load(ranges + 2 * r)
        end = tl.load(ranges + 2 * r + 1)
        for lo in range(start, end, BLOCK_N):
            offs_n = lo + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            k = decode_tile(kc, s_kcn, s_kcd, ks, s_ksn, s_ksg, kz, s_kzn, s_kzg, ka, s_kas, s_kan,
                            kx, s_kxk, s_kxs, s_kxc, s_kxd, kseg, offs_n, n_mask, offs_d,
                            K_BITS, GROUP, K_MODE, K_STAGES, SCALE_FP8, GROUPED)
            s = tl.dot(qt, tl.trans(k.to(qt.dtype))) * qk_scale
            s = tl.where(n_mask[None, :], s, float("-inf"))
            v = decode_tile(vc, s_vcn, s_vcd, vs, s_vsn, s_vsg, vz, s_vzn, s_vzg, va, s_vas, s_van,
                            vx, s_vxk, s_vxs, s_vxc, s_vxd, vseg, offs_n, n_mask, offs_d,
                            V_BITS, GROUP, V_MODE, V_STAGES, SCALE_FP8, GROUPED)
            m_i, l_i, acc = _online_step(s, v.to(qt.dtype), m_i, l_i, acc)

    tk += b * s_tkb + hk * s_tkh
    tv += b * s_tvb + hk * s_tvh
    mask += b * s_mb + h * s_mh
    for lo in range(0, T, BLOCK_N):
        offs_n = lo + tl.arange(0, BLOCK_N)
        n_mask = offs_n < T
        k = tl.load(tk + offs_n[:, None] * s_tkn + offs_d[None, :] * s_tkd, mask=n_mask[:, None], other=0.0)
        s = tl.dot(qt, tl.trans(k.to(qt.dtype))) * qk_scale
        both = m_mask[:, None] & n_mask[None, :]
        mp = mask + offs_m[:, None] * s_mm + offs_n[None, :] * s_mt
        if MASK_KIND == 1:
            s = tl.where(tl.load(mp, mask=both, other=1) != 0, s, float("-inf"))
        elif MASK_KIND == 2:
            s += tl.load(mp, mask=both, other=0.0).to(tl.float32) * 1.4426950408889634
        s = tl.where(n_mask[None, :], s, float("-inf"))
        v = tl.load(tv + offs_n[:, None] * s_tvn + offs_d[None, :] * s_tvd, mask=n_mask[:, None], other=0.0)
        m_i, l_i, acc = _online_step(s, v.to(qt.dtype), m_i, l_i, acc)

    kept = l_i > 0
    out = acc / tl.where(kept, l_i, 1.0)[:, None]
    tl.store(o + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
             out.to(o.dtype.element_ty), mask=m_mask[:, None])
    row_lse = tl.where(kept, (m_i + tl.log2(tl.where(kept, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse + pid_bh * M + offs_m, row_lse, mask=m_mask)


def attend_fused(q: torch.Tensor, k_store: PackedStore, v_store: PackedStore, ranges: list[tuple[int, int]],
                 tail_k: torch.Tensor, tail_v: torch.Tensor, tail_mask: Optional[torch.Tensor], scale: float,
                 config: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention (inputs validated by the caller): out ``[B, Hq, M, D]`` contiguous in q's
    dtype and fp32 lse ``[B, Hq, M]``."""
    b, hq, m, d = q.shape
    hkv = k_store.codes.shape[1]
    block_m, block_n, warps, stages, *rest = config or FUSED_CONFIGS[d]
    grouped = bool(rest[0]) if rest else False
    out = torch.empty(b, hq, m, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, m, dtype=torch.float32, device=q.device)
    flat = [int(x) for r in ranges for x in r if r[1] > r[0]]
    rng = torch.tensor(flat or [0, 0], dtype=torch.int32).to(q.device, non_blocking=True)
    t = tail_k.shape[-2]
    if tail_mask is None:
        mask, mask_kind, mstrides = q, 0, (0, 0, 0, 0)
    else:
        mask = tail_mask.expand(b, hq, m, t)
        mask_kind = 1 if mask.dtype == torch.bool else 2
        mask = mask.view(torch.uint8) if mask_kind == 1 else mask
        mstrides = mask.stride()
    grid = (triton.cdiv(m, block_m), b * hq)
    _attn_kernel[grid](
        q, *q.stride(), out, *out.stride(), lse,
        *kernel_store_args(k_store), *kernel_store_args(v_store),
        rng, len(flat) // 2,
        tail_k, *tail_k.stride(), tail_v, *tail_v.stride(), t,
        mask, *mstrides,
        scale * LOG2E, m, hq, hq // hkv,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, K_BITS=k_store.bits, V_BITS=v_store.bits,
        GROUP=k_store.group_size, K_MODE=MODE_IDS[k_store.code_mode], V_MODE=MODE_IDS[v_store.code_mode],
        K_STAGES=k_store.stages,
        V_STAGES=v_store.stages, SCALE_FP8=scale_format(k_store.scales), MASK_KIND=mask_kind,
        GROUPED=grouped, num_warps=warps, num_stages=stages,
    )
    return out, lse


@triton.jit
def _merge_kernel(o, lse, oi, s_ib, s_ih, s_im, s_id, li, s_lb, s_lh, s_lm, rows, H, M,
                  D: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    b = r // (H * M)
    h = (r // M) % H
    mm = r % M
    d = tl.arange(0, D)
    l_old = tl.load(lse + r, mask=rmask, other=float("-inf"))
    l_new = tl.load(li + b * s_lb + h * s_lh + mm * s_lm, mask=rmask, other=float("-inf"))
    top = tl.maximum(l_old, l_new)
    top = tl.where(top == float("-inf"), 0.0, top)
    w_old = tl.exp(l_old - top)
    w_new = tl.exp(l_new - top)
    tot = w_old + w_new
    kept = tot > 0
    tl.store(lse + r, tl.where(kept, top + tl.log(tl.where(kept, tot, 1.0)), float("-inf")), mask=rmask)
    m2 = rmask[:, None]
    po = o + r[:, None] * D + d[None, :]
    a = tl.load(po, mask=m2, other=0.0).to(tl.float32)
    x = tl.load(oi + (b * s_ib + h * s_ih + mm * s_im)[:, None] + d[None, :] * s_id, mask=m2, other=0.0)
    # A block with no kept key may hold NaN rows: weight 0 must really drop them.
    x = tl.where((w_new > 0)[:, None], x.to(tl.float32), 0.0)
    merged = (a * w_old[:, None] + x * w_new[:, None]) / tl.where(kept, tot, 1.0)[:, None]
    tl.store(po, merged.to(o.dtype.element_ty), mask=m2)


def merge_into(out: torch.Tensor, lse: torch.Tensor, o_i: torch.Tensor, lse_i: torch.Tensor) -> None:
    """Merge a partial ``(o_i [B, H, M, D], lse_i [B, H, M])`` into contiguous ``(out, lse)`` in place."""
    b, h, m, d = out.shape
    rows = b * h * m
    block_r = max(1, 4096 // d)
    _merge_kernel[(triton.cdiv(rows, block_r),)](
        out, lse, o_i, *o_i.stride(), lse_i, *lse_i.stride(), rows, h, m, D=d, BLOCK_R=block_r, num_warps=4)
