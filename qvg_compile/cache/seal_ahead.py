"""Seal ahead: the next layer's sealing write and read plan, done while this layer's attention runs.

An AR video model seals one chunk per cache at the first write of the next chunk, layer after
layer, and reads right after. A model that reads a scalar back at every layer (Self-Forcing's
``.item()`` of the cache's end index) leaves the device idle while the host runs that write (the
seal's bookkeeping, its encode's launch, copies) and builds the new state's read plan: ~2-3 ms of
host per layer and chunk on the H200's host, with nothing queued to hide it.

Reads and seals come in the same order every chunk. So a read whose K and V stores were both just
sealed (a *sealing read*) records itself as the successor of the previous sealing read. When
the same read comes again, once its attention is launched (the device now has milliseconds of
work queued), it opens the next write of its successor's stores ahead (`Store.open_ahead`: the
seal, and the freed slot given to the same positions its own write just covered), builds the
read plan of the state that leaves and binds the plan's gather. The successor's write is then a
copy of its rows and its read a replay. `cache.ahead` undoes an opened write that anything
other than its write reaches first, so every op computes what it would have without this
(``QVG_SEAL_AHEAD=off`` turns it off: `mode`; `tally.stats` counts ``seals_ahead``,
``seals_undone`` and, on the GPU, ``seals_ahead_late``: the reads whose attention had finished
before the host work done in its shadow, so the device waited for it).

What it costs: the seal's encode runs on the device behind the attention instead of under the
sealing write's host time; and when the attention is shorter than the host work done behind it
(short histories), the launches of the rest of the layer, which had been queued behind the
attention, wait for the rest of that work, which is still less than the next layer's sealing
write would have made the device wait. So a late open does not stop the next one (on the H200,
against backing off after late opens in the same pairs: within the noise at 21 and 60 frames of
Wan history, ~1% faster at 120 in every pair; ``QVG_SEAL_AHEAD=backoff`` keeps that policy). A
read whose last opened write was undone (a model that rolls its window before writing undoes
every one) skips its next opens, 1, 2, 4 ... up to 64 sealing reads, and tries again; one that
is confirmed opens every chunk.
"""

from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import ahead, tally
from .ahead import just_sealed, undone
from .codec import leads
from .host import host_thread
from .read_fast import bind
from .read_plan import ReadSide, args_key, fast_reads_enabled, plan_for
from .spec import POS_MAP_AT, StoreSpec
from .store import Store

Tensor = torch.Tensor
NEXT_SIZE = 4096
SWITCH = "QVG_SEAL_AHEAD"


MODES = ("on", "backoff", "off")


def mode() -> str:
    """``QVG_SEAL_AHEAD`` (read at every sealing read): ``on``, the default, opens the successor's
    write at every sealing read and backs off only after an undone open (a late open still takes
    the seal off the next layer's critical path, less the device's wait); ``backoff`` also backs
    off after an open that ended late; ``off`` opens nothing."""
    value = os.environ.get(SWITCH, "on")
    if value not in MODES:
        raise ValueError(f"{SWITCH}: expected one of {', '.join(MODES)}, got {value!r}")
    return value


def enabled() -> bool:
    """Whether sealing reads open their successor's write (`mode` is not ``off``)."""
    return mode() != "off"


@dataclass(frozen=True)
class _Side:
    """One side of a read as the op received it: weak references to its arrays, spec, lead, part."""

    arrays: tuple[weakref.ref, ...]
    spec: str
    lead: tuple[int, ...]
    part: int

    @staticmethod
    def of(arrays: Sequence[Tensor], spec: str, lead: Sequence[int], part: int) -> "_Side":
        return _Side(tuple(weakref.ref(a) for a in arrays), spec, tuple(int(x) for x in lead), int(part))

    def live(self) -> Optional[list[Tensor]]:
        arrays = [ref() for ref in self.arrays]
        return None if any(a is None for a in arrays) else arrays  # type: ignore[return-value]


# The sealing read that followed each sealing read last time, by ``(id(k pos_map), id(v pos_map))``.
_next: dict[tuple[int, int], tuple[_Side, _Side]] = {}
_last: Optional[tuple[int, int]] = None
# Reads whose last open was undone (or, with ``backoff``, ended after their attention):
# ``(sealing reads to skip, next skip)``.
_backoff: dict[tuple[int, int], tuple[int, int]] = {}
MAX_BACKOFF = 64
# Why opening failed, once it has (seal ahead is then off until `forget`).
_failed: Optional[str] = None


