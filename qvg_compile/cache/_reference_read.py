"""Reference attention over a `PackedStore`: bounded decoded blocks merged by log-sum-exp.

Same contract as ``qvg_compile.kernels.attention.qvg_attention``: keys and values are the sealed
tokens ``ranges`` of the two stores, read in order, followed by the dense tail. Each block of at
most ``block`` tokens is decoded, scored and folded into a running ``(out, lse)``, so no more
than one block of history exists in dense form at a time.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..quant.store import PackedStore

BLOCK_TOKENS = 4096


def reference_attention(
    q: torch.Tensor,
    k_store: PackedStore,
    v_store: PackedStore,
    ranges: Sequence[tuple[int, int]],
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    tail_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    block: int = BLOCK_TOKENS,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q K^T * scale) V`` over the sealed ``ranges`` then the tail.

    Args:
        q: ``[B, Hq, M, D]``; Hq a multiple of the stores' heads Hkv (GQA: query head h reads
            key head ``h // (Hq / Hkv)``).
        k_store, v_store: ``[B, Hkv, capacity, ...]`` packed tokens.
        ranges: ``(start, end)`` token ranges of both stores.
        tail_k, tail_v: ``[B, Hkv, T, D]`` dense keys and values after the ranges.
        tail_mask: bool (True keeps) or additive, broadcastable to ``[B, Hq, M, T]``; tail only.
        scale: defaults to ``1 / sqrt(D)``.
        return_lse: also return the fp32 log-sum-exp ``[B, Hq, M]``.

    Returns the output ``[B, Hq, M, D]`` in q's dtype (fp32 inside).
    """
    b, hq, m, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.float() * scale
    acc = torch.zeros(b, hq, m, tail_v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, m), -math.inf, dtype=torch.float32, device=q.device)

    def fold(k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        nonlocal acc, lse
        groups = hq // k.shape[1]
        k = k.float().repeat_interleave(groups, dim=1) if groups > 1 else k.float()
        v = v.float().repeat_interleave(groups, dim=1) if groups > 1 else v.float()
        s = qf @ k.transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.float()
        new = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
        # Rows with nothing kept so far have lse = -inf: shift by 0 instead of NaN.
        shift = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
        acc = acc * torch.exp(lse - shift).unsqueeze(-1) + torch.exp(s - shift.unsqueeze(-1)) @ v
        lse = new

    for start, end in ranges:
        for lo in range(start, end, block):
            hi = min(end, lo + block)
            fold(k_store.dequantize(lo, hi), v_store.dequantize(lo, hi), None)
    if tail_k.shape[-2]:
        fold(tail_k, tail_v, tail_mask)
    out = acc.to(q.dtype)
    return (out, lse) if return_lse else out
