"""Refusals of a cache's seals, read back from the GPU without a host sync.

On the GPU a seal is launched, not waited for (a seal onto a shared codebook reads its fit
back: `CachePolicy.share_fit`). The encoder's refusal summary (a scale or zero
point outside the scale dtype's range; NaN/Inf in the tokens under ``check_finite``) is or-ed into
a device flag per cache, and copied to pinned host memory behind the seal. The cache's next seal
looks at that copy if it has landed (an event query, never a wait); `SealFlags.check` with
``wait=True`` waits for it (`Store.seal_all`, dense reads of the whole cache).

What a refusal means on the GPU: the refused tokens were sealed (their codes and scales hold
garbage: NaN, or saturated scales) and the error is raised by a later operation on the same
cache, which it leaves unchanged. The cache stays refused, raising on every seal, until no sealed
token is left (``zero_``, a release of every token, `Store.reset`). On the CPU the encoder checks
at once: the refused seal itself raises and leaves the cache as it was.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from ..kernels.encode import raise_on_summary
from ..quant.config import QVGConfig


class SealFlags:
    """The refusal flags of one cache's seals on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bad = torch.zeros(2, dtype=torch.int8, device=device)
        cuda = device.type == "cuda"
        self.host = torch.zeros(2, dtype=torch.int8, pin_memory=cuda)
        self.event: Optional[torch.cuda.Event] = torch.cuda.Event() if cuda else None
        self.published = False

    def add(self, summary: torch.Tensor) -> None:
        """Or a seal's summary (int8 ``[2]`` on ``device``) into the flags, then start their copy to
        the host (no wait)."""
        self.bad.bitwise_or_(summary)
        self.host.copy_(self.bad, non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()
        self.published = True

    def check(self, config: QVGConfig, wait: bool = False) -> None:
        """Raise ``ValueError`` if a seal published so far was refused. Without ``wait``, a copy
        still in flight is left for a later check."""
        if not self.published:
            return
        if self.event is not None:
            if not wait and not self.event.query():
                return
            self.event.synchronize()
        summary = self.host.tolist()
        if any(summary):
            try:
                raise_on_summary(summary, config)
            except ValueError as err:
                raise ValueError(
                    f"QVGCache: a seal launched earlier on {self.device} was refused by the encoder "
                    f"({err}); the tokens it sealed hold garbage codes. The cache raises on every seal "
                    "until it is reset (zero_)") from err

    def state(self) -> tuple[torch.Tensor, bool]:
        """What `restore` puts back: a copy of the device flags and whether any was published."""
        return self.bad.clone(), self.published

    def restore(self, state: tuple[torch.Tensor, bool]) -> None:
        """Put the flags back as `state` found them (a seal made and undone: `cache.ahead`)."""
        bad, published = state
        self.bad.copy_(bad)
        self.host.copy_(self.bad, non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()
        self.published = published

    def clear(self) -> None:
        self.bad.zero_()
        self.host.zero_()
        self.published = False


_flags: dict[int, SealFlags] = {}


def flags_for(pos_map: torch.Tensor, device: torch.device) -> SealFlags:
    """The `SealFlags` of the cache whose token map is ``pos_map`` (one per cache, dropped with it)."""
    key = id(pos_map)
    found = _flags.get(key)
    if found is None or found.device != device:
        found = _flags[key] = SealFlags(device)
        weakref.finalize(pos_map, _flags.pop, key, None)
    return found


def known_flags(pos_map: torch.Tensor) -> Optional[SealFlags]:
    """The `SealFlags` of ``pos_map``'s cache if one of its seals was published, else None."""
    return _flags.get(id(pos_map))
