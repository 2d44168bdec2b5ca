"""Attention over `QVGCache` views: the body of ``qvg::cache_attention``.

Most reads take the fast read (`read_plan` + `read_fast`): a plan built once per cache state,
then one gather launch into a shared workspace and one fused SDPA. The rest take the general
read below, and `tally.stats` counts both (``fast_reads``, ``general_reads`` and why).

General read: tokens sealed in both the key and the value store at the same positions are read by the
attention kernel straight from packed storage (``ranges``); every other token of the views (the
dense slots, holes, tokens sealed on one side only, dense pieces appended by ``cat``) is
gathered into the small dense tail. Keys repeated along the batch (``repeat`` for CFG) are read
once, with the queries of every copy folded into one call; heads repeated by
``repeat_interleave`` (GQA) are left to the kernel's grouped heads.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from . import tally
from ..kernels.attention import qvg_attention as attention_impl
from ..quant.packed import PackedStore
from .read_fast import attend_planned
from .codec import PIECE_INTS, RUN_PIECE
from .spec import is_sealed
from .read_plan import ReadSide, fast_reads_enabled, flag_runs, plan_for


def plan(k: ReadSide, v: ReadSide) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """Split the views (pieces of equal kinds and lengths, as ``_fusable`` checks) into the
    store ranges both sides read from packed storage, and the runs of K and V positions read
    through the tail (the same lengths, in the same order), as ``(start, end)`` lists.

    Works on slices of the token state, one piece at a time: a read over a long history costs a
    few tensor operations per piece, never an index array over every token (the host time of
    this planning is paid on every attention call)."""
    ranges: list[tuple[int, int]] = []
    rest_k: list[tuple[int, int]] = []
    rest_v: list[tuple[int, int]] = []
    kp, vp = k.pieces, v.pieces
    for i in range(0, len(kp), PIECE_INTS):
        kind, ak, n = int(kp[i]), int(kp[i + 1]), int(kp[i + 2])
        av = int(vp[i + 1])
        if kind != RUN_PIECE or n == 0:
            continue
        if ak != av:
            rest_k.append((ak, ak + n))
            rest_v.append((av, av + n))
            continue
        both = is_sealed(k.store.pos_map[ak:ak + n]) & is_sealed(v.store.pos_map[ak:ak + n])
        for lo, hi, fused in flag_runs(both):
            if fused:
                ranges.append((ak + lo, ak + hi))
            else:
                rest_k.append((ak + lo, ak + hi))
                rest_v.append((ak + lo, ak + hi))
    return ranges, rest_k, rest_v


def _positions(runs: Sequence[tuple[int, int]]) -> torch.Tensor:
    if not runs:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(a, b) for a, b in runs])


def attend(q: torch.Tensor, k: ReadSide, v: ReadSide, scale: Optional[float], key: tuple) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` for q ``[B*tile, Hq, M, D]`` and the two views: the fast read
    when the views' plan allows it (`read_plan`; ``key`` is `read_plan.args_key` of the op's
    arguments), else the general read below."""
    if fast_reads_enabled():
        fast = plan_for(k, v, q, key)
        if fast.reason is None:
            tally.fast_read(fast.sealed, fast.tokens - fast.sealed)
            return attend_planned(q, k, v, fast, scale)
        tally.general_read(fast.reason)
    return attend_general(q, k, v, scale)


