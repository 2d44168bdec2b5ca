"""`QVGCache` views rotated by RoPE: how the op table makes, slices and reads them.

``qvg::rope`` of a cache view (`rope`) makes a *rotated view*: the same store, view and dense
pieces, plus the RoPE spec and its cos/sin tables as ``[n, D]`` (row ``i`` for the view's token
``i``). Nothing is decoded. Layout views keep the rotation (the tables are per token and
channel, so transposes, leading-dim selections and repeats leave them as they are; a slice of the
tokens slices them); the read applies it (``qvg::cache_attention_rope``); every other op decodes
and rotates (`QVGCache.dequantize`, a counted fallback).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import read_rope as _read_rope  # noqa: F401  (registers qvg::cache_attention_rope)
from .rope import RopeSpec
from .tensor import QVGCache
from .view import CHAN, DENSE, RUN, Unsupported, View
from .view_results import make_view


def rotate_view(x: QVGCache, cos: torch.Tensor, sin: torch.Tensor, layout: str, compute: str) -> QVGCache:
    """``x`` rotated by RoPE (``qvg::rope``'s meaning) as a rotated view. ``cos``/``sin`` broadcast
    against ``x`` and vary at most along its sequence and channel dims.

    Raises:
        Unsupported: ``x`` is already rotated, a table varies along another dim, or the spec
            is not one `rope.RopeSpec` knows (the caller falls back to the dense rotation).
    """
    if x._rope is not None:
        raise Unsupported("RoPE of a view already rotated")
    try:
        spec = RopeSpec(layout, compute)
    except ValueError as exc:
        raise Unsupported(str(exc)) from exc
    tables = (token_table(x, cos), token_table(x, sin))
    if all(type(t) is torch.Tensor for t in tables) and not torch.compiler.is_compiling():
        # Made eagerly (the call that swaps a cache in runs its graph eagerly): the tables are as
        # long as the view, which grows with the cache; a graph that receives the view is then
        # symbolic in their rows from the first compile, as it is in the cache's length.
        for t in tables:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    return QVGCache(x._handle, x._view, x._dense, (spec, tables))


def token_table(x: QVGCache, table: torch.Tensor) -> torch.Tensor:
    """``table`` (broadcasting against ``x``) as ``[n, D]``: one row per token of ``x``, one column
    per channel (a view of ``table`` where it can be)."""
    if not isinstance(table, torch.Tensor) or isinstance(table, QVGCache) or not table.dtype.is_floating_point:
        raise Unsupported("RoPE tables that are not dense floating-point tensors")
    rank = x.dim()
    if table.dim() > rank:
        raise Unsupported("RoPE tables of a higher rank than the cache")
    t = table.reshape((1,) * (rank - table.dim()) + tuple(table.shape)) if table.dim() < rank else table
    seq, chan = x._view.seq_dim(), x._view.dims.index(CHAN)
    for d in range(rank):
        if d not in (seq, chan) and not statically_known_true(t.shape[d] == 1):
            raise Unsupported("RoPE tables that vary along a dim other than the tokens and channels")
    for d, size in ((seq, x.shape[seq]), (chan, x.shape[chan])):
        if not (statically_known_true(t.shape[d] == 1) or statically_known_true(t.shape[d] == size)):
            raise Unsupported("RoPE tables whose tokens or channels do not match the cache")
    rows = t.permute([d for d in range(rank) if d not in (seq, chan)] + [seq, chan])
    rows = rows.reshape(rows.shape[-2:])
    return rows.expand(x.shape[seq], x.shape[chan])


def rotated_slice(t: QVGCache, view: View, start: Any, end: Any) -> QVGCache:
    """The rotated view ``t`` sliced along its tokens to ``view`` (``aten.slice``'s ``start``/``end``
    along the sequence): the tables' rows sliced the same way."""
    spec, (cos, sin) = t.rope  # type: ignore[misc]
    tables = tuple(torch.ops.aten.slice.Tensor(x, 0, start, end) for x in (cos, sin))
    plain = make_view(QVGCache(t._handle, t._view, t._dense), view)
    return QVGCache(plain._handle, plain._view, plain._dense, (spec, tables))


def read_order_ok(k: QVGCache) -> None:
    """Raise Unsupported unless the rotated keys ``k`` are store runs followed by dense pieces
    (``cat([cache, new])``), the views ``qvg::cache_attention_rope`` reads."""
    kinds = [kind for kind, _, _ in k._view.pieces]
    runs = kinds.count(RUN)
    if kinds[:runs] != [RUN] * runs or any(kind != DENSE for kind in kinds[runs:]):
        raise Unsupported("rotated keys whose appended tokens come before stored ones")


def rotated_read(q: torch.Tensor, k: QVGCache, sides: Sequence[Any], scale: Any) -> torch.Tensor:
    """``qvg::cache_attention_rope`` of ``q`` over the rotated keys ``k`` and their values, with
    ``sides`` the K and V arguments of ``qvg::cache_attention`` (``dispatch._read_sides``)."""
    read_order_ok(k)
    spec, (cos, sin) = k.rope  # type: ignore[misc]
    return torch.ops.qvg.cache_attention_rope(q, *sides, scale, cos, sin, spec.layout, spec.compute)

