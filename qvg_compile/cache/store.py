"""`Store`: the run-time state machine of one compressed cache tensor.

It works on the real arrays of a `StoreSpec` (see there for the layout) and is what the bodies of
the ``qvg::cache_*`` ops run, eagerly or from a compiled graph, so every decision that depends
on positions (which slot a write lands in, when a slot is sealed, which codebook a segment uses)
is taken at run time and never becomes a guard of a compiled graph.

Token states (``pos_map``): a *hole* was never written and reads as zero; a *dense* token lives
in a row of the tail; a *sealed* token lives in the packed arrays and decodes with the codebook
of its slot. Invariant: dense row ``r < sink_row`` belongs to slot ``j = r // L`` and holds
position ``slots[j].start + r - j * L``; sink row ``r`` holds position ``r - sink_row``. So a row
holds at most one position and a position at most one row.

Writes (`write`): inside the span of a dense slot, the rows are rewritten (denoising steps); else
the write takes a free slot, or seals the ``seal_chunks`` oldest slots into one segment first.
Writes longer than a slot, and dense tokens relocated by a copy when no slot is free, are sealed
directly. Copies between caches (`copy_from`) move packed tokens as they are and share codebooks
by uid, so nothing already quantized is quantized again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import uuid
import weakref
from typing import Optional, Sequence

import numpy as np
import torch

from ..kernels.decode import OUT_DTYPES as DECODE_DTYPES
from ..kernels.decode import dequantize_store
from ..quant.segment import QVGSegment
from ..quant.packed import PackedStore
from . import ahead, tally
from .codec import lead_sel
from .encode import encode_segment
from .seal_flags import SealFlags, flags_for, known_flags
from .spec import (COUNTERS_AT, CSIZE, HOLE, LATEST, LIVE, NEXT_AGE, POS_MAP_AT, STAMP, UID, USES, StoreSpec,
                   is_dense, is_sealed, next_stamp, sealed_code, slot_of)

# (offset, length) of every leading dim; None selects all of them.
LeadSel = Optional[tuple[tuple[int, int], ...]]


def runs_of(positions: "torch.Tensor | np.ndarray") -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive values in host ints: ``(index, first value, length)``."""
    p = positions.numpy() if isinstance(positions, torch.Tensor) else positions
    n = p.size
    if n == 0:
        return []
    steps = np.diff(p) != 1
    if not steps.any():
        return [(0, int(p[0]), n)]
    bounds = [0, *(np.flatnonzero(steps) + 1).tolist(), n]
    first = p[bounds[:-1]].tolist()
    return [(a, f, b - a) for a, b, f in zip(bounds, bounds[1:], first)]


def masked_runs(positions: torch.Tensor, keep: torch.Tensor) -> list[tuple[int, int, int]]:
    """`runs_of` restricted to the entries where ``keep`` (host bool) is set: maximal runs that are
    consecutive both in index and in value, as ``(index, first value, length)``. Vectorised: a
    history of mostly unkept tokens costs a few tensor ops, not a Python step per token."""
    idx = keep.nonzero().flatten()
    if idx.numel() == 0:
        return []
    values = positions[idx]
    breaks = (((idx[1:] - idx[:-1]) != 1) | ((values[1:] - values[:-1]) != 1)).nonzero().flatten().add(1).tolist()
    bounds = [0, *breaks, idx.numel()]
    heads = torch.tensor(bounds[:-1])
    return [(i, f, b - a) for i, f, a, b in zip(idx[heads].tolist(), values[heads].tolist(), bounds, bounds[1:])]


# NumPy views of host arrays by tensor id. A `Store` is built afresh by every op call that
# plans, while its host arrays live as long as the cache: making each view once per array instead
# of once per call saves ~4 ATen ops per view (`numpy()` resolves conj/neg and aliases) on every
# sealing write.
_numpy_views: dict[int, tuple[weakref.ref, np.ndarray]] = {}


def host_numpy(t: torch.Tensor) -> np.ndarray:
    """The NumPy view of host tensor ``t`` (shares its memory), made once per tensor."""
    key = id(t)
    hit = _numpy_views.get(key)
    if hit is not None and hit[0]() is t:
        return hit[1]
    view = t.numpy()
    _numpy_views[key] = (weakref.ref(t, lambda _, key=key: _numpy_views.pop(key, None)), view)
    return view


def stamp_of(counters: torch.Tensor) -> int:
    """The state stamp in a store's host ``counters`` array (`Store.stamp` without a `Store`):
    read through its NumPy view, no ATen op on the read and rewrite paths."""
    return int(host_numpy(counters)[STAMP])


# Writes that landed inside an open slot without changing the token state, keyed by
# ``(id(pos_map), stamp, start, n)`` -> first tail row: the same write again (the next denoising
# step) is a plain copy of the rows (`replay_rows_write`). Stamps are unique in the process, so a
# key never matches another store or state.
_row_writes: dict[tuple[int, int, int, int], int] = {}
ROW_WRITES_SIZE = 4096


