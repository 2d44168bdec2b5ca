"""Find, at run time, the container a graph input came from, so a cache can be swapped in place.

Dynamo records for every graph input the expression it was loaded from (its *source*, e.g.
``L['kv_cache'][3]['k']`` or ``L['self']._buffers['k_cache']``). The compiled graph runs inside
the frame of the function Dynamo compiled, so walking up the Python stack finds a frame in which
that expression evaluates to the very tensor the graph received. Assigning through the last link
of the expression replaces the tensor where the model keeps it; tuples on the way are rebuilt.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any, Optional

from torch._dynamo import source as dsrc

_MAX_FRAMES = 64


class SourceError(Exception):
    """The source cannot be evaluated or assigned here (the caller reports it and moves on)."""


def _key(index: Any, frame: FrameType) -> Any:
    if isinstance(index, dsrc.Source):
        return evaluate(index, frame)
    return index


def evaluate(source: dsrc.Source, frame: FrameType) -> Any:
    """The object ``source`` denotes in ``frame``."""
    if isinstance(source, dsrc.LocalSource):
        if source.local_name not in frame.f_locals:
            raise SourceError(f"local {source.local_name!r} not in frame {frame.f_code.co_name}")
        value = frame.f_locals[source.local_name]
        if getattr(source, "is_derefed_cell_contents", False):
            value = value.cell_contents
        return value
    if isinstance(source, dsrc.GlobalSource):
        if source.global_name not in frame.f_globals:
            raise SourceError(f"global {source.global_name!r} not found")
        return frame.f_globals[source.global_name]
    if isinstance(source, (dsrc.GetItemSource, dsrc.DictGetItemSource)) or \
            type(source).__name__.endswith("GetItemSource"):
        return evaluate(source.base, frame)[_key(source.index, frame)]
    if isinstance(source, dsrc.AttrSource):
        value = evaluate(source.base, frame)
        for part in source.member.split("."):
            value = getattr(value, part)
        return value
    if isinstance(source, dsrc.ChainedSource) and type(source).__name__.endswith("NNModuleSource"):
        return evaluate(source.base, frame)
    raise SourceError(f"unsupported source kind {type(source).__name__} ({source.name})")


def _assign(source: dsrc.Source, frame: FrameType, new: Any) -> None:
    if isinstance(source, (dsrc.GetItemSource, dsrc.DictGetItemSource)) or \
            type(source).__name__.endswith("GetItemSource"):
        container = evaluate(source.base, frame)
        key = _key(source.index, frame)
        if isinstance(container, tuple):
            items = list(container)
            items[key] = new
            rebuilt = type(container)(*items) if hasattr(container, "_fields") else tuple(items)
            _assign(source.base, frame, rebuilt)
            return
        container[key] = new
        return
    if isinstance(source, dsrc.AttrSource):
        owner = evaluate(source.base, frame)
        *parents, last = source.member.split(".")
        for part in parents:
            owner = getattr(owner, part)
        setattr(owner, last, new)
        return
    if isinstance(source, dsrc.LocalSource):
        raise SourceError(f"{source.local_name!r} is a bare local: rebinding it would not reach the caller's object")
    if isinstance(source, dsrc.GlobalSource):
        frame.f_globals[source.global_name] = new
        return
    if isinstance(source, dsrc.ChainedSource) and type(source).__name__.endswith("NNModuleSource"):
        _assign(source.base, frame, new)
        return
    raise SourceError(f"unsupported source kind {type(source).__name__} ({source.name})")


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
    if isinstance(source, dsrc.LocalSource):
        raise SourceError(f"{source.local_name!r} is a bare local: rebinding it would not reach the caller's object")
    if isinstance(source, (dsrc.GetItemSource, dsrc.DictGetItemSource, dsrc.AttrSource)) or \
            type(source).__name__.endswith("GetItemSource"):
        return
    if isinstance(source, dsrc.GlobalSource):
        return
    if isinstance(source, dsrc.ChainedSource) and type(source).__name__.endswith("NNModuleSource"):
        check_source_kind(source.base)
        return
    raise SourceError(f"unsupported source kind {type(source).__name__} ({source.name})")


def check_assignable(source: dsrc.Source, frame: FrameType) -> None:
    """Raise `SourceError` unless `assign_at_source` can put a value at ``source`` in ``frame``
    (checked for every cache of a graph before any is replaced)."""
    if isinstance(source, (dsrc.GetItemSource, dsrc.DictGetItemSource)) or \
            type(source).__name__.endswith("GetItemSource"):
        container = evaluate(source.base, frame)
        if isinstance(container, tuple):
            check_assignable(source.base, frame)
        elif not hasattr(container, "__setitem__"):
            raise SourceError(f"{source.name}: {type(container).__name__} does not support item assignment")
        return
    if isinstance(source, (dsrc.AttrSource, dsrc.GlobalSource)):
        return
    if isinstance(source, dsrc.LocalSource):
        raise SourceError(f"{source.local_name!r} is a bare local: rebinding it would not reach the caller's object")
    if isinstance(source, dsrc.ChainedSource) and type(source).__name__.endswith("NNModuleSource"):
        check_assignable(source.base, frame)
        return
    raise SourceError(f"unsupported source kind {type(source).__name__} ({source.name})")


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
    frame = start or sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        module = str(frame.f_globals.get("__name__", ""))
        if module.split(".")[0] not in _SKIPPED_MODULES:
            for name, value in list(frame.f_locals.items()):
                if isinstance(value, (dict, list)):
                    _replace_in(value, old, new, name, frame.f_code.co_name, seen, done, _CONTAINER_DEPTH)
        frame = frame.f_back
    return done


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
