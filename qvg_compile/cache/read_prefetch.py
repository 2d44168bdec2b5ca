"""Prefetch: the next fast read's sealed history decoded while the current layer finishes.

A model reads its caches in the same order on every forward (layer after layer), and a cache's
token state does not change between two denoising passes of a chunk, so the read that follows
a given read (same plan key: stores, states, views, queries' layout) is usually the one that
followed it last time. After a read launches its SDPA, `follow` looks that successor up; when
its plan is bound (`read_fast.BoundRead`) it launches the successor's *sealed* runs on a side
stream, ordered after this read's SDPA (every read on a device shares one workspace). The
decode then runs beside the rest of the layer (projections, MLP) and in the device's idle
time while the host walks to the next read, instead of in front of that read's SDPA.

The next fast read on the device calls `take`: the current stream waits for the prefetch in
every case (it wrote the shared workspace), and the read uses it only if it is the read the
prefetch was for (the same `BoundRead`, so the same plan key: a store that changed since has a
new stamp, so a new key, and never gets a stale prefetch). That read then copies only its open
rows. A read that was not predicted fills the workspace itself, as without prefetch.

``QVG_READ_PREFETCH``: ``auto`` (default: on CUDA), ``on`` (also on the CPU, where the prefetch
runs at once; for tests), ``off``. Nothing is prefetched while the current stream is being
captured into a CUDA graph.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch

from . import tally

PREFETCH_MODES = ("auto", "on", "off")
SUCCESSORS_SIZE = 4096


def prefetch_enabled(device: torch.device) -> bool:
    """Whether reads on ``device`` prefetch their successor (``QVG_READ_PREFETCH``)."""
    mode = os.environ.get("QVG_READ_PREFETCH", "auto")
    if mode not in PREFETCH_MODES:
        raise ValueError(f"QVG_READ_PREFETCH: expected one of {PREFETCH_MODES}, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class _Pending:
    """A launched prefetch: the read it is for and, on CUDA, the event that marks its end."""

    __slots__ = ("bound", "event")

    def __init__(self, bound: Any, event: Optional[torch.cuda.Event]) -> None:
        self.bound, self.event = bound, event


_pending: dict[torch.device, _Pending] = {}
_streams: dict[torch.device, torch.cuda.Stream] = {}
_events: dict[torch.device, torch.cuda.Event] = {}
_last: dict[torch.device, tuple] = {}
# read key -> the key of the read that came next on the same device, last time.
_successors: "OrderedDict[tuple, tuple]" = OrderedDict()


def take(device: torch.device, bound: Any) -> bool:
    """Settle ``device``'s pending prefetch before a read fills the workspace: the current stream
    waits for it; True when it was launched for ``bound`` (whose sealed rows are then in place)."""
    pending = _pending.pop(device, None)
    if pending is None:
        return False
    if pending.event is not None:
        torch.cuda.current_stream(device).wait_event(pending.event)
    return pending.bound is bound


def settle() -> None:
    """Order every pending prefetch before the current stream's later work (the workspace is
    about to be replaced or freed) and forget them."""
    for device in list(_pending):
        take(device, None)


def follow(key: tuple, device: torch.device, lookup: Callable[[tuple], Any]) -> None:
    """Note the read ``key`` (its SDPA just launched) as the successor of the previous read on
    ``device``, and prefetch the read that followed ``key`` last time: ``lookup(next_key)`` gives
    its `BoundRead` or None (no plan, not bound, several blocks, nothing sealed)."""
    previous = _last.get(device)
    if previous is not None and _successors.get(previous) != key:
        _successors[previous] = key
        if len(_successors) > SUCCESSORS_SIZE:
            _successors.popitem(last=False)
    _last[device] = key
    following = _successors.get(key)
    if following is None or not prefetch_enabled(device):
        return
    bound = lookup(following)
    if bound is None:
        return
    launch = bound.sealed_launch()
    if launch is None:
        return
    if device.type != "cuda":
        launch()
        _pending[device] = _Pending(bound, None)
        tally.add(prefetches=1)
        return
    if torch.cuda.is_current_stream_capturing():
        return
    side = _streams.get(device)
    if side is None:
        side = _streams[device] = torch.cuda.Stream(device)
        _events[device] = torch.cuda.Event()
    main = torch.cuda.current_stream(device)
    side.wait_stream(main)
    torch.cuda.set_stream(side)
    try:
        launch()
    finally:
        torch.cuda.set_stream(main)
    event = _events[device]
    event.record(side)
    _pending[device] = _Pending(bound, event)
    tally.add(prefetches=1)


def forget() -> None:
    """Drop what was learnt of the read order (pending prefetches are settled first)."""
    settle()
    _successors.clear()
    _last.clear()