def after_read(q: Tensor, k: Sequence[Tensor], k_pieces: Sequence[int], k_lead: Sequence[int], k_part: int,
               k_spec: str, v: Sequence[Tensor], v_pieces: Sequence[int], v_lead: Sequence[int], v_part: int,
               v_spec: str) -> bool:
    """Called by a read (``qvg::cache_attention``'s arguments) once its attention is launched and
    some store's last write sealed (`ahead.just_sealed` not empty). Returns whether it opened the
    next store's write."""
    global _last, _failed
    k_id, v_id = id(k[POS_MAP_AT]), id(v[POS_MAP_AT])
    wrote = just_sealed.pop(k_id, None)
    if v_id != k_id and just_sealed.pop(v_id, None) != wrote:
        return False
    if wrote is None:
        return False
    here = (k_id, v_id)
    if _last is not None and _last != here:
        if len(_next) >= NEXT_SIZE:
            _next.clear()
        _next[_last] = (_Side.of(k, k_spec, k_lead, k_part), _Side.of(v, v_spec, v_lead, v_part))
    _last = here
    successor = _next.get(here)
    if (successor is None or (successor[0].spec, successor[1].spec) != (k_spec, v_spec) or not enabled()
            or _failed is not None):
        return False
    skip, wait = _backoff.get(here, (0, 1))
    if skip:
        _backoff[here] = (skip - 1, wait)
        return False
    if _was_undone(successor):
        opened, back_off = False, True
    else:
        try:
            opened, late = _open(successor, wrote, q, k_pieces, v_pieces)
        except Exception as err:  # noqa: BLE001 - another cache's work must not fail this read
            # What was opened before the error stays consistent (its write confirms it, anything
            # else undoes it); seal ahead stops for the process, and says so once.
            _failed = f"{type(err).__name__}: {err}"
            warnings.warn(f"QVGCache: sealing the next layer's caches ahead failed ({_failed}); seal ahead "
                          "is off for this process (results are unchanged: each seal runs at its write)",
                          RuntimeWarning, stacklevel=2)
            return False
        back_off = late and mode() == "backoff"
    if back_off:
        _backoff[here] = (wait, min(2 * wait, MAX_BACKOFF))
    else:
        _backoff.pop(here, None)
    return opened


def _was_undone(successor: tuple[_Side, _Side]) -> bool:
    """Whether the last write opened on either of the successor's stores was undone (forgotten
    once asked)."""
    found = False
    for side in successor:
        pos_map = side.arrays[POS_MAP_AT]()
        if pos_map is not None and id(pos_map) in undone:
            undone.discard(id(pos_map))
            found = True
    return found


def _open(successor: tuple[_Side, _Side], wrote: tuple[int, int], q: Tensor, k_pieces: Sequence[int],
          v_pieces: Sequence[int]) -> tuple[bool, bool]:
    """Open the write ``wrote`` ``(start, n)`` on the successor's stores and prepare its read, with
    the views of the read just made (the successor's stores have the same spec and read the same
    positions). Returns whether it opened, and whether the attention had ended before the host
    work did (the device waited)."""
    k_side, v_side = successor
    k, v = k_side.live(), v_side.live()
    if k is None or v is None:
        return False, False
    # Done when the attention just launched is: whether the device outlasted this host work.
    attention = torch.cuda.Event() if q.is_cuda else None
    if attention is not None:
        attention.record(torch.cuda.current_stream(q.device))
    with host_thread(q.device):
        k_store = Store(StoreSpec.from_json(k_side.spec), k)
        same = v[POS_MAP_AT] is k[POS_MAP_AT]
        v_store = k_store if same else Store(StoreSpec.from_json(v_side.spec), v)
        opened = k_store.open_ahead(*wrote)
        if not same:
            opened = v_store.open_ahead(*wrote) and opened
        if not opened:
            return False, False
        sides = (ReadSide(k_store, k_pieces, None, leads(k_side.lead), k_side.part),  # type: ignore[arg-type]
                 ReadSide(v_store, v_pieces, None, leads(v_side.lead), v_side.part))  # type: ignore[arg-type]
        if fast_reads_enabled():
            # Only a read the fast path will take is worth binding (its workspace is allocated here).
            key = args_key(q, k, v, k_pieces, v_pieces, k_side.lead, v_side.lead, k_side.part, v_side.part)
            plan = plan_for(*sides, q, key)
            if plan.reason is None:
                bind(*sides, plan, q).prepare()
    late = attention is not None and attention.query()
    if late:
        tally.add(seals_ahead_late=1)
    return True, late


def forget() -> None:
    """Drop the learned order and the records of opened writes (a new model, tests; stores opened
    and not yet written keep their opened state)."""
    global _last, _failed
    ahead.forget()
    _next.clear()
    _backoff.clear()
    _last = _failed = None
