"""Attention over `QVGCache` views: the body of ``qvg::cache_attention``.

Tokens sealed in both the key and the value store at the same positions are read by the
attention kernel straight from packed storage (``ranges``); every other token of the views (the
dense slots, holes, tokens sealed on one side only, dense pieces appended by ``cat``) is
gathered into the small dense tail. Keys repeated along the batch (``repeat`` for CFG) are read
once, with the queries of every copy folded into one call; heads repeated by
``repeat_interleave`` (GQA) are left to the kernel's grouped heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import stats
from ..kernels.attention import qvg_attention as attention_impl
from .store import Store, masked_runs
from .view import Lead


@dataclass
class ReadSide:
    """One of K or V: its store, the view's store positions (-1 where a dense piece is), the
    dense pieces concatenated ``[B*tile, H*interleave, m, D]`` (or None), the two leading dims
    and the part read."""

    store: Store
    positions: torch.Tensor
    dense: Optional[torch.Tensor]
    lead: tuple[Lead, Lead]
    part: int

    def sel(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return tuple((ax.offset, ax.length) for ax in self.lead)  # type: ignore[return-value]


def attend(q: torch.Tensor, k: ReadSide, v: ReadSide, scale: Optional[float]) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` for q ``[B*tile, Hq, M, D]`` and the two views."""
    pk, pv = k.positions, v.positions
    sk = torch.where(pk >= 0, k.store.pos_map[pk.clamp(min=0)].long(), 0)
    sv = torch.where(pv >= 0, v.store.pos_map[pv.clamp(min=0)].long(), 0)
    fused = (pk >= 0) & (pk == pv) & (sk <= -2) & (sv <= -2)
    ranges = [(first, first + n) for _, first, n in masked_runs(pk, fused)]
    rest = ((~fused) & (pk >= 0)).nonzero().flatten()
    tails = []
    for side, pos in ((k, pk), (v, pv)):
        tails.append(side.store.decode(pos[rest], [side.part], side.sel())[0])
    ks, vs = k.store.packed(k.part, k.sel()), v.store.packed(v.part, v.sel())
    tile = k.lead[0].tile
    b = q.shape[0] // tile
    fused_tokens = sum(e - s for s, e in ranges)
    dense_tokens = 0 if k.dense is None else k.dense.shape[-2]
    stats.add(attention_calls=1, fused_tokens=fused_tokens, tail_tokens=int(rest.numel()) + dense_tokens)
    if k.dense is None:
        if tile == 1:
            return attention_impl(q, ks, vs, ranges, tails[0], tails[1], scale=scale)
        # [tile*B, H, M, D] -> [B, H, tile*M, D]: every copy of the batch reads the store once.
        hq, m, d = q.shape[1:]
        folded = q.reshape(tile, b, hq, m, d).permute(1, 2, 0, 3, 4).reshape(b, hq, tile * m, d)
        out = attention_impl(folded, ks, vs, ranges, tails[0], tails[1], scale=scale)
        return out.reshape(b, hq, tile, m, -1).permute(2, 0, 1, 3, 4).reshape(tile * b, hq, m, -1)
    outs = []
    for t in range(tile):
        rows = slice(t * b, (t + 1) * b)
        tk = torch.cat([tails[0], k.dense[rows].to(tails[0].dtype)], dim=-2)
        tv = torch.cat([tails[1], v.dense[rows].to(tails[1].dtype)], dim=-2)
        outs.append(attention_impl(q[rows], ks, vs, ranges, tk, tv, scale=scale))
    return torch.cat(outs) if tile > 1 else outs[0]
