"""Materialise a view of a store as a new store (the body of ``qvg::cache_clone``).

Packed tokens, codebooks and dense rows are copied as they are (repeated leading dims are
repeated for real: a clone is an independent tensor). Dense rows keep their slot when the view
keeps the slot's positions in order; the few that cannot (a slot cut by the view's start, sink
rows that are not at the start any more) are sealed in the clone, and dense pieces appended by
``cat`` are written into it a slot at a time, as the pipeline would have written them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .spec import HOLE, LIVE, StoreSpec, is_dense, is_sealed, slot_of
from .store import Store, as_bytes, runs_of
from .view import Lead


def clone_store(src: Store, positions: torch.Tensor, axes: Sequence[Lead], parts: tuple[int, int],
                dense: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Arrays of the new store for the view ``positions`` (host int64, -1 at dense pieces),
    leading dims ``axes``, ``parts`` (first, count); ``dense[p]`` ``[*lead sizes, m, D_p]``."""
    first, count = parts
    n = positions.numel()
    spec = src.spec.for_parts(parts)
    index = [ax.offset + (torch.arange(ax.size) % (ax.length * ax.interleave)) // ax.interleave for ax in axes]

    def map_lead(t: torch.Tensor, dim: int) -> torch.Tensor:
        for a, idx in enumerate(index):
            if not torch.equal(idx, torch.arange(t.shape[dim + a])):
                t = t.index_select(dim + a, idx.to(t.device))
        return t

    stored = (positions >= 0).nonzero().flatten()
    src_pos = positions[stored]
    whole_run = stored.numel() == n and len(runs_of(src_pos)) == 1

    def take(t: torch.Tensor, seq: int) -> torch.Tensor:
        """Tokens ``src_pos`` of ``t`` along dim ``seq``, holes (zeros) at dense pieces."""
        if whole_run:
            return t.narrow(seq, int(src_pos[0]), n)
        shape = list(t.shape)
        shape[seq] = n
        picked = torch.zeros(shape, dtype=t.dtype, device=t.device)
        as_bytes(picked).index_copy_(seq, stored.to(t.device), as_bytes(t.index_select(seq, src_pos.to(t.device))))
        return picked

    out: dict[str, torch.Tensor] = {}
    for new_p, p in enumerate(range(first, first + count)):
        for name in ("codes", "scales", "zeros", "assign", "cents", "tail"):
            if name == "zeros" and not spec.has_zeros:
                continue
            t = src.array(name, p)
            if name == "assign":
                t = map_lead(take(t, -1), 1)
            elif name == "cents":
                t = map_lead(t, 2)
            elif name == "tail":
                t = map_lead(t, 0)
            else:
                t = map_lead(take(t, -2), 0)
            out[f"{name}{new_p}"] = t.clone(memory_format=torch.contiguous_format)
    out["seg_ids"] = take(src.seg_ids, 0).clone()
    pos_map = torch.full((n,), HOLE, dtype=spec.index_dtype)
    pos_map[stored] = src.pos_map[src_pos]
    out["pos_map"] = pos_map
    for name in ("slots", "segs", "counters"):
        out[name] = src.arrays[name].clone()
    new = Store(spec, [out[name] for name in spec.names()])
    new.changed()
    _repair(new)
    # i counts dense tokens before the run: its offset in the concatenated dense pieces. Pieces
    # are written a slot at a time, in order, under the normal sealing policy, so the newest
    # appended tokens are the ones that stay dense (as if the pipeline had written them).
    step = spec.slot_tokens or n
    for i, start, length in runs_of((positions < 0).nonzero().flatten()):
        for a in range(0, length, step):
            b = min(length, a + step)
            new.write(start + a, [d[..., i + a:i + b, :] for d in dense])
    return [new.arrays[name] for name in spec.names()]


def _repair(store: Store) -> None:
    """Restore the row invariant after positions moved: keep each slot whose tokens still sit
    at one consistent offset, seal the tokens of the others, recount live tokens."""
    spec: StoreSpec = store.spec
    pm = store.pos_map
    dense = is_dense(pm).nonzero().flatten()
    rows = pm[dense].long()
    bad = torch.zeros_like(dense, dtype=torch.bool)
    L = spec.slot_tokens
    for j in range(spec.slots):
        member = (rows >= j * L) & (rows < (j + 1) * L)
        starts = torch.unique(dense[member] - (rows[member] - j * L))
        if starts.numel() == 1 and int(starts[0]) >= 0:
            store.slots[j, 0] = int(starts[0])
        else:
            store.slots[j, 0] = -1
            bad |= member
    sink = rows >= spec.sink_row
    bad |= sink & (dense != rows - spec.sink_row)
    sealed = pm[is_sealed(pm)].long()
    store.segs[:, LIVE] = torch.bincount(slot_of(sealed), minlength=spec.segments) if sealed.numel() else 0
    if bool(bad.any()):
        where = dense[bad]
        values = [store.array("tail", p).index_select(-2, rows[bad].to(store.device)) for p in range(store.parts)]
        store._store_segment(where, values)
