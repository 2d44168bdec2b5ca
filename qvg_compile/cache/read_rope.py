"""Attention over a key view rotated by RoPE (`rope`): the body of ``qvg::cache_attention_rope``.

Pattern: LongCat-Video's denoising attention reads ``rope(cat([k_cache, k_new]))`` and
``cat([v_cache, v_new])``: the stored history first, then the new tokens as dense pieces, the
keys rotated over the whole sequence. The op takes the same views as ``qvg::cache_attention``
plus the rotation (tables ``[n, D]`` over the view's tokens, the layout and compute dtype).

Read: the history (the views' store runs) goes through the fast read: one gather of K and V into
the shared workspace, the gathered keys rotated there (`rope.rotate_rows_`, a block of rows at a
time), one fused SDPA with its log-sum-exp; views the fast read does not take (holes, a dtype
the fused kernels lack) decode the history into a dense tail instead (a counted general read).
The new tokens are small and dense: rotated with the tables' last rows and attended on their
own. The two partial outputs are merged by log-sum-exp, which is SDPA over the concatenation.
No dense copy of the history is made outside the workspace on the fast read.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import tally
from ..kernels.attention import merge_partial, sdpa_with_lse
from .codec import PIECE_INTS, RUN_PIECE, leads, positions
from .host import host_thread
from .lean_op import CACHE_OP_TAGS
from .ops import repeat_lead, store_of
from .read_fast import attend_planned, replay
from .read_plan import ReadSide, args_key, fast_reads_enabled, plan_for
from .rope import RopeSpec, apply, rotate_rows_
from .spec import StoreSpec

Tensor = torch.Tensor


def history_runs(pieces: Sequence[int]) -> Optional[list[int]]:
    """The flat store runs of a view whose pieces are store runs first and dense pieces after
    them (``cat([cache, new])``), or None when a run follows a dense piece."""
    kinds = [int(kind) for kind in pieces[0::PIECE_INTS]]
    runs = sum(1 for kind in kinds if kind == RUN_PIECE)
    if any(kind != RUN_PIECE for kind in kinds[:runs]):
        return None
    return list(pieces[:runs * PIECE_INTS])


@torch.library.custom_op("qvg::cache_attention_rope", mutates_args=(), tags=CACHE_OP_TAGS)
def cache_attention_rope(q: Tensor, k: list[Tensor], k_dense: list[Tensor], k_pieces: list[int], k_lead: list[int],
                         k_part: int, k_spec: str, v: list[Tensor], v_dense: list[Tensor], v_pieces: list[int],
                         v_lead: list[int], v_part: int, v_spec: str, scale: Optional[float], cos: Tensor,
                         sin: Tensor, layout: str, compute: str) -> Tensor:
    """``qvg::cache_attention`` (same first arguments: dense ``q`` ``[B, Hq, M, D]`` over two cache
    views ``[B, H, n, D]`` of store runs then dense pieces) with the keys rotated by RoPE: tables
    ``cos``/``sin`` ``[n, D]`` (row ``i`` for the view's token ``i``), ``layout`` and ``compute`` as
    `rope.RopeSpec`. Returns ``[B, Hq, M, Dv]`` in ``q``'s dtype."""
    spec = RopeSpec(layout, compute)
    k_runs, v_runs = history_runs(k_pieces), history_runs(v_pieces)
    if k_runs is None or v_runs is None:
        raise ValueError("cache_attention_rope: expected views of store runs followed by dense pieces")
    n_hist = sum(int(n) for n in k_runs[2::PIECE_INTS])
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    partial: list[tuple[Tensor, Tensor]] = []
    if n_hist:
        rotate = (cos[:n_hist], sin[:n_hist], spec)
        key = args_key(q, k, v, k_runs, v_runs, k_lead, v_lead, k_part, v_part)
        found = replay(key, q, k, v, scale, rotate, return_lse=True)
        if found is None:
            with host_thread(q.device):
                k_side = ReadSide(store_of(k, k_spec), k_runs, None, leads(k_lead), k_part)  # type: ignore[arg-type]
                v_side = ReadSide(store_of(v, v_spec), v_runs, None, leads(v_lead), v_part)  # type: ignore[arg-type]
                # Again: building the stores may have undone a write opened ahead (`ahead`).
                key = args_key(q, k, v, k_runs, v_runs, k_lead, v_lead, k_part, v_part)
                found = _history(q, k_side, v_side, scale, rotate, key)
        partial.append(found)  # type: ignore[arg-type]
    if k_dense:
        keys = apply(k_dense[0], cos[n_hist:], sin[n_hist:], spec).to(q.dtype)
        out, lse = sdpa_with_lse(q, keys, v_dense[0].to(q.dtype), sc)
        partial.append((out, lse.reshape(q.shape[:-1])))
    if not partial:
        raise ValueError("cache_attention_rope: no keys")
    if len(partial) == 1:
        return partial[0][0].to(q.dtype).contiguous()
    acc, lse = partial[0][0].float().contiguous(), partial[0][1].float().contiguous()
    for o, l in partial[1:]:
        merge_partial(acc, lse, o, l)
    return acc.to(q.dtype)


@cache_attention_rope.register_fake
def _(q, k, k_dense, k_pieces, k_lead, k_part, k_spec, v, v_dense, v_pieces, v_lead, v_part, v_spec, scale, cos,
      sin, layout, compute):
    return q.new_empty((*q.shape[:-1], StoreSpec.from_json(v_spec).part_dims[v_part]))


def _history(q: Tensor, k: ReadSide, v: ReadSide, scale: Optional[float], rotate: tuple[Tensor, Tensor, RopeSpec],
             key: tuple) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` over the store runs of ``k`` (rotated) and ``v``, with its fp32
    log-sum-exp ``[B*tile, Hq, M]``: the fast read when its plan allows, else decoded rows."""
    if fast_reads_enabled():
        plan = plan_for(k, v, q, key)
        if plan.reason is None:
            tally.fast_read(plan.sealed, plan.tokens - plan.sealed)
            return attend_planned(q, k, v, plan, scale, rotate, return_lse=True)  # type: ignore[return-value]
        tally.general_read(plan.reason)
    else:
        tally.general_read("QVG_READ_PATH=general")
    tally.add(attention_calls=1, general_reads=1, tail_tokens=int(sum(int(n) for n in k.pieces[2::PIECE_INTS])))
    keys, values = (_decoded(side, q.dtype) for side in (k, v))
    rotate_rows_(keys, *rotate)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = sdpa_with_lse(q, keys, values, sc)
    return out, lse.reshape(q.shape[:-1]).float()


def _decoded(side: ReadSide, dtype: torch.dtype) -> Tensor:
    """The side's store runs decoded, ``[B*tile, H*interleave, n, D]`` in ``dtype``."""
    rows = side.store.decode(positions(side.pieces), [side.part], side.sel())[0].to(dtype)
    return repeat_lead(rows, side.lead)

