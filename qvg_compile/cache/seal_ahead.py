"""Seal ahead: encode the next layer's seals while the device runs this layer's attention.

An AR video model seals one chunk per cache at the first write of the next chunk, layer by
layer, and a model that reads a scalar back at every layer (Self-Forcing's ``.item()`` of the
cache's end index) leaves the device idle while the host runs a sealing write (~1 ms of
bookkeeping, encode replay and copies, twice per layer). Reads and seals come in the same order
every chunk, so a read that builds its plan (the first read of a cache state: one per layer and
chunk) learns which stores were sealed after it, before the next read; the next time the same
read builds its plan, right after launching its attention, it runs those stores' next seal
(`Store.seal_ahead`): the encode is queued behind the attention and its host time is spent
while the device is busy. The sealing write then adopts the encode if the store is exactly as it
was and only does the bookkeeping; anything else (a rewrite of those rows, another seal, a
different codebook choice) drops it and the write encodes as before, so results are the same
with or without it (`QVG_SEAL_AHEAD=off` turns it off).

A mis-prediction costs the encode, never a wrong result: the codes it wrote sit at positions the
token state says are dense, and its centroids in a codebook slot no live token uses.
"""

from __future__ import annotations

import os
import weakref
from typing import Hashable, Optional

from .spec import StoreSpec
from .store import Store, take_recent_seals

Successors = tuple[tuple[StoreSpec, tuple[weakref.ref, ...]], ...]

# The stores sealed after each plan-building read, by the read's identity (last seen order).
_after: dict[Hashable, Successors] = {}
AFTER_SIZE = 4096
_last: Optional[Hashable] = None


def enabled() -> bool:
    """Whether reads seal ahead (``QVG_SEAL_AHEAD=off`` disables it, read at every call)."""
    return os.environ.get("QVG_SEAL_AHEAD", "on") != "off"


def after_read(read: Hashable, planned: bool) -> int:
    """Called by every cache read once its attention is launched. ``read`` identifies the read
    (the same for every chunk: its caches' identities); ``planned``: the read built its plan
    (the first read of a cache state), else it was replayed. Records the seals since the
    previous planned read as that read's successors; a planned read then seals its own known
    successors ahead. Returns the number of encodes launched."""
    global _last
    sealed = take_recent_seals()
    if _last is not None and sealed:
        if len(_after) >= AFTER_SIZE:
            _after.clear()
        _after[_last] = tuple(sealed)
    _last = read if planned else None
    if not planned or not enabled():
        return 0
    launched = 0
    for spec, refs in _after.get(read, ()):
        arrays = [r() for r in refs]
        if any(a is None for a in arrays):
            continue
        launched += Store(spec, arrays).seal_ahead()  # type: ignore[arg-type]
    return launched


def forget() -> None:
    """Drop everything learned (tests; a new model)."""
    global _last
    _after.clear()
    _last = None
    take_recent_seals()