def attend_general(q: torch.Tensor, k: ReadSide, v: ReadSide, scale: Optional[float],
                   return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The general read: sealed tokens both sides hold at the same positions are read by
    ``qvg::attention`` from packed storage, everything else through a decoded dense tail. With
    ``return_lse`` also the fp32 log-sum-exp ``[B*tile, Hq, M]`` (to merge with other reads)."""
    ranges, rest_k, rest_v = plan(k, v)
    tile = k.lead[0].tile
    b = q.shape[0] // tile
    fused_tokens = sum(e - s for s, e in ranges)
    dense_tokens = 0 if k.dense is None else k.dense.shape[-2]
    tally.add(attention_calls=1, general_reads=1, fused_tokens=fused_tokens,
              tail_tokens=sum(e - s for s, e in rest_k) + dense_tokens)
    if k.dense is not None or tile != v.lead[0].tile:
        return _attend_by_rows(q, k, v, ranges, (_positions(rest_k), _positions(rest_v)), scale, return_lse)
    tails = [side.store.decode(_positions(runs), [side.part], side.sel())[0]
             for side, runs in ((k, rest_k), (v, rest_v))]
    ks, vs = k.store.packed(k.part, k.sel()), v.store.packed(v.part, v.sel())
    if tile == 1:
        return attention_impl(q, ks, vs, ranges, tails[0], tails[1], scale=scale, return_lse=return_lse)
    # [tile*B, H, M, D] -> [B, H, tile*M, D]: every copy of the batch reads the store once.
    hq, m, d = q.shape[1:]
    folded = q.reshape(tile, b, hq, m, d).permute(1, 2, 0, 3, 4).reshape(b, hq, tile * m, d)
    out = attention_impl(folded, ks, vs, ranges, tails[0], tails[1], scale=scale, return_lse=True)
    out, lse = (x.reshape(b, hq, tile, m, *x.shape[3:]).transpose(0, 2).transpose(1, 2)
                .reshape(tile * b, hq, m, *x.shape[3:]) for x in out)
    return (out, lse) if return_lse else out


def _expand_batch(store: PackedStore, rows: int) -> PackedStore:
    """``store`` (batch 1) seen as ``rows`` copies along the batch: stride-0 views, no copy."""
    return dataclasses.replace(
        store, codes=store.codes.expand(rows, *store.codes.shape[1:]),
        scales=store.scales.expand(rows, *store.scales.shape[1:]),
        zeros=None if store.zeros is None else store.zeros.expand(rows, *store.zeros.shape[1:]),
        assignments=store.assignments.expand(store.assignments.shape[0], rows, *store.assignments.shape[2:]),
        centroids=store.centroids.expand(*store.centroids.shape[:2], rows, *store.centroids.shape[3:]))


def _attend_by_rows(q: torch.Tensor, k: ReadSide, v: ReadSide, ranges: list[tuple[int, int]],
                    tail_positions: tuple[torch.Tensor, torch.Tensor], scale: Optional[float],
                    return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention for views whose batch copies cannot share one folded call: dense pieces
    appended by ``cat`` (their rows differ per copy) and keys and values repeated differently
    along the batch (HY-WorldPlay: keys stored for both CFG copies, values stored once and
    repeated). When each side stores either every row or one row repeated, one call reads all
    rows (the single stored row seen through a stride-0 batch). Otherwise the rows go in blocks
    of the smaller store batch; each reads one contiguous batch slice of each store
    (``_fusable`` checks that the larger is a multiple of the smaller), and a slice's packed
    view and decoded tail are built once, however many blocks read it."""
    rows = q.shape[0]
    lengths = [side.lead[0].length for side in (k, v)]
    g = rows if all(n in (1, rows) for n in lengths) else min(lengths)
    read: dict[tuple[int, int], tuple[PackedStore, torch.Tensor]] = {}
    outs = []
    for r0 in range(0, rows, g):
        packed, tails = [], []
        for i, (side, positions) in enumerate(zip((k, v), tail_positions)):
            batch, heads = side.lead
            offset = batch.offset + r0 % batch.length
            if (i, offset) not in read:
                n = min(g, batch.length)
                sel = ((offset, n), (heads.offset, heads.length))
                store_view, tail = side.store.packed(side.part, sel), side.store.decode(positions, [side.part], sel)[0]
                if n < g:
                    store_view, tail = _expand_batch(store_view, g), tail.expand(g, *tail.shape[1:])
                read[i, offset] = store_view, tail
            store_view, tail = read[i, offset]
            if side.dense is not None:
                tail = torch.cat([tail, side.dense[r0:r0 + g].to(tail.dtype)], dim=-2)
            packed.append(store_view)
            tails.append(tail)
        outs.append(attention_impl(q[r0:r0 + g], packed[0], packed[1], ranges, tails[0], tails[1], scale=scale,
                                   return_lse=True))
    out, lse = torch.cat([o for o, _ in outs]), torch.cat([l for _, l in outs])
    return (out, lse) if return_lse else out
