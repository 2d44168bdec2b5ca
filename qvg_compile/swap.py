"""The swap: putting a `QVGCache` where the model keeps a dense cache, at run time.

Two halves. The *frame walker* finds the container a graph input came from: Dynamo records for
every graph input the expression it was loaded from (its *source*, e.g. ``L['kv_cache'][3]['k']``
or ``L['self']._buffers['k_cache']``); the compiled graph runs inside the frame of the function
Dynamo compiled, so walking up the Python stack finds a frame in which that expression evaluates
to the very tensor the graph received, and assigning through its last link replaces the tensor
where the model keeps it (tuples on the way are rebuilt). A tensor whose source is not assignable
(a local tuple the model built from its own dict) is found by identity in the dicts and lists
of the model's frames (`assign_by_identity`).

The *runtime wrappers* are what the backend returns for a graph: `SwapOnFirstUse` (the first call
of a graph with dense caches swaps them and runs eagerly), `Recording` (outputs that feed caches
become `QVGCache`; inputs a later graph showed to be caches are swapped: idiom K),
`EagerOnLayoutMismatch` and `Validated`. They call back into the backend through `CacheMaker`.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
import weakref
from types import FrameType
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
import torch.fx as fx
from torch._dynamo import source as dsrc

from .cache import QVGCache
from .passes.report import GraphReport, first_line
from .passes.sites import Site


class CacheMaker(Protocol):
    """What the wrappers need of the backend."""

    def to_cache(self, dense: torch.Tensor, site: Site) -> QVGCache: ...

    def warn_once(self, message: str) -> None: ...

    def record_outputs(self, producer: Any, outputs: Any, skip: frozenset[int] = frozenset()) -> None: ...

    def arm_disabled(self, report: GraphReport) -> None: ...


class ValidationError(AssertionError):
    """``validate=True`` found the compiled graph disagreeing with eager QVG execution."""


class QVGBackendWarning(UserWarning):
    """A cache stays dense, or a graph over QVG caches runs eagerly (correct, slower);
    `Report.summary()` says why."""


# --- the frame walker -------------------------------------------------------------------------
_MAX_FRAMES = 64
ITEM, ATTR, LOCAL, GLOBAL, MODULE = "item", "attr", "local", "global", "module"


class SourceError(Exception):
    """The source cannot be evaluated or assigned here (the caller reports it and moves on)."""


def source_kind(source: dsrc.Source) -> str:
    """Which of the five kinds of Dynamo source this module follows ``source`` is: an item of a
    container (`ITEM`), an attribute (`ATTR`), a local (`LOCAL`), a global (`GLOBAL`), or a
    module wrapper around another source (`MODULE`); `SourceError` for any other."""
    name = type(source).__name__
    if isinstance(source, (dsrc.GetItemSource, dsrc.DictGetItemSource)) or name.endswith("GetItemSource"):
        return ITEM
    if isinstance(source, dsrc.AttrSource):
        return ATTR
    if isinstance(source, dsrc.LocalSource):
        return LOCAL
    if isinstance(source, dsrc.GlobalSource):
        return GLOBAL
    if isinstance(source, dsrc.ChainedSource) and name.endswith("NNModuleSource"):
        return MODULE
    raise SourceError(f"unsupported source kind {name} ({source.name})")


def _bare_local(source: dsrc.Source) -> SourceError:
    return SourceError(f"{source.local_name!r} is a bare local: rebinding it would not reach the caller's object")


def _key(index: Any, frame: FrameType) -> Any:
    if isinstance(index, dsrc.Source):
        return evaluate(index, frame)
    return index


def evaluate(source: dsrc.Source, frame: FrameType) -> Any:
    """The object ``source`` denotes in ``frame``."""
    kind = source_kind(source)
    if kind == LOCAL:
        if source.local_name not in frame.f_locals:
            raise SourceError(f"local {source.local_name!r} not in frame {frame.f_code.co_name}")
        value = frame.f_locals[source.local_name]
        return value.cell_contents if getattr(source, "is_derefed_cell_contents", False) else value
    if kind == GLOBAL:
        if source.global_name not in frame.f_globals:
            raise SourceError(f"global {source.global_name!r} not found")
        return frame.f_globals[source.global_name]
    if kind == ITEM:
        return evaluate(source.base, frame)[_key(source.index, frame)]
    if kind == ATTR:
        value = evaluate(source.base, frame)
        for part in source.member.split("."):
            value = getattr(value, part)
        return value
    return evaluate(source.base, frame)


def _assign(source: dsrc.Source, frame: FrameType, new: Any) -> None:
    kind = source_kind(source)
    if kind == ITEM:
        container = evaluate(source.base, frame)
        key = _key(source.index, frame)
        if isinstance(container, tuple):
            items = list(container)
            items[key] = new
            rebuilt = type(container)(*items) if hasattr(container, "_fields") else tuple(items)
            _assign(source.base, frame, rebuilt)
            return
        container[key] = new
    elif kind == ATTR:
        owner = evaluate(source.base, frame)
        *parents, last = source.member.split(".")
        for part in parents:
            owner = getattr(owner, part)
        setattr(owner, last, new)
    elif kind == LOCAL:
        raise _bare_local(source)
    elif kind == GLOBAL:
        frame.f_globals[source.global_name] = new
    else:
        _assign(source.base, frame, new)


def find_frame(source: dsrc.Source, expected: Any, start: Optional[FrameType] = None) -> FrameType:
    """The nearest caller frame in which ``source`` evaluates to ``expected`` (by identity)."""
    frame = start or sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        try:
            if evaluate(source, frame) is expected:
                return frame
        except (SourceError, LookupError, AttributeError, TypeError):
            pass
        frame = frame.f_back
    raise SourceError(f"no caller frame holds {source.name}")


def check_source_kind(source: dsrc.Source) -> None:
    """Raise `SourceError` when no frame could make ``source`` assignable: a bare local (the
    caller's own variable), or a kind of source this module does not follow."""
    kind = source_kind(source)
    if kind == LOCAL:
        raise _bare_local(source)
    if kind == MODULE:
        check_source_kind(source.base)


def check_assignable(source: dsrc.Source, frame: FrameType) -> None:
    """Raise `SourceError` unless `assign_at_source` can put a value at ``source`` in ``frame``
    (checked for every cache of a graph before any is replaced)."""
    kind = source_kind(source)
    if kind == ITEM:
        container = evaluate(source.base, frame)
        if isinstance(container, tuple):
            check_assignable(source.base, frame)
        elif not hasattr(container, "__setitem__"):
            raise SourceError(f"{source.name}: {type(container).__name__} does not support item assignment")
    elif kind == LOCAL:
        raise _bare_local(source)
    elif kind == MODULE:
        check_assignable(source.base, frame)


def assign_at_source(source: dsrc.Source, frame: FrameType, new: Any) -> None:
    """Put ``new`` at ``source`` as evaluated in ``frame`` (from `find_frame`)."""
    _assign(source, frame, new)


_SKIPPED_MODULES = ("torch", "qvg_compile")
_CONTAINER_DEPTH = 3


def assign_by_identity(old: Any, new: Any, start: Optional[FrameType] = None) -> list[str]:
    """Replace ``old`` by ``new`` in the dicts and lists the model's frames hold (and the tuples
    inside them, rebuilt), for a tensor whose Dynamo source is not assignable (a local tuple the
    model built from its own dict). Frames of torch and of this package are not searched.
    Returns where it was replaced (``"kv_cache_dict[0][0] in forward"``); empty when nowhere."""
    done: list[str] = []
    seen: set[int] = set()
    for frame in model_frames(start or sys._getframe(1)):
        for name, value in list(frame.f_locals.items()):
            if isinstance(value, (dict, list)):
                _replace_in(value, old, new, name, frame.f_code.co_name, seen, done, _CONTAINER_DEPTH)
    return done


def model_frames(frame: Optional[FrameType]) -> Iterator[FrameType]:
    """``frame`` and its callers, up to `_MAX_FRAMES`, without the frames of torch and of this
    package (where the model's own dicts and lists of caches are not)."""
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return
        if str(frame.f_globals.get("__name__", "")).split(".")[0] not in _SKIPPED_MODULES:
            yield frame
        frame = frame.f_back


def holders_by_identity(old: torch.Tensor, start: Optional[FrameType] = None) -> list[tuple[str, Any, Any]]:
    """``(name, slot, layers)`` for every local ``name`` of the model's frames whose value
    ``layers`` is a dict or list of per-layer entries one of which holds ``old`` at ``slot``
    (``kv_cache_dict[0][0]``: the local ``kv_cache_dict``, slot 0). Frames of torch and of this
    package are not searched."""
    found: list[tuple[str, Any, Any]] = []
    for frame in model_frames(start or sys._getframe(1)):
        for name, value in list(frame.f_locals.items()):
            slot = _slot_of(value, old) if isinstance(value, (dict, list)) else None
            if slot is not None:
                found.append((name, slot, value))
    return found


def _slot_of(layers: Any, old: torch.Tensor) -> Any:
    """The key or index at which an entry of ``layers`` holds ``old`` (None when none does)."""
    for entry in layers.values() if isinstance(layers, dict) else layers:
        slots = entry.items() if isinstance(entry, dict) else enumerate(entry) if isinstance(entry, (tuple, list)) else ()
        slot = next((k for k, v in slots if v is old), None)
        if slot is not None:
            return slot
    return None


def values_in_slot(layers: Any, slot: Any) -> list[Any]:
    """The values at ``slot`` of the entries of the per-layer dict or list ``layers``, in order
    (entries without that slot are left out)."""
    found = []
    for entry in layers.values() if isinstance(layers, dict) else layers:
        if isinstance(entry, dict) and slot in entry:
            found.append(entry[slot])
        elif isinstance(entry, (tuple, list)) and isinstance(slot, int) and slot < len(entry):
            found.append(entry[slot])
    return found


def _replace_in(container: Any, old: Any, new: Any, path: str, where: str, seen: set[int], done: list[str],
                depth: int) -> bool:
    """Replace ``old`` inside ``container`` (a dict or list, or a tuple when returning True asks
    the parent to store the rebuilt tuple); True when a tuple's item changed."""
    if depth < 0 or id(container) in seen:
        return False
    if not isinstance(container, tuple):
        # A tuple is rebuilt in each parent that holds it, so it may be met more than once.
        seen.add(id(container))
    items = container.items() if isinstance(container, dict) else enumerate(container)
    changed_tuple = False
    for key, value in list(items):
        label = f"{path}[{key!r}]"
        if value is old:
            if isinstance(container, tuple):
                changed_tuple = True
            else:
                container[key] = new
            done.append(f"{label} in {where}")
        elif isinstance(value, (dict, list)):
            _replace_in(value, old, new, label, where, seen, done, depth - 1)
        elif isinstance(value, tuple) and not hasattr(value, "_fields"):
            if _replace_in(value, old, new, label, where, seen, done, depth - 1) and not isinstance(container, tuple):
                container[key] = tuple(new if v is old else v for v in value)
    return changed_tuple


# --- the runtime wrappers ---------------------------------------------------------------------
def eager_note(report: GraphReport, message: str) -> None:
    """Note in ``report`` (and warn, once per message) that a graph ran eagerly."""
    if message not in report.eager:
        report.eager.append(message)
        warnings.warn(f"qvg_backend, {report.name}: {message}", QVGBackendWarning, stacklevel=3)


@dataclasses.dataclass
class Feed:
    """An output of a graph that a later graph read as a cache: ``site``, the output's length
    along the sequence then, and whether it has grown since. An output that grows is the whole
    history, recomputed by every cache pass (LongCat): returned as a QVGCache from then on. One
    of constant length is a piece the caller appends to a cache that is already QVG (WorldPlay):
    left dense."""

    site: Site
    length: int
    grows: bool = False


# Per backend: where the model keeps per-layer caches a pending swap replaced, as (the name of
# a frame's local holding a dict or list of per-layer entries, the slot of the cache in each
# entry) -> the caches' `Site`. A cache pass re-makes those caches dense in a new dict under the
# same name; every graph call swaps them there before a frame that reads them sees them dense.
_PLACES: "weakref.WeakKeyDictionary[Any, dict[tuple[str, Any], Site]]" = weakref.WeakKeyDictionary()


class Recording:
    """Calls a compiled graph, returns the outputs that feed caches as `QVGCache` (``convert``:
    output index -> `Feed`), and records its dense outputs (`CacheMaker.record_outputs`).

    ``pending`` (input source -> `Site`, shared by the recompiles of one frame) holds inputs a
    later graph showed to be caches (idiom K); a call that gets one of them dense swaps it for a
    `QVGCache` wherever the model keeps it (`assign_by_identity`) and runs eagerly on it (``gm``);
    Dynamo recompiles for the next call."""

    def __init__(self, backend: "CacheMaker", fn: Callable, convert: dict[int, Feed], gm: fx.GraphModule,
                 report: GraphReport, pending: dict[str, Site], sources: list[Optional[str]]) -> None:
        self.backend, self.fn, self.gm, self.report = backend, fn, gm, report
        self.convert = convert  # shared by the recompiles of one frame
        self.pending = pending  # likewise
        # Input source names, read before Inductor compiles ``gm`` (its placeholders lose them).
        self.sources = sources
        self.positions = {name: i for i, name in enumerate(sources) if name is not None}
        # Outputs that are inputs handed back (``x.to(x.device)``), found at the first call.
        self.handed_back: Optional[frozenset[int]] = None

    def __call__(self, *args: Any) -> Any:
        places = _PLACES.get(self.backend)
        if places:
            self._swap_places(places, sys._getframe(1))
        swapped = self._swap_pending(list(args)) if self.pending else None
        out = self.fn(*args) if swapped is None else self.gm(*swapped)
        if self.convert and isinstance(out, (list, tuple)):
            items = list(out)
            for i, feed in self.convert.items():
                if i >= len(items) or not fits(items[i], feed.site):
                    continue
                feed.grows = feed.grows or items[i].shape[feed.site.seq_dim] != feed.length
                if feed.grows:
                    items[i] = self.backend.to_cache(items[i], feed.site)
            out = type(out)(items) if isinstance(out, list) else tuple(items)
        if self.handed_back is None:
            inputs = {id(a) for a in args}
            self.handed_back = frozenset(i for i, t in enumerate(out if isinstance(out, (list, tuple)) else (out,))
                                         if id(t) in inputs)
        self.backend.record_outputs(self, out, self.handed_back)
        self.backend.arm_disabled(self.report)
        return out

    def _swap_pending(self, args: list[Any]) -> Optional[list[Any]]:
        """``args`` with the pending caches swapped in, or None when none was dense here.

        The same entry of the layers before it in the per-layer dict or list holding the cache
        is swapped with it, and where that is is remembered (`_PLACES`): at the model's next call
        the frames that pass those entries along see every layer's cache as a `QVGCache` (one
        recompile, not one per layer), and the dense caches a later cache pass puts there are
        swapped by the first graph that runs in a frame holding them (`_swap_places`), before a
        frame that reads them sees them dense (a recompile at every chunk)."""
        swapped = False
        for source, site in list(self.pending.items()):
            position = self.positions.get(source)
            dense = args[position] if position is not None else None
            if type(dense) is not torch.Tensor:
                continue
            cache = self._replace(dense, site)
            if cache is None:
                del self.pending[source]
                continue
            args[position] = cache
            swapped = True
            places = _PLACES.setdefault(self.backend, {})
            for name, slot, layers in holders_by_identity(cache):
                places[(name, slot)] = site
                values = values_in_slot(layers, slot)
                # The layers before this one have read their cache in this call already; the
                # ones after swap theirs at their own read, through this same graph (run
                # eagerly): none of them meets a compiled frame with another cache type than
                # this layer does in this call.
                for sibling in values[:next(i for i, v in enumerate(values) if v is cache)]:
                    if fits(sibling, site):
                        self._replace(sibling, site)
        return args if swapped else None

    def _swap_places(self, places: dict[tuple[str, Any], Site], frame: Optional[FrameType]) -> None:
        """Swap the dense caches at the remembered places (`_PLACES`) among the locals of the
        model's frames from ``frame`` up (only frames whose code has a local of that name)."""
        names = {name for name, _ in places}
        for _ in range(_MAX_FRAMES):
            if frame is None:
                return
            code = frame.f_code
            if (names.intersection(code.co_varnames)
                    and str(frame.f_globals.get("__name__", "")).split(".")[0] not in _SKIPPED_MODULES):
                local = frame.f_locals
                for (name, slot), site in places.items():
                    layers = local.get(name)
                    values = values_in_slot(layers, slot) if isinstance(layers, (dict, list)) else []
                    # A container some of whose caches are QVGCache already is the one a pending
                    # swap is going through layer by layer (`_swap_pending`): left to it.
                    if all(type(v) is torch.Tensor for v in values):
                        for dense in values:
                            if fits(dense, site):
                                self._replace(dense, site)
            frame = frame.f_back

    def _replace(self, dense: torch.Tensor, site: Site) -> Optional[QVGCache]:
        """``dense`` made a growing `QVGCache` wherever the model keeps it (None, warned, when it
        cannot be quantized or no dict or list of the model's frames holds it)."""
        try:
            cache = self.backend.to_cache(dense, site)
        except (ValueError, TypeError) as exc:
            self.backend.warn_once(f"{site.source}: not replaced (it could not be quantized: "
                                   f"{first_line(str(exc))})")
            return None
        if not assign_by_identity(dense, cache):
            self.backend.warn_once(f"{site.source}: not replaced (no dict or list of the model's frames holds it)")
            return None
        # Re-made longer by every cache pass: symbolic in its length from the first graph that
        # reads it, so the next chunk's longer cache compiles nothing new.
        cache.mark_growing()
        self.report.record_swap(site.source, cache.memory())
        return cache


def fits(t: Any, site: Site) -> bool:
    """``t`` is a dense tensor shaped like ``site``'s cache (any length along the sequence)."""
    if type(t) is not torch.Tensor or t.dim() != len(site.shape) or str(t.dtype).removeprefix("torch.") != site.dtype:
        return False
    return all(t.shape[d] == n for d, n in enumerate(site.shape) if d != site.seq_dim)


class SwapOnFirstUse:
    """Runs a graph whose cache inputs are still dense: swaps them for QVGCache where the model
    keeps them, runs that call eagerly on the QVGCache, and leaves the next call to Dynamo's
    recompile. Whether the caches can be swapped is decided at compile time
    (the backend's `_cannot_swap`)."""

    def __init__(self, backend: "CacheMaker", gm: fx.GraphModule, sites: list[tuple[int, Site, Any]],
                 report: GraphReport) -> None:
        # No example inputs are kept: they are the dense caches whose memory the swap frees.
        self.backend, self.gm = backend, gm
        self.sites, self.report = sites, report

    def __call__(self, *args: Any) -> Any:
        args = list(args)
        planned = []
        try:
            for index, site, source in self.sites:
                value = args[index]
                if type(value) is not torch.Tensor:
                    continue
                frame = find_frame(source, value)
                check_assignable(source, frame)
                planned.append((index, site, source, frame))
        except SourceError as exc:
            # Checked when compiled, so only an unusual caller gets here: run this call as traced.
            eager_note(self.report, f"the caches could not be replaced at their source ({exc}); "
                                     "this call ran eagerly on the dense tensors")
            return self.gm(*args)
        try:
            # Every cache is built before any is assigned: a data error (NaN under
            # check_finite) leaves all of them dense.
            caches = [self.backend.to_cache(args[index], site) for index, site, _, _ in planned]
        except (ValueError, TypeError) as exc:
            eager_note(self.report, f"the caches could not be quantized ({first_line(str(exc))}); "
                                     "this call ran eagerly on the dense tensors")
            return self.gm(*args)
        for (index, site, source, frame), cache in zip(planned, caches):
            assign_at_source(source, frame, cache)
            args[index] = cache
            self.report.record_swap(site.source, cache.memory())
        del planned, caches
        return self.gm(*args)


class EagerOnLayoutMismatch:
    """Inductor asserts the sizes and strides of the arrays inside `QVGCache` inputs before it
    computes anything; a layout its guards did not cover runs that call eagerly instead."""

    def __init__(self, gm: fx.GraphModule, compiled: Callable, report: GraphReport) -> None:
        self.gm, self.compiled, self.report = gm, compiled, report

    def __call__(self, *args: Any) -> Any:
        try:
            return self.compiled(*args)
        except AssertionError as exc:
            if "expected size" not in str(exc) or "stride" not in str(exc):
                raise
            eager_note(self.report, f"a QVGCache input's inner arrays changed layout without a "
                                     f"recompile ({first_line(str(exc))}); that call ran eagerly")
            return self.gm(*args)


class Validated:
    """First call: compiled and eager (on exact copies of the caches, `QVGCache.snapshot`) must
    agree, outputs and the caches the graph writes, else `ValidationError`."""

    def __init__(self, gm: fx.GraphModule, compiled: Callable, rtol: float, atol: float) -> None:
        self.gm, self.compiled, self.rtol, self.atol = gm, compiled, rtol, atol
        self.checked = False

    def __call__(self, *args: Any) -> Any:
        if self.checked:
            return self.compiled(*args)
        self.checked = True
        memo: dict = {}
        copies = [a.snapshot(memo) if isinstance(a, QVGCache) else a for a in args]
        expected = self.gm(*copies)
        got = self.compiled(*args)
        flat_expected, _ = torch.utils._pytree.tree_flatten(expected)
        flat_got, _ = torch.utils._pytree.tree_flatten(got)
        pairs = [(f"output {i}", e, g) for i, (e, g) in enumerate(zip(flat_expected, flat_got))]
        pairs += [(f"cache input {i}", c, a) for i, (c, a) in enumerate(zip(copies, args))
                  if isinstance(a, QVGCache)]
        for what, e, g in pairs:
            if not isinstance(e, torch.Tensor) or not isinstance(g, torch.Tensor):
                continue
            e = e.dequantize() if isinstance(e, QVGCache) else e
            g = g.dequantize() if isinstance(g, QVGCache) else g
            if e.shape != g.shape or not torch.allclose(g.float(), e.float(), rtol=self.rtol, atol=self.atol):
                diff = float((g.float() - e.float()).abs().max()) if e.shape == g.shape else float("inf")
                raise ValidationError(
                    f"qvg_backend(validate=True): {what} of the compiled graph differs from "
                    f"eager QVG execution by {diff:.3g} (rtol={self.rtol}, atol={self.atol})")
        return got
