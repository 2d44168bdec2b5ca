"""`View`: how a `QVGCache` tensor maps onto its store, and the view ops as pure functions.

A store holds tokens in the normalised layout ``[*lead, N, D]``. A view picks, per leading dim,
a range (then optionally repeats it: ``interleave`` like ``repeat_interleave``, ``tile`` like
``repeat``), along the sequence an ordered list of *pieces* (runs of store positions and dense
tensors appended by ``cat``), a contiguous range of channel parts, and orders all that into the
outer dims (``dims``), with size-1 or broadcast dims inserted. Lengths may be SymInts while
tracing; everything else is plain ints and strings, so a `View` is hashable and picklable.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

SEQ, CHAN, BCAST = -1, -2, -3
RUN, DENSE = "run", "dense"
VIEW, COW, EXPANDED = "view", "cow", "expanded"


class Unsupported(Exception):
    """The op has no compressed form for this view; the caller falls back to dense."""


@dataclass(frozen=True)
class Lead:
    """One leading dim: store indices ``offset + (i % (length * interleave)) // interleave``."""

    offset: int
    length: int
    interleave: int = 1
    tile: int = 1

    @property
    def size(self) -> Any:
        return self.length * self.interleave * self.tile

    @property
    def plain(self) -> bool:
        return self.interleave == 1 and self.tile == 1


