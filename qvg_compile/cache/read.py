"""Attention over a compressed history: block by block, merged with log-sum-exp.

Keys/values arrive as an ordered list of blocks (decoded sealed segments, the dense open slot,
zero gaps of unwritten tokens). Each block contributes ``(out_b, lse_b)``; the running result is
rescaled by ``exp(lse - lse_new)``, so at most one decoded block exists at a time and no full
copy of the history is ever built. The result equals SDPA over the concatenated blocks.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


def blockwise_attention(
    q: torch.Tensor,
    blocks: Iterable[tuple[torch.Tensor, torch.Tensor, int]],
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` with k, v given as blocks ``(k_b, v_b, key_offset)``.

    q ``[B, Hq, M, D]``; k_b, v_b ``[B, Hkv, n_b, D]`` with Hq a multiple of Hkv (GQA);
    attn_mask bool (True keeps) or additive, broadcastable to ``[B, Hq, M, N]``. Computed in fp32,
    returned in q's dtype.
    """
    b, hq, m, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.float() * scale
    acc = torch.zeros(b, hq, m, v_dim(q), dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, m), -math.inf, dtype=torch.float32, device=q.device)
    for k_b, v_b, offset in blocks:
        n = k_b.shape[-2]
        if n == 0:
            continue
        acc = _ensure_width(acc, v_b.shape[-1])
        groups = hq // k_b.shape[1]
        kf = k_b.float().repeat_interleave(groups, dim=1) if groups > 1 else k_b.float()
        vf = v_b.float().repeat_interleave(groups, dim=1) if groups > 1 else v_b.float()
        s = qf @ kf.transpose(-2, -1)
        if attn_mask is not None:
            mask = attn_mask[..., offset:offset + n]
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.float()
        block_lse = torch.logsumexp(s, dim=-1)
        new_lse = torch.logaddexp(lse, block_lse)
        safe = torch.where(torch.isfinite(new_lse), new_lse, torch.zeros_like(new_lse))
        p = torch.exp(s - safe.unsqueeze(-1))
        acc = acc * torch.exp(lse - safe).unsqueeze(-1) + p @ vf
        lse = new_lse
    return acc.to(q.dtype)


def v_dim(q: torch.Tensor) -> int:
    return q.shape[-1]


def _ensure_width(acc: torch.Tensor, width: int) -> torch.Tensor:
    if acc.shape[-1] == width:
        return acc
    return torch.zeros(*acc.shape[:-1], width, dtype=acc.dtype, device=acc.device)