def sel_slices(sel: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
    """``((offset, length), ...)`` as the slices of the leading dims they select."""
    return tuple(slice(o, o + n) for o, n in sel)


def replay_rows_write(arrays: Sequence[torch.Tensor], values: Sequence[torch.Tensor], parts: Sequence[int],
                      start: int, lead: Sequence[int], spec: StoreSpec) -> bool:
    """``qvg::cache_write`` of ``values`` at ``[start, start + n)`` as a copy into the tail rows a
    write of the same positions found in the same token state, without building a `Store`;
    False (nothing written) when no such write is known. ``lead``: ``[o0, n0, o1, n1, ...]``."""
    if not values:
        return False
    n = values[0].shape[-2]
    pos_map = arrays[POS_MAP_AT]
    r0 = _row_writes.get((id(pos_map), stamp_of(arrays[COUNTERS_AT]), start, n))
    if r0 is None:
        return False
    sel = lead_sel(lead)
    opened = None
    if ahead.pending(id(pos_map)):
        if sel is not None or len(parts) != len(spec.part_dims):
            # Not the write it was opened for (a partial write fills the rest from the
            # positions' old content): the op builds a `Store`, which undoes it.
            return False
        opened = ahead.take(pos_map)
    for p, v in zip(parts, values):
        tail = arrays[spec.tail_at[p]]
        (tail if sel is None else tail[sel_slices(sel)])[..., r0:r0 + n, :].copy_(v)
    tally.fast_write()
    if opened is not None:
        ahead.note_sealed(pos_map, start, n)
        if opened.guard is not None:
            store = Store(spec, arrays)
            store._guard = opened.guard
            store.settle_guard()
    return True


# `residual_energy` of the tokens each codebook was fitted to, by codebook uid (0-dim device
# tensors, never read on their own): the reference a later segment's fit is judged against.
_creator_fit: dict[int, torch.Tensor] = {}
CREATOR_FITS_SIZE = 4096


def new_uid() -> int:
    """A random 62-bit codebook id: unique across caches, processes and saved files."""
    return uuid.uuid4().int >> 66


def _host_view(name: str) -> functools.cached_property:
    """A `Store` attribute: the NumPy view of host array ``name``."""
    return functools.cached_property(lambda self: host_numpy(self.arrays[name]))


class Store:
    """The arrays of one store and the algorithms over them. ``arrays`` in `StoreSpec.names` order."""

    def __init__(self, spec: StoreSpec, arrays: Sequence[torch.Tensor]) -> None:
        names = spec.names()
        if len(arrays) != len(names):
            raise ValueError(f"arrays: expected {len(names)} arrays {names}, got {len(arrays)}")
        self.spec = spec
        self.arrays = dict(zip(names, arrays))
        self.pos_map = self.arrays["pos_map"]
        self.slots = self.arrays["slots"]
        self.segs = self.arrays["segs"]
        self.counters = self.arrays["counters"]
        self.seg_ids = self.arrays["seg_ids"]
        self.lead = tuple(self.arrays["codes0"].shape[:-2])
        self.capacity = self.pos_map.shape[0]
        self.sinks = min(spec.sinks, self.capacity)
        self._guard: Optional[_GuardCheck] = None
        self._defer_guards = False
        # While a write is opened ahead (`open_ahead`): its record, which keeps what the seal
        # overwrites that an undo must put back.
        self._opening: Optional[ahead.Opened] = None
        if ahead.pending(id(self.pos_map)):
            ahead.undo(self.pos_map)

    # NumPy views of the host state (same memory), made when first used: the bookkeeping of a
    # write that moves rows or seals is dozens of scalar reads and small updates, well under a
    # microsecond each on an array against 3-8 us as tensor ops. Reads and rewrites of the open
    # rows never need them (making one costs four tensor ops).
    np_pos = _host_view("pos_map")
    np_slots = _host_view("slots")
    np_segs = _host_view("segs")
    np_counters = _host_view("counters")

    @property
    def device(self) -> torch.device:
        return self.arrays["codes0"].device

    @property
    def parts(self) -> int:
        return len(self.spec.part_dims)

    def array(self, name: str, part: int) -> torch.Tensor:
        return self.arrays[f"{name}{part}"]

    def part_arrays(self, part: int) -> tuple[torch.Tensor, ...]:
        """The arrays a read of ``part`` touches (its packed arrays and tail, and ``seg_ids``)."""
        return (*(self.arrays[n] for n in self.spec.part_names(part)), self.seg_ids)

    # --- indexing helpers ----------------------------------------------------------------------
    def _lead(self, sel: LeadSel) -> tuple[slice, ...]:
        if sel is None:
            return tuple(slice(None) for _ in self.lead)
        return sel_slices(sel)

    def rows_view(self, part: int, sel: LeadSel) -> torch.Tensor:
        return self.array("tail", part)[self._lead(sel)]

    def _age(self) -> int:
        age = int(self.np_counters[NEXT_AGE])
        self.np_counters[NEXT_AGE] = age + 1
        return age

    @property
    def stamp(self) -> int:
        """The token state's stamp: equal stamps mean an unchanged ``pos_map``."""
        return stamp_of(self.counters)

    def changed(self) -> None:
        """Record that ``pos_map`` changed (every method that writes it calls this)."""
        self.np_counters[STAMP] = next_stamp()

    def _expected_row(self, j: int, start: int, end: int) -> np.ndarray:
        """The tail rows of positions ``[start, end)`` in slot ``j`` (``pos_map``'s dtype)."""
        offset = j * self.spec.slot_tokens - int(self.np_slots[j, 0])
        return np.arange(start + offset, end + offset, dtype=self.np_pos.dtype)

    # --- release and state ---------------------------------------------------------------------
    def release(self, positions: "torch.Tensor | np.ndarray") -> None:
        """Forget what ``positions`` (host int64) hold: they become holes; codebooks lose them."""
        pos = positions.numpy() if isinstance(positions, torch.Tensor) else positions
        if pos.size == 0:
            return
        v = self.np_pos[pos]
        sealed = is_sealed(v)
        if sealed.any():
            slots = slot_of(v[sealed].astype(np.int64))
            self.np_segs[:, LIVE] -= np.bincount(slots, minlength=self.spec.segments)
        self.np_pos[pos] = HOLE
        self.changed()
        flags = known_flags(self.pos_map)
        if flags is not None and flags.published and not self.np_segs[:, LIVE].any():
            flags.clear()  # the refused tokens are gone with the rest

    def reset(self) -> None:
        """Every token a hole, every slot and codebook free (the codebook arrays are left as
        they are: they are only read through a live slot)."""
        self.pos_map.fill_(HOLE)
        self.changed()
        flags = known_flags(self.pos_map)
        if flags is not None:
            flags.clear()
        self.slots[:, 0] = -1
        self.segs.zero_()
        self.counters[LATEST] = -1

    # --- writes --------------------------------------------------------------------------------
    def write(self, start: int, values: Sequence[Optional[torch.Tensor]], sel: LeadSel = None,
              relocate: bool = False) -> None:
        """Dense semantics of writing ``values[p]`` ``[*lead(sel), n, D_p]`` (None: part untouched)
        at positions ``[start, start + n)``.

        ``relocate``: the values are dense tokens copied from another place of a cache; when no
        slot covers them and none is free they are sealed where they land instead of evicting
        (sealing) the slot being written.

        The codebook-fit check of a seal onto a shared codebook is read back at the end of the
        write (`settle_guard`), not right after its encode (on the GPU, a wait for it).
        """
        self._defer_guards = True
        try:
            self._write(start, values, sel, relocate)
        finally:
            self._defer_guards = False
        self.settle_guard()

    def _write(self, start: int, values: Sequence[Optional[torch.Tensor]], sel: LeadSel, relocate: bool) -> None:
        present = [v for v in values if v is not None]
        if not present:
            return
        n = present[0].shape[-2]
        end = start + n
        if not 0 <= start <= end <= self.capacity:
            raise IndexError(f"QVGCache: write of positions [{start}, {end}) into a cache of "
                             f"{self.capacity} tokens")
        if n == 0:
            return
        first = start
        full = sel is None and len(present) == self.parts
        dtype = self.spec.torch_dtype
        values = [v if v is None or (v.device == self.device and v.dtype == dtype) else v.to(self.device, dtype)
                  for v in values]
        sinks = self.sinks
        if start < sinks:
            e = min(end, sinks)
            rows = np.arange(start + self.spec.sink_row, e + self.spec.sink_row, dtype=self.np_pos.dtype)
            self._write_rows(start, e, rows, [None if v is None else v[..., :e - start, :] for v in values],
                             sel, full)
            values = [None if v is None else v[..., e - start:, :] for v in values]
            start = e
        if start >= end:
            return
        j = self._slot_covering(start, end)
        if j is None:
            if not self.spec.slots or end - start > self.spec.slot_tokens or (
                    relocate and not (self.np_slots[:, 0] < 0).any()):
                self._seal_direct(start, end, values, sel, full)
                return
            sealing = not (self.np_slots[:, 0] < 0).any()
            j = self._take_slot()
            self.np_slots[j] = (start, self._age())
            if sealing and full and start == first and not relocate:
                ahead.note_sealed(self.pos_map, start, n)
        rows = self._expected_row(j, start, end)
        self._write_rows(start, end, rows, values, sel, full)
        if start == first and not relocate:
            self._remember_rows(start, n, int(rows[0]))

    def _remember_rows(self, start: int, n: int, r0: int) -> None:
        """The next write of ``n`` tokens at ``start`` in the current state is a copy to rows ``r0``."""
        if len(_row_writes) >= ROW_WRITES_SIZE:
            _row_writes.clear()
        _row_writes[(id(self.pos_map), self.stamp, start, n)] = r0

    def open_ahead(self, start: int, n: int) -> bool:
        """Leave the token state as a full write of ``n`` tokens at ``start`` (every part, every
        leading index) that seals a slot will leave it, without its values: seal the oldest slot,
        give it to ``[start, start + n)``; the write itself then replays as a copy of its rows
        (`replay_rows_write`), and the seal's codebook-fit check waits for it. Provisional until
        then (`ahead`). Returns False, changing nothing, unless the write would seal: no free slot,
        the positions fresh (holes) past the sinks and covered by no slot, at most a slot long."""
        end = start + n
        slots = self.np_slots
        if (not self.spec.slots or not 0 < n <= self.spec.slot_tokens or start < self.sinks or end > self.capacity
                or (slots[:, 0] < 0).any() or self._slot_covering(start, end) is not None
                or not (self.np_pos[start:end] == HOLE).all()):
            return False
        live = (self.np_pos, self.np_slots, self.np_segs, self.np_counters)
        saved = tuple(a.copy() for a in live)
        before = int(self.np_segs[:, LIVE].sum())
        flags = known_flags(self.pos_map)
        opened = ahead.Opened(weakref.ref(self.pos_map), live, saved, [], start, n, None, 0,
                              None if flags is None else (flags, flags.state()))
        self._defer_guards = True
        self._opening = opened
        try:
            j = self._take_slot()
        except Exception:  # noqa: BLE001 - whatever the seal raises, its own write raises it again
            opened.restore(undone=False)
            return False
        finally:
            self._defer_guards = False
            self._opening = None
        slots[j] = (start, self._age())
        rows = self._expected_row(j, start, end)
        self.np_pos[start:end] = rows
        self.changed()
        self._remember_rows(start, n, int(rows[0]))
        opened.guard, opened.sealed, opened.stamp = self._guard, int(self.np_segs[:, LIVE].sum()) - before, self.stamp
        ahead.record(self.pos_map, opened)
        self._guard = None
        tally.add(seals_ahead=1)
        return True

    def _slot_covering(self, start: int, end: int) -> Optional[int]:
        first = self.np_slots[:, 0]
        ok = (first >= 0) & (first <= start) & (first + self.spec.slot_tokens >= end)
        hits = np.flatnonzero(ok)
        return int(hits[0]) if hits.size else None

    def _write_rows(self, start: int, end: int, rows: np.ndarray,
                    values: Sequence[Optional[torch.Tensor]], sel: LeadSel, full: bool) -> None:
        held = self.np_pos[start:end]
        moving = held != rows
        if full and (held == HOLE).all():
            # A fresh chunk (every write that follows a seal): no release, no index arrays.
            held[:] = rows
            self.changed()
        elif moving.any():
            positions = np.flatnonzero(moving) + start
            if not full:
                # Rows are shared by every leading index and part: fill the ones this write does
                # not cover with what those positions hold now.
                target = torch.from_numpy(rows[moving].astype(np.int64)).to(self.device)
                for p, old in enumerate(self.decode(torch.from_numpy(positions))):
                    self.array("tail", p).index_copy_(-2, target, old)
            self.release(positions)
            self.np_pos[positions] = rows[moving]
            self.changed()
        r0 = int(rows[0])
        for p, v in enumerate(values):
            if v is not None:
                self.rows_view(p, sel)[..., r0:r0 + (end - start), :] = v

    def _rows(self, part: int, rows: "torch.Tensor | np.ndarray") -> torch.Tensor:
        """Tail rows ``rows`` (host int64) of ``part``: a view when they are consecutive, else copied
        by runs (a host index moved to the device would wait for the device to drain). Read at once
        by the encoder, in stream order before any later write of those rows: no copy needed."""
        tail = self.array("tail", part)
        runs = runs_of(rows)
        if len(runs) == 1:
            return tail[..., runs[0][1]:runs[0][1] + runs[0][2], :]
        return torch.cat([tail[..., r:r + n, :] for _, r, n in runs], dim=-2)

    def _take_slot(self) -> int:
        free = np.flatnonzero(self.np_slots[:, 0] < 0)
        if free.size:
            return int(free[0])
        oldest = np.argsort(self.np_slots[:, 1], kind="stable")[: self.spec.policy.seal_chunks].tolist()
        self._seal_slots(oldest)
        return oldest[0]

    def _slot_positions(self, j: int) -> np.ndarray:
        """The positions slot ``j`` still holds (int64, ascending)."""
        first, L = int(self.np_slots[j, 0]), self.spec.slot_tokens
        end = min(first + L, self.capacity)
        held = self.np_pos[first:end] == self._expected_row(j, first, end)
        if held.all():
            return np.arange(first, end, dtype=np.int64)
        return np.flatnonzero(held) + first

    def _check_finite(self, values: Sequence[torch.Tensor]) -> None:
        """The math layer's NaN/Inf policy, applied when tokens are sealed and before any state
        changes, so a failing seal leaves the cache as it was. Checking here rather than on every
        write keeps the denoising writes free of a device-to-host sync."""
        if self.spec.config.check_finite and not all(bool(torch.isfinite(v).all()) for v in values):
            raise ValueError("QVGCache: tokens about to be quantized contain NaN or Inf (written since "
                             "the last seal); one would poison a whole codebook. The cache is unchanged; "
                             "QVGConfig(check_finite=False) stores them anyway")

    def _seal_slots(self, slots: list[int]) -> None:
        held = [self._slot_positions(j) for j in slots]
        positions = held[0] if len(held) == 1 else np.sort(np.concatenate(held))
        if positions.size:
            # The encoder applies the NaN/Inf policy itself (see `seal_flags`): no check here.
            rows = self.np_pos[positions].astype(np.int64)
            self._store_segment(positions, [self._rows(p, rows) for p in range(self.parts)])
        for j in slots:
            self.np_slots[j, 0] = -1

    def seal_all(self) -> None:
        """Seal every dense slot now (end of a video; sinks stay dense)."""
        occupied = np.flatnonzero(self.np_slots[:, 0] >= 0)
        order = occupied[np.argsort(self.np_slots[occupied, 1], kind="stable")].tolist()
        group = self.spec.policy.seal_chunks
        for i in range(0, len(order), group):
            self._seal_slots(order[i:i + group])
        flags = known_flags(self.pos_map)
        if flags is not None:
            flags.check(self.spec.config, wait=True)

    def _seal_direct(self, start: int, end: int, values: Sequence[Optional[torch.Tensor]],
                     sel: LeadSel, full: bool) -> None:
        positions = torch.arange(start, end)
        if not full:
            current = self.decode(positions)
            for p, v in enumerate(values):
                if v is not None:
                    current[p][self._lead(sel)] = v
            values = current
        self._check_finite([v for v in values if v is not None])
        self.release(positions)
        piece = self.spec.segment_tokens or (end - start)
        for a in range(start, end, piece):
            b = min(end, a + piece)
            self._store_segment(torch.arange(a, b), [v[..., a - start:b - start, :] for v in values])

    # --- segments and codebooks ----------------------------------------------------------------
    def _choose_codebook(self, n: int) -> tuple[int, int, bool, Optional[int]]:
        """(slot, C, shared, warm-start slot) for a new segment of ``n`` tokens."""
        segs = self.np_segs
        latest = int(self.np_counters[LATEST])
        policy = self.spec.policy
        has_latest = latest >= 0 and int(segs[latest, CSIZE]) > 0
        if has_latest and policy.codebook_chunks > 1 and int(segs[latest, USES]) < policy.codebook_chunks:
            return latest, int(segs[latest, CSIZE]), True, None
        free = self._free_slot(latest if has_latest else -1)
        if free is not None:
            slot = free
            c = min(self.spec.codebook, policy.codebook_size(self.spec.config, n))
            warm = latest if (policy.warm_start and has_latest and self.spec.stages
                              and int(segs[latest, CSIZE]) == c) else None
            return slot, c, False, warm
        if not has_latest:
            # Every slot holds a codebook imported by a copy: share one of them.
            coded = np.flatnonzero(segs[:, CSIZE] > 0)
            if not coded.size:
                raise RuntimeError("QVGCache: no codebook slot (the store was sized with segments=0)")
            latest = int(coded[-1])
        return latest, int(segs[latest, CSIZE]), True, None

    def _free_slot(self, latest: int) -> Optional[int]:
        """A codebook slot holding no live token, other than ``latest`` (the warm start, or the
        codebook a segment is about to share) unless it is the only one; None when none is free."""
        free = self.np_segs[:, LIVE] == 0
        if latest >= 0 and free.sum() > 1:
            free[latest] = False
        choices = np.flatnonzero(free)
        return int(choices[0]) if choices.size else None

    def _store_segment(self, positions: "torch.Tensor | np.ndarray", xs: Sequence[torch.Tensor]) -> None:
        """Quantize ``xs[p]`` ``[*lead, n, D_p]`` as the tokens at ``positions`` (host, ascending).
        The token state changes only once every part is encoded, so on the CPU an input the
        encoder refuses (NaN/Inf under ``check_finite``, scales out of range) leaves the store
        unchanged; on the GPU the refusal is read back later (`seal_flags`). A segment that would
        share a codebook it does not fit (``policy.share_fit``) is encoded again with its own."""
        n = len(positions)
        cuda = self.device.type == "cuda"
        flags = flags_for(self.pos_map, self.device) if cuda else None
        if flags is not None:
            flags.check(self.spec.config)
        self.settle_guard()
        slot, c, shared, warm = self._choose_codebook(n)
        runs = runs_of(positions)
        policy = self.spec.policy
        guard = policy.share_fit is not None and policy.codebook_chunks > 1
        fits = self._encode_parts(runs, xs, slot, c, shared, warm, flags, fit=guard)
        creator = _creator_fit.get(int(self.np_segs[slot, UID])) if shared and fits else None
        own = self._free_slot(slot) if creator is not None else None
        if own is None:
            self._commit_segment(runs, n, slot, c, shared, fits)
            return
        check = _GuardCheck(runs, n, slot, own, _worst(fits), creator, xs, flags)
        if self._defer_guards:
            # On the GPU, reading the fit back waits for the encode: leave it to the end of the
            # write, when the host has done the rest of its work and the device has caught up
            # (on every device, so that the CPU runs the same path). The write reuses the rows
            # being sealed, so the tokens are kept for a misfit's second encode.
            check.xs = [x.clone() for x in xs]
            self._commit_segment(runs, n, slot, c, True, fits)
            self._guard = check
            return
        if self._misfit(check):
            self._encode_own(check)
        else:
            self._commit_segment(runs, n, slot, c, True, fits)

    def settle_guard(self) -> None:
        """Decide a seal's deferred codebook-fit check (the one host read of a shared seal, a sync
        on the GPU): a segment its shared codebook does not fit is encoded again with its own."""
        check, self._guard = self._guard, None
        if check is None or not self._misfit(check):
            return
        segs = self.np_segs
        segs[check.slot, USES] -= 1
        segs[check.slot, LIVE] -= check.n
        self._encode_own(check, count=False)

    def _misfit(self, check: "_GuardCheck") -> bool:
        shared_fit, made_fit = torch.stack([check.fit, check.creator]).tolist()
        return shared_fit > self.spec.policy.share_fit * made_fit

    def _encode_own(self, check: "_GuardCheck", count: bool = True) -> None:
        c = min(self.spec.codebook, self.spec.policy.codebook_size(self.spec.config, check.n))
        fits = self._encode_parts(check.runs, check.xs, check.own, c, False, None, check.flags, fit=True)
        tally.add(share_misfits=1)
        self._commit_segment(check.runs, check.n, check.own, c, False, fits, count)

    def _commit_segment(self, runs: list[tuple[int, int, int]], n: int, slot: int, c: int, shared: bool,
                        fits: list[torch.Tensor], count: bool = True) -> None:
        """The token state of a segment of ``n`` tokens at ``runs`` just encoded with codebook
        ``slot`` (of ``c`` centroids; new unless ``shared``); ``count``: a seal for `tally`
        (not when a deferred check moves a counted segment to its own codebook)."""
        if not shared:
            uid = new_uid()
            self.np_segs[slot] = (0, c, uid, 0)
            self.np_counters[LATEST] = slot
            if fits:
                if len(_creator_fit) >= CREATOR_FITS_SIZE:
                    # The oldest goes: a codebook is only shared by the segments sealed right
                    # after it (and a write opened ahead must not change which fits are known).
                    del _creator_fit[next(iter(_creator_fit))]
                _creator_fit[uid] = _worst(fits)
        self.np_segs[slot, USES] += 1
        self.np_segs[slot, LIVE] += n
        for _, first, length in runs:
            self.np_pos[first:first + length] = sealed_code(slot)
            self.seg_ids[first:first + length] = slot
        self.changed()
        if count:
            tally.add(seals=1, sealed_tokens=n)

    def _encode_parts(self, runs: list[tuple[int, int, int]], xs: Sequence[torch.Tensor], slot: int, c: int,
                      shared: bool, warm: Optional[int], flags, fit: bool) -> list[torch.Tensor]:
        """Encode every part's tokens with codebook ``slot`` (``c`` centroids; its own or, with
        ``shared``, the one already there) and write them at ``runs``; with ``fit``, return each
        part's `residual_energy` (0-dim device tensors)."""
        lead = len(self.lead)
        n = sum(length for _, _, length in runs)
        fits = []
        for p, x in enumerate(xs):
            cents = self.array("cents", p)
            init = None
            if shared:
                init = cents[slot, ..., :c, :]
            elif warm is not None:
                init = cents[warm, ..., :c, :]
            # A shared codebook may have more centroids than this segment has tokens: the encoder
            # needs C <= n, and assignment is per token, so tile the tokens (the whole run again,
            # not each token repeated in place) and keep the first n: the original tokens.
            xp = x if not shared or n >= c else torch.cat([x] * math.ceil(c / n), dim=-2)
            try:
                # The fit over tiled tokens is the fit over x: every copy of the run is whole.
                seg, summary, energy = encode_segment(xp, self.spec.config, self.spec.roles[p], c, init, shared,
                                                      tag=p, fit=fit)
            except ValueError as err:
                raise ValueError(f"QVGCache: the tokens being sealed cannot be quantized; the cache is "
                                 f"unchanged ({err})") from err
            if xp is not x:
                seg = _first_tokens(seg, n)
            # Copied out at once: a replayed encode's outputs are reused by the next one. One
            # foreach call for all of them: five slicing assignments cost ~200 us of host per seal
            # on the GPU's host, where the model waits for it.
            dsts, srcs = [], []
            if fit:
                dsts.append(torch.empty_like(energy))
                srcs.append(energy)
                fits.append(dsts[-1])
            if not shared:
                if self._opening is not None and int(self.np_segs[slot, CSIZE]) > 0:
                    # The slot holds no live token, but a copy may still import its codebook by
                    # uid: an undo must find the centroids that were there.
                    self._opening.device.append((cents[slot], cents[slot].clone()))
                dsts.append(cents[slot].narrow(-2, 0, c))
                srcs.append(seg.centroids)
            for i, first, length in runs:
                for name, out in (("codes", seg.codes), ("scales", seg.scales), ("zeros", seg.zeros)):
                    if out is not None:
                        dsts.append(self.array(name, p).narrow(-2, first, length))
                        srcs.append(out.narrow(-2, i, length))
                dsts.append(self.array("assign", p).narrow(lead + 1, first, length))
                srcs.append(seg.assignments.narrow(lead + 1, i, length))
            torch._foreach_copy_(dsts, srcs)
            if flags is not None:
                flags.add(summary)
        return fits

    # --- reads ---------------------------------------------------------------------------------
    def packed(self, part: int, sel: LeadSel = None) -> PackedStore:
        """The sealed tokens of ``part`` as the kernels' `PackedStore` (``[B, H, cap, ...]``
        views, no copy; stores whose lead is not 2-D are viewed as ``[prod(lead[:-1]), lead[-1]]``)."""
        lead = self.lead
        ix = self._lead(sel)
        codes, scales = self.array("codes", part)[ix], self.array("scales", part)[ix]
        mode = self.spec.config.code_mode_for(self.spec.roles[part])
        zeros = self.array("zeros", part)[ix] if mode == "asymmetric" else None
        assign = self.array("assign", part)[(slice(None), *ix)]
        cents = self.array("cents", part)[(slice(None), slice(None), *ix)]
        if len(lead) != 2:
            shape = codes.shape[:-2]
            b, h = (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)
            codes, scales = codes.reshape(b, h, *codes.shape[-2:]), scales.reshape(b, h, *scales.shape[-2:])
            zeros = None if zeros is None else zeros.reshape(b, h, *zeros.shape[-2:])
            assign = assign.reshape(assign.shape[0], b, h, assign.shape[-1])
            cents = cents.reshape(*cents.shape[:2], b, h, *cents.shape[-2:])
        return PackedStore(codes, scales, zeros, assign, cents, self.seg_ids,
                           self.spec.bits(part), self.spec.config.group_size, mode)

    def decode(self, positions: torch.Tensor, parts: Optional[Sequence[int]] = None,
               sel: LeadSel = None) -> list[torch.Tensor]:
        """Dense values ``[*lead(sel), n, D_p]`` (cache dtype) of ``positions`` (host int64), per part."""
        parts = range(self.parts) if parts is None else parts
        n = positions.numel()
        v = self.pos_map[positions].long() if n else torch.empty(0, dtype=torch.long)
        sealed = is_sealed(v)
        runs = masked_runs(positions, sealed)
        # Dense rows come in runs too (a slot holds consecutive positions): copying slices avoids
        # moving host index tensors to the device, which would wait for the GPU to drain.
        dense_runs = masked_runs(v, is_dense(v))
        out = []
        for p in parts:
            tail = self.rows_view(p, sel)
            x = torch.zeros(*tail.shape[:-2], n, tail.shape[-1], dtype=tail.dtype, device=self.device)
            for i, row, length in dense_runs:
                x[..., i:i + length, :] = tail[..., row:row + length, :]
            store = self.packed(p, sel) if runs else None
            for i, first, length in runs:
                # The decoder writes 16/32-bit floats; float64 caches decode in fp32 and widen.
                block = dequantize_store(store, first, first + length,
                                         x.dtype if x.dtype in DECODE_DTYPES else torch.float32)
                x[..., i:i + length, :] = block.reshape(*x.shape[:-2], length, x.shape[-1])
            out.append(x)
        decoded = int(sealed.sum())
        tally.add(decoded_tokens=decoded, decoded_bytes=sum(t.numel() * t.element_size() for t in out))
        return out

    # --- copies between caches -----------------------------------------------------------------
    def copy_from(self, start: int, src: "Store", positions: torch.Tensor) -> None:
        """Dense semantics of ``self[start:start+n] = src[positions]`` (host int64, n of them), for
        stores of the same layout: packed tokens move as they are (codebooks shared by uid), dense
        tokens are written as relocated dense values, holes stay holes."""
        n = positions.numel()
        dst = torch.arange(start, start + n)
        if not 0 <= start <= start + n <= self.capacity:
            raise IndexError(f"QVGCache: copy into positions [{start}, {start + n}) of a cache of "
                             f"{self.capacity} tokens")
        same = src is self
        if same:
            if torch.equal(positions, dst):
                return
            if bool(torch.isin(positions, dst).any()):
                raise RuntimeError("unsupported operation: some elements of the input tensor and the "
                                   "written-to tensor refer to a single memory location. Please clone() "
                                   "the tensor before performing the operation.")
        v = src.pos_map[positions].long()
        sealed, dense = is_sealed(v), is_dense(v)
        sp, sk = positions[sealed], slot_of(v[sealed])
        payload = [src._packed_rows(p, sp) for p in range(self.parts)]
        rows = v[dense].to(src.device)
        relocated = [src.array("tail", p).index_select(-2, rows).to(self.device) for p in range(self.parts)]
        self.release(dst)
        kmap: dict[int, Optional[int]] = {}
        for k in torch.unique(sk).tolist():
            # Slots taken by this copy's earlier imports are not free yet (LIVE is bumped below).
            kmap[k] = k if same else self._import_codebook(src, k, taken=[s for s in kmap.values() if s is not None])
        # Tokens whose codebook finds no free slot here are decoded and written as dense values.
        lut = torch.full((max(src.spec.segments, 1),), -1, dtype=torch.long)
        for k, slot in kmap.items():
            lut[k] = -1 if slot is None else slot
        mapped = lut[sk]
        lost = mapped < 0
        keep = (~lost).nonzero().flatten()
        if keep.numel():
            dp = dst[sealed][keep]
            slots = mapped[keep]
            for p in range(self.parts):
                idx = keep.to(src.device)
                self._put_packed_rows(p, dp, [t.index_select(t.dim() - 2 if i < len(payload[p]) - 1 else -1, idx)
                                              for i, t in enumerate(payload[p])])
            self.pos_map[dp] = sealed_code(slots).to(self.pos_map.dtype)
            self.changed()
            self.seg_ids.index_copy_(0, dp.to(self.device), slots.to(device=self.device, dtype=self.seg_ids.dtype))
            self.segs[:, LIVE] += torch.bincount(slots, minlength=self.spec.segments)
        moved = [(dst[dense], relocated)]
        if bool(lost.any()):
            moved.append((dst[sealed][lost], src.decode(sp[lost])))
        for where, values in moved:
            for i, first, length in runs_of(where):
                self.write(first, [x[..., i:i + length, :] for x in values], relocate=True)

    def _packed_rows(self, part: int, positions: torch.Tensor) -> list[torch.Tensor]:
        """Copies of codes, scales, (zeros,) assignments of the tokens at ``positions``."""
        idx = positions.to(self.device)
        out = [self.array("codes", part).index_select(-2, idx), self.array("scales", part).index_select(-2, idx)]
        if self.spec.has_zeros:
            out.append(self.array("zeros", part).index_select(-2, idx))
        out.append(self.array("assign", part).index_select(-1, idx))
        return out

    def _put_packed_rows(self, part: int, positions: torch.Tensor, rows: list[torch.Tensor]) -> None:
        """Inverse of `_packed_rows`: write codes, scales, (zeros,) assignments at ``positions``."""
        idx = positions.to(self.device)
        names = ["codes", "scales"] + (["zeros"] if self.spec.has_zeros else [])
        for name, t in zip(names, rows):
            # index_copy_ has no FP8 kernel on CPU: move the scales as raw bytes.
            as_bytes(self.array(name, part)).index_copy_(-2, idx, as_bytes(t.to(self.device)))
        self.array("assign", part).index_copy_(-1, idx, rows[-1].to(self.device))

    def _import_codebook(self, src: "Store", k: int, taken: Sequence[int] = ()) -> Optional[int]:
        """This store's slot holding ``src``'s codebook ``k`` (copied in if needed, never into a
        slot of ``taken``), or None."""
        uid = int(src.segs[k, UID])
        match = ((self.segs[:, UID] == uid) & (self.segs[:, CSIZE] > 0)).nonzero().flatten()
        if match.numel():
            return int(match[0])
        free = (self.segs[:, LIVE] == 0)
        free[list(taken)] = False
        latest = int(self.counters[LATEST])
        if latest >= 0 and bool(free.sum() > 1):
            free[latest] = False
        choices = free.nonzero().flatten()
        if not choices.numel():
            return None
        slot, c = int(choices[0]), int(src.segs[k, CSIZE])
        for p in range(self.parts):
            self.array("cents", p)[slot, ..., :c, :] = src.array("cents", p)[k, ..., :c, :].to(self.device)
        self.segs[slot] = src.segs[k]
        self.segs[slot, LIVE] = 0
        if int(self.counters[LATEST]) < 0:
            self.counters[LATEST] = slot
        return slot

    # --- whole-store conversions ---------------------------------------------------------------
    def load_dense(self, values: Sequence[torch.Tensor]) -> None:
        """Replace the content by ``values[p]`` ``[*lead, capacity, D_p]``: tokens up to the last
        non-zero one count as written; the last slot's worth stays dense (when the slot length is
        known), sinks stay dense, the rest is sealed in segments of `segment_tokens`."""
        self.reset()
        written = torch.zeros(self.capacity, dtype=torch.bool)
        for v in values:
            nz = v.ne(0).reshape(-1, v.shape[-2], v.shape[-1]).any(-1).any(0)
            written |= nz.cpu()
        hits = written.nonzero()
        w = int(hits[-1]) + 1 if hits.numel() else 0
        sinks = min(self.sinks, w)
        if sinks:
            self.write(0, [v[..., :sinks, :] for v in values])
        L = self.spec.slot_tokens
        keep = max(sinks, w - L) if L else w
        if keep > sinks:
            self._seal_direct(sinks, keep, [v[..., sinks:keep, :] for v in values], None, True)
        if w > keep:
            self.write(keep, [v[..., keep:w, :] for v in values])


@dataclasses.dataclass
class _GuardCheck:
    """A seal onto shared codebook ``slot`` whose fit is not read yet: ``n`` tokens at ``runs``,
    their parts ``xs``, its fit and its codebook's fit at creation (0-dim device tensors), and the
    free codebook slot ``own`` it moves to if the codebook does not fit them."""
    runs: list[tuple[int, int, int]]
    n: int
    slot: int
    own: int
    fit: torch.Tensor
    creator: torch.Tensor
    xs: Sequence[torch.Tensor]
    flags: Optional[SealFlags]


def _worst(fits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The largest of the parts' fits (0-dim device tensors); one part's is itself."""
    return fits[0] if len(fits) == 1 else torch.stack(fits).max()


def regrow(store: Store, spec: StoreSpec) -> list[torch.Tensor]:
    """Arrays for ``spec`` (other slots, more codebooks or centroid rows than ``store.spec``)
    holding the same content: arrays of unchanged shape and dtype are taken over, codebooks and
    sink rows are copied; dense slots must be empty when the slot length changes."""
    old = store.spec
    if bool((store.slots[:, 0] >= 0).any()) and old.slot_tokens != spec.slot_tokens:
        raise RuntimeError("QVGCache: cannot change the slot length while slots hold dense tokens")
    kept = [n for n in old.names() if n.startswith(("codes", "scales", "zeros", "assign"))
            or n in ("seg_ids", "pos_map", "counters")]
    arrays = spec.allocate(store.lead, store.capacity, store.device,
                           reuse={n: store.arrays[n] for n in kept})
    new = Store(spec, arrays)
    for name in spec.names():
        if name in ("seg_ids", "pos_map", "counters") and new.arrays[name] is not store.arrays[name]:
            new.arrays[name].copy_(store.arrays[name])
    k, c = old.segments, old.codebook
    new.segs[:k] = store.segs
    for p in range(store.parts):
        new.array("cents", p)[:k, ..., :c, :] = store.array("cents", p)
        new.array("tail", p)[..., spec.sink_row:spec.sink_row + store.sinks, :] = \
            store.array("tail", p)[..., old.sink_row:old.sink_row + store.sinks, :]
    sink = (store.pos_map >= old.sink_row) & (store.pos_map < old.sink_row + store.sinks)
    new.pos_map[sink] += spec.sink_row - old.sink_row
    new.changed()
    if old.slot_tokens == spec.slot_tokens and old.slots:
        new.slots.copy_(store.slots)
        for p in range(store.parts):
            new.array("tail", p)[..., :old.sink_row, :] = store.array("tail", p)[..., :old.sink_row, :]
    return arrays


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as uint8 when it is a one-byte float (copies of FP8 scales)."""
    return t.view(torch.uint8) if t.dtype.is_floating_point and t.element_size() == 1 else t


def _first_tokens(seg: QVGSegment, n: int) -> QVGSegment:
    return dataclasses.replace(
        seg, codes=seg.codes[..., :n, :], scales=seg.scales[..., :n, :],
        zeros=None if seg.zeros is None else seg.zeros[..., :n, :],
        assignments=seg.assignments[..., :n])
