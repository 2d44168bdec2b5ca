"""Writes opened ahead: a cache's token state moved to what its next write will leave, before it.

`cache.seal_ahead` runs the sealing part of a store's next write early (`Store.open_ahead`: seal
the oldest slot, give the freed slot to the positions the write will cover) while the device is
busy with another layer's attention. The write itself then only copies its rows. Until that
write arrives the change is provisional, and this module keeps what undoes it: a copy of the
store's host token state from before (``pos_map``, slots, codebook table, counters).

* The write it was made for (a full write of every part at the same positions, replayed as a
  copy by `store.replay_rows_write`) confirms it: the record is dropped and the codebook-fit check
  its seal left is settled then (`Store.settle_guard`), exactly where the write would have.
* Anything else that reaches the store first undoes it: the host state is put back as it was,
  and so are the centroids the early seal wrote over in a codebook slot that held some (a copy
  may still import that codebook by uid) and the cache's refusal flags (`seal_flags`). What else
  the seal wrote on the device sits where nothing reads it: codes at positions the token state
  says are dense again. Ops reach a store by building a `Store` (which undoes), through the
  replays (`store.replay_rows_write`, `read_fast.replay`, which ask `pending`), or, for code that
  copies or reads a cache's arrays whole, through `StoreHandle.settled`.

So every op sees the state it would have seen without the early seal, and results are the same
with or without it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from . import tally
from .spec import STAMP


@dataclass
class Opened:
    """A write opened ahead on the store whose ``pos_map`` is referenced: the host arrays
    (``pos_map``, slots, codebook table, counters) and their saved copies, the device arrays the early seal overwrote that something may still read
    (a codebook slot that held centroids) with their saved copies, the positions ``[start,
    start + n)`` the write will cover, the seal's pending codebook-fit check (`store._GuardCheck`
    or None), the tokens it sealed (for `tally`) and the cache's refusal flags before it
    (`SealFlags` and its state, or None)."""

    pos_map: weakref.ref
    arrays: tuple[np.ndarray, ...]
    saved: tuple[np.ndarray, ...]
    device: list[tuple[torch.Tensor, torch.Tensor]]
    start: int
    n: int
    guard: Any
    sealed: int
    flags: Any = None
    stamp: int = -1

    def current(self) -> bool:
        """Whether the store still holds the state the open left (its stamp): an array copied in
        behind the ops' back (a raw ``copy_``) makes the record stale, and it is dropped, not
        restored over the new content."""
        return int(self.arrays[3][STAMP]) == self.stamp

    def restore(self, undone: bool = True) -> None:
        """Put the store back as it was; ``undone``: count it in `tally` (an opened write undone,
        not one that failed while opening)."""
        for live, old in zip(self.arrays, self.saved):
            live[...] = old
        for live_t, old_t in self.device:
            live_t.copy_(old_t)
        if self.flags is not None:
            found, state = self.flags
            found.restore(state)
        if undone:
            tally.add(seals=-int(self.sealed > 0), sealed_tokens=-self.sealed, seals_undone=1)


# Opened writes by ``id(pos_map)``; a record whose weak reference is dead is ignored, and dropped
# once this many records are kept.
_opened: dict[int, Opened] = {}
PURGE_AT = 64

# Stores whose last opened write was undone, by ``id(pos_map)`` (`seal_ahead` stops opening them
# for a while: a model that, say, rolls its window before writing undoes every one).
undone: set[int] = set()

# Stores whose last write sealed their oldest slot and filled the freed one with fresh rows, by
# ``id(pos_map)`` -> ``(start, n)`` of that write: what a read learns the next store to open from.
just_sealed: dict[int, tuple[int, int]] = {}


def note_sealed(pos_map: torch.Tensor, start: int, n: int) -> None:
    """``pos_map``'s store just sealed a slot and wrote ``n`` fresh rows at ``start``."""
    if len(just_sealed) >= PURGE_AT:
        # Entries of stores no read has looked at since (never read, or dropped).
        just_sealed.clear()
    just_sealed[id(pos_map)] = (start, n)


def record(pos_map: torch.Tensor, opened: Opened) -> None:
    if len(_opened) >= PURGE_AT:
        for key in [key for key, found in _opened.items() if found.pos_map() is None]:
            del _opened[key]
    _opened[id(pos_map)] = opened


def pending(pos_map_id: int) -> bool:
    """Whether the store of ``pos_map`` (by id) has a write opened ahead (cheap: one lookup)."""
    return bool(_opened) and pos_map_id in _opened


def take(pos_map: torch.Tensor) -> Optional[Opened]:
    """The record opened ahead on ``pos_map``'s store, removed; None when there is none."""
    found = _opened.pop(id(pos_map), None)
    if found is None or found.pos_map() is not pos_map:
        return None
    return found


def undo(pos_map: torch.Tensor) -> bool:
    """Put ``pos_map``'s store back as it was before its opened write; False when none was open."""
    found = take(pos_map)
    if found is None or not found.current():
        return False
    found.restore()
    if len(undone) >= PURGE_AT:
        undone.clear()
    undone.add(id(pos_map))
    return True


def forget() -> None:
    """Drop every record (the stores keep their opened state: tests that start afresh)."""
    _opened.clear()
    just_sealed.clear()
    undone.clear()
