"""Writes into a `QVGCache` and its copies: ``dst[...] = dense`` (quantize on write, by the
sealing policy), cache-to-cache copies (packed tokens moved as they are where the layouts allow)
and clones (a view materialised as a store of its own, or a copy-on-write view of a shared one).

The op table (`dispatch`) maps ``copy_``, ``index_copy_``, ``fill_``, ``clone``, ... and the
fallback's in-place results onto these.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import ops as _ops  # noqa: F401  (registers the qvg::cache_* ops)
from . import tally
from .codec import flat_lead, flat_pieces, flat_sel
from .spec import StoreSpec
from .store import regrow
from .tensor import QVGCache, StoreHandle
from .view import COW, EXPANDED, RUN, Lead, View
from .view_results import dense_concat, make_view


def _parts_range(view: View) -> range:
    return range(view.parts[0], view.parts[0] + view.parts[1])


def _split_parts(x: torch.Tensor, spec: StoreSpec, view: View) -> list[torch.Tensor]:
    return list(torch.split(x, [spec.part_dims[p] for p in _parts_range(view)], dim=-1))


def ensure_slots(t: QVGCache, tokens: Any) -> None:
    """Eager only: allocate the dense slots at the first write (of the policy's slot length, or
    the write's when the policy leaves it open), or at the first write after `QVGCache.seal`
    released them."""
    handle = t._handle
    if handle.spec.slot_tokens or not isinstance(tokens, int) or tokens <= 0:
        return
    if not handle.concrete:
        raise RuntimeError(
            "QVGCache: the cache has no dense slots to write into (no write has happened yet, or "
            "seal(release=True) freed them); pass chunk_tokens= when creating the cache, or run "
            "one write eagerly before the compiled function writes")
    store = handle.store
    sized = handle.spec.sized_for(handle.spec.policy.chunk_tokens or tokens, store.capacity)
    handle.replace(sized, regrow(store, sized))


def make_writable(t: QVGCache) -> None:
    """Make ``t`` safe to write: caches that share a store they do not own (``repeat``, ``cat``
    results) get their own copy first; expanded views refuse, as dense tensors do."""
    if t._view.mode == COW and any(not statically_known_true(b == 1) for b in t._view.bcast):
        raise RuntimeError("QVGCache: writing into a copy of an expanded cache is not supported; "
                           "write into .dequantize() instead")
    if t._view.mode == EXPANDED or any(not statically_known_true(b == 1) for b in t._view.bcast):
        raise RuntimeError("unsupported operation: more than one element of the written-to tensor refers "
                           "to a single memory location. Please clone() the tensor before performing "
                           "the operation.")
    if t._view.mode == COW:
        own = clone_cache(t)
        t._handle, t._view, t._dense = own._handle, own._view, own._dense


def write_dense(dst: QVGCache, src: torch.Tensor, index: Optional[torch.Tensor] = None) -> None:
    """``dst[...] = src`` (``src`` broadcastable to ``dst``; with ``index``, ``src`` holds the tokens
    for the sequence positions ``index`` of ``dst``, as ``index_copy_``)."""
    make_writable(dst)
    view = dst._view
    if index is None:
        src = src.expand(dst.shape)
    norm = view.to_normalised(src.to(device=dst.device, dtype=dst.dtype))
    ensure_slots(dst, norm.shape[-2] if index is None else index.numel())
    spec, arrays = dst._handle.spec, dst._handle.arrays
    parts = list(_parts_range(view))
    values = _split_parts(norm, spec, view)
    sel = flat_sel(view, arrays[0].shape[:-2])
    if index is not None:
        (kind, start, _), = view.pieces
        torch.ops.qvg.cache_write(arrays, values, parts, 0, index + start, sel, spec.json, False)
        return
    pos = 0
    for kind, start, n in view.pieces:
        chunk = [v[..., pos:pos + n, :] for v in values]
        torch.ops.qvg.cache_write(arrays, chunk, parts, start, None, sel, spec.json, False)
        pos = pos + n


def copy_cache(dst: QVGCache, src: QVGCache) -> None:
    """``dst.copy_(src)`` between caches: whole stores copy array by array (AOTAutograd's
    input-mutation epilogue); views of compatible stores move packed tokens; else decode."""
    if dst._handle is src._handle and dst._view == src._view:
        return
    if tuple(dst.shape) != tuple(src.shape):
        write_dense(dst, src.dequantize())
        return
    make_writable(dst)
    dspec, sspec = dst._handle.spec, src._handle.spec
    if dst.is_whole() and src.is_whole() and dspec == sspec and dst._view.dims == src._view.dims \
            and [a.shape for a in dst._handle.arrays] == [a.shape for a in src._handle.arrays]:
        for a, b in zip(dst._handle.settled(), src._handle.settled()):
            if a is not b:
                a.copy_(b)
        return
    compatible = (dspec.config == sspec.config and dspec.part_dims == sspec.part_dims and dspec.roles == sspec.roles
                  and dst._view.parts == (0, len(dspec.part_dims)) and src._view.parts == dst._view.parts
                  and dst._view.dims == src._view.dims and not src._dense and src._view.plain_lead
                  and dst._view.lead_sel(dst._handle.arrays[0].shape[:-2]) is None
                  and src._view.lead_sel(src._handle.arrays[0].shape[:-2]) is None
                  and len(dst._view.pieces) == 1)
    if not compatible:
        tally.fallback("copy_ (cache to cache)", "layouts or configs differ")
        write_dense(dst, src.dequantize())
        return
    (_, start, _), = dst._view.pieces
    same = dst._handle is src._handle
    torch.ops.qvg.cache_copy(dst._handle.arrays, [] if same else src._handle.arrays,
                             flat_pieces(src._view), start, dspec.json, sspec.json)


def clone_cache(t: QVGCache) -> QVGCache:
    """``t.clone()``: the view as a store of its own (packed tokens and dense rows copied by
    ``qvg::cache_clone``), or, for a view with a broadcast dim, a copy-on-write view that keeps
    sharing the store."""
    view = t._view
    if any(not statically_known_true(b == 1) for b in view.bcast):
        # repeat_interleave is unsqueeze + expand + clone + view: keep sharing the store; the
        # view folds the broadcast dim into the leading dim before it.
        return make_view(t, dataclasses.replace(view, mode=COW))
    spec = t._handle.spec
    dense = dense_concat(t)
    dense_parts = [] if dense is None else _split_parts(dense, spec, view)
    arrays = torch.ops.qvg.cache_clone(t._handle.arrays, dense_parts, flat_pieces(view), flat_lead(view),
                                       list(view.parts), spec.json)
    new_spec = spec.for_parts(view.parts)
    new_view = View(view.dims, tuple(Lead(0, ax.size) for ax in view.lead), ((RUN, 0, view.length()),),
                    (0, view.parts[1]), view.bcast)
    return QVGCache(StoreHandle(new_spec, arrays), new_view)