@dataclass(frozen=True)
class View:
    """Attributes:
        dims: per outer dim, a leading dim index, `SEQ`, `CHAN` or `BCAST`.
        lead: per leading dim of the store.
        pieces: ``(RUN, start, length)`` store positions or ``(DENSE, index, length)`` dense pieces.
        parts: first selected part and how many.
        bcast: sizes of the `BCAST` dims, in order.
        mode: `VIEW` (aliases the store), `COW` (a new tensor that shares the store until written:
            ``repeat``, ``cat``), `EXPANDED` (aliases with repeated elements: writes are errors).
    """

    dims: tuple[int, ...]
    lead: tuple[Lead, ...]
    pieces: tuple[tuple[str, Any, Any], ...]
    parts: tuple[int, int]
    bcast: tuple[int, ...] = ()
    mode: str = VIEW

    @property
    def concrete(self) -> bool:
        """Whether every offset and length is a plain int (none symbolic)."""
        return all(isinstance(x, (int, str, type(None))) for piece in self.pieces for x in piece) and \
            all(isinstance(v, int) for ax in self.lead for v in (ax.offset, ax.length))

    def __deepcopy__(self, memo: dict) -> "View":
        # Immutable once `concrete`: a copy may be this object (see `StoreSpec.__deepcopy__`). A
        # view holding symbolic sizes is copied field by field, so deep-copying it fails as it
        # would without this method.
        if self.concrete:
            return self
        return View(*(copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)))

    # --- shape ---------------------------------------------------------------------------------
    def length(self) -> Any:
        return sum(p[2] for p in self.pieces) if self.pieces else 0

    def outer_shape(self, part_dims: Sequence[int]) -> list[Any]:
        channels = sum(part_dims[self.parts[0]:self.parts[0] + self.parts[1]])
        sizes, b = [], iter(self.bcast)
        for d in self.dims:
            sizes.append(self.length() if d == SEQ else channels if d == CHAN else next(b) if d == BCAST
                         else self.lead[d].size)
        return sizes

    def seq_dim(self) -> int:
        return self.dims.index(SEQ)

    @property
    def plain_lead(self) -> bool:
        return all(ax.plain for ax in self.lead)

    def dense_count(self) -> int:
        return sum(1 for p in self.pieces if p[0] == DENSE)

    def lead_sel(self, lead: Sequence[int]) -> Optional[tuple[tuple[Any, Any], ...]]:
        """``(offset, length)`` per leading dim of a store whose lead is ``lead``, None when the
        view selects all of it."""
        sel = tuple((ax.offset, ax.length) for ax in self.lead)
        if all(statically_known_true(o == 0) and statically_known_true(n == size)
               for (o, n), size in zip(sel, lead)):
            return None
        return sel

    # --- layout conversions --------------------------------------------------------------------
    def to_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """A dense tensor of this view's outer shape, as ``[*lead sizes, n, D]`` (broadcast dims
        must have size 1)."""
        squeeze = []
        b = iter(self.bcast)
        for i, d in enumerate(self.dims):
            if d == BCAST:
                if next(b) != 1:
                    raise RuntimeError("unsupported operation: more than one element of the written-to "
                                       "tensor refers to a single memory location. Please clone() the "
                                       "tensor before performing the operation.")
                squeeze.append(i)
        y = x
        for i in reversed(squeeze):
            y = y.squeeze(i)
        dims = [d for d in self.dims if d != BCAST]
        for a in range(len(self.lead)):
            if a not in dims:
                y = y.unsqueeze(0)
                dims.insert(0, a)
        order = [dims.index(a) for a in range(len(self.lead))] + [dims.index(SEQ), dims.index(CHAN)]
        return y.permute(order)

    def from_normalised(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_normalised`: ``[*lead sizes, n, D]`` to the view's outer layout."""
        present = [d for d in self.dims if d != BCAST]
        hidden = [a for a in range(len(self.lead)) if a not in present]
        axis = {a: a for a in range(len(self.lead))}
        axis[SEQ], axis[CHAN] = len(self.lead), len(self.lead) + 1
        x = y.permute(hidden + [axis[d] for d in present])
        for _ in hidden:
            x = x.squeeze(0)
        b = iter(self.bcast)
        sizes = []
        for i, d in enumerate(self.dims):
            if d == BCAST:
                x = x.unsqueeze(i)
                sizes.append(next(b))
            else:
                sizes.append(-1)
        return x.expand(sizes) if self.bcast else x

    # --- view ops ------------------------------------------------------------------------------
    def slice(self, dim: int, start: Any, end: Any, part_dims: Sequence[int]) -> "View":
        size = self.outer_shape(part_dims)[dim]
        start, end = _clamp(start, end, size)
        d = self.dims[dim]
        if statically_known_true(start == 0) and statically_known_true(end == size):
            return self
        if d == SEQ:
            return replace(self, pieces=_slice_pieces(self.pieces, start, end))
        if d == CHAN:
            first, count = self.parts
            edges = [0]
            for p in range(first, first + count):
                edges.append(edges[-1] + part_dims[p])
            if start not in edges or end not in edges:
                raise Unsupported("a channel slice that does not fall on part boundaries")
            return replace(self, parts=(first + edges.index(start), edges.index(end) - edges.index(start)))
        if d == BCAST:
            i = [j for j, x in enumerate(self.dims[:dim]) if x == BCAST]
            sizes = list(self.bcast)
            sizes[len(i)] = end - start
            return replace(self, bcast=tuple(sizes))
        ax = self.lead[d]
        if not ax.plain:
            raise Unsupported("slicing a repeated leading dim")
        lead = list(self.lead)
        lead[d] = Lead(ax.offset + start, end - start)
        return replace(self, lead=tuple(lead))

    def select(self, dim: int, index: Any, part_dims: Sequence[int]) -> "View":
        d = self.dims[dim]
        if d in (SEQ, CHAN):
            raise Unsupported("selecting one token or channel")
        size = self.outer_shape(part_dims)[dim]
        if not statically_known_true(index >= 0):
            index = index + size if index < 0 else index
        v = self.slice(dim, index, index + 1, part_dims)
        return v.squeeze([dim], part_dims)

    def permute(self, order: Sequence[int]) -> "View":
        rank = len(self.dims)
        order = [o % rank for o in order]
        dims = tuple(self.dims[o] for o in order)
        bpos = [i for i, d in enumerate(self.dims) if d == BCAST]
        bcast = tuple(self.bcast[bpos.index(o)] for o in order if self.dims[o] == BCAST)
        return replace(self, dims=dims, bcast=bcast)

    def transpose(self, a: int, b: int) -> "View":
        order = list(range(len(self.dims)))
        a, b = a % len(order), b % len(order)
        order[a], order[b] = order[b], order[a]
        return self.permute(order)

    def unsqueeze(self, dim: int) -> "View":
        rank = len(self.dims) + 1
        dim %= rank
        dims = list(self.dims)
        dims.insert(dim, BCAST)
        nb = sum(1 for d in self.dims[:dim] if d == BCAST)
        bcast = list(self.bcast)
        bcast.insert(nb, 1)
        return replace(self, dims=tuple(dims), bcast=tuple(bcast))

    def squeeze(self, dims: Sequence[int], part_dims: Sequence[int]) -> "View":
        shape = self.outer_shape(part_dims)
        drop = {d % len(self.dims) for d in dims if statically_known_true(shape[d % len(self.dims)] == 1)}
        if any(self.dims[d] in (SEQ, CHAN) for d in drop):
            raise Unsupported("squeezing the sequence or channel dim")
        keep_b = [b for i, b in zip([i for i, d in enumerate(self.dims) if d == BCAST], self.bcast)
                  if i not in drop]
        dims = tuple(d for i, d in enumerate(self.dims) if i not in drop)
        return replace(self, dims=dims, bcast=tuple(keep_b))

    def expand(self, sizes: Sequence[Any], part_dims: Sequence[int]) -> "View":
        shape = self.outer_shape(part_dims)
        extra = len(sizes) - len(shape)
        v = self
        for _ in range(extra):
            v = v.unsqueeze(0)
        shape = v.outer_shape(part_dims)
        lead, bcast = list(v.lead), list(v.bcast)
        nb = 0
        changed = False
        for i, (d, new) in enumerate(zip(v.dims, sizes)):
            if d == BCAST:
                if new != -1 and not statically_known_true(new == bcast[nb]):
                    bcast[nb] = new
                    changed = True
                nb += 1
                continue
            if new == -1 or statically_known_true(new == shape[i]):
                continue
            if d in (SEQ, CHAN) or not statically_known_true(shape[i] == 1):
                raise Unsupported("expanding a dim that is not of size 1")
            lead[d] = Lead(lead[d].offset, 1, 1, new)
            changed = True
        out = replace(v, lead=tuple(lead), bcast=tuple(bcast))
        return replace(out, mode=EXPANDED) if changed else out

    def repeat(self, reps: Sequence[int], part_dims: Sequence[int]) -> "View":
        v = self
        for _ in range(len(reps) - len(self.dims)):
            v = v.unsqueeze(0)
        lead, bcast = list(v.lead), list(v.bcast)
        nb = 0
        for d, r in zip(v.dims, reps):
            if d == BCAST:
                bcast[nb] = bcast[nb] * r
                nb += 1
            elif r != 1:
                if d in (SEQ, CHAN):
                    raise Unsupported("repeating along the sequence or channels")
                lead[d] = replace(lead[d], tile=lead[d].tile * r)
        return replace(v, lead=tuple(lead), bcast=tuple(bcast), mode=COW)

    def reshape(self, shape: Sequence[Any], part_dims: Sequence[int]) -> "View":
        """Views that keep every store dim identifiable: size-1 dims added or removed, and a
        leading dim merged with the broadcast dim right after it (``expand`` + ``reshape`` GQA)."""
        cur = self.outer_shape(part_dims)
        shape = list(shape)
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape[shape.index(-1)] = math.prod(cur) // known
        if len(shape) == len(cur) and all(statically_known_true(a == b) for a, b in zip(shape, cur)):
            return self
        # A lead dim merged with the broadcast dim after it first: a batch of 1 expanded and
        # flattened (einops' repeat) becomes a repeated lead, which attention reads, not a broadcast.
        for i in range(len(self.dims) - 1):
            d, nxt = self.dims[i], self.dims[i + 1]
            if d >= 0 and nxt == BCAST and self.lead[d].tile == 1:
                merged = cur[:i] + [cur[i] * cur[i + 1]] + cur[i + 2:]
                if len(merged) == len(shape) and all(statically_known_true(a == b) for a, b in zip(merged, shape)):
                    nb = sum(1 for x in self.dims[:i + 1] if x == BCAST)
                    g = self.bcast[nb]
                    lead = list(self.lead)
                    if statically_known_true(lead[d].length == 1) and lead[d].interleave == 1:
                        # One stored row: repeating it is tiling it (the read folds tiles).
                        lead[d] = replace(lead[d], tile=g)
                    else:
                        lead[d] = replace(lead[d], interleave=lead[d].interleave * g)
                    bcast = self.bcast[:nb] + self.bcast[nb + 1:]
                    mode = EXPANDED if self.mode == VIEW else self.mode
                    return replace(self, dims=self.dims[:i + 1] + self.dims[i + 2:], lead=tuple(lead),
                                   bcast=bcast, mode=mode)
        real = [i for i, s in enumerate(cur) if not statically_known_true(s == 1)]
        new_real = [s for s in shape if not statically_known_true(s == 1)]
        if len(real) == len(new_real) and all(statically_known_true(cur[i] == s) for i, s in zip(real, new_real)):
            v = self.squeeze([i for i in range(len(cur)) if i not in real], part_dims)
            for i, s in enumerate(shape):
                if statically_known_true(s == 1):
                    v = v.unsqueeze(i)
            return v
        raise Unsupported(f"a view from {cur} to {shape} that mixes store dims")

    def same_layout(self, other: "View") -> bool:
        return (self.dims, self.lead, self.parts, self.bcast) == (other.dims, other.lead, other.parts, other.bcast)


def _clamp(start: Any, end: Any, size: Any) -> tuple[Any, Any]:
    start = 0 if start is None else start
    end = size if end is None else end
    if not statically_known_true(start >= 0):
        if start < 0:
            start = start + size
            start = 0 if start < 0 else start
    if not statically_known_true(start <= size) and start > size:
        start = size
    if not statically_known_true(end >= 0) and end < 0:
        end = end + size
    if not statically_known_true(end <= size) and end > size:
        end = size
    if not statically_known_true(end >= start) and end < start:
        end = start
    return start, end


def _slice_pieces(pieces: tuple, start: Any, end: Any) -> tuple:
    if len(pieces) == 1:
        kind, a, n = pieces[0]
        if kind == RUN:
            return ((RUN, a + start, end - start),)
        return _slice_dense(pieces[0], start, end)
    out, pos = [], 0
    for kind, a, n in pieces:
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            if kind == RUN:
                out.append((RUN, a + lo - pos, hi - lo))
            else:
                if lo != pos or hi != pos + n:
                    raise Unsupported("slicing inside a dense piece appended by cat")
                out.append((kind, a, n))
        pos = pos + n
    return tuple(out)


def _slice_dense(piece: tuple, start: Any, end: Any) -> tuple:
    if not (statically_known_true(start == 0) and statically_known_true(end == piece[2])):
        raise Unsupported("slicing inside a dense piece appended by cat")
    return (piece,)


def merge_pieces(pieces: tuple) -> tuple:
    """Adjacent runs of consecutive store positions joined into one."""
    out: list = []
    for p in pieces:
        if out and out[-1][0] == RUN and p[0] == RUN and statically_known_true(out[-1][1] + out[-1][2] == p[1]):
            out[-1] = (RUN, out[-1][1], out[-1][2] + p[2])
        else:
            out.append(p)
    return tuple(out)
