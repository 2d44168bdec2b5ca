"""The swap at a call of a compiler-disabled function (idiom L): caches no graph ever holds.

Pattern: a function the model calls inside a compiled frame is ``torch.compiler.disable``d
(HY-WorldPlay's ``sequence_parallel_attention_vision``); it takes the model's cache containers
and creates, concatenates and reads the caches itself, so no graph input is a cache.

Rewrite: when a graph of ours runs in a frame whose code calls such a function (its name is
among the frame's names), a profile hook waits for the function's next call (and is removed at
it, or when that frame returns). At the call, before the body runs, the function's arguments are
known: the first call with a given argument structure runs it once on fake copies
(`passes.eager_reads.observe_reads`) to learn which container entries SDPA reads as K or V; at
every call, each such entry still holding a dense tensor is replaced by a `QVGCache` in its
container (one cache per dense tensor, however many containers hold it), so the body reads the
compressed cache from its first read on, and so is the same entry of every other layer in a
per-layer list (`_sibling_paths`). ``cat``, ``repeat``/``expand`` and SDPA inside the body
run on `QVGCache` (and `cache.joined.JoinedCache` across stores) eagerly. Once calls of a
function have shown which entries they read, the hook also waits for the call to return and
replaces the entries of the same names in the dicts it returns (the caches it made), so compiled
frames never see a cache dense one chunk and compressed the next.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from types import CodeType, FrameType
from typing import Any, Callable, Optional

import torch

from .cache import QVGCache
from .passes.eager_reads import EagerRead, observe_reads
from .passes.report import GraphReport, disabled_functions, first_line
from .passes.sites import Site

_SKIPPED = ("torch", "qvg_compile")
_MAX_FRAMES = 32


class DisabledCalls:
    """What the backend knows about compiler-disabled functions and the caches they read.

    ``make(dense, site)`` builds a `QVGCache`; ``warn(message)`` warns once."""

    def __init__(self, make: Callable[[torch.Tensor, Site], QVGCache], warn: Callable[[str], None],
                 roles: Optional[dict[str, str]] = None) -> None:
        self.make, self.warn, self.roles = make, warn, roles or {}
        self.functions: dict[CodeType, tuple[Callable, str]] = {}
        self.names: set[str] = set()
        self.learned: dict[tuple, list[EagerRead]] = {}
        self.made: dict[int, tuple[weakref.ref, QVGCache]] = {}
        self._armed: Optional[tuple[FrameType, GraphReport]] = None
        self._returning: Optional[FrameType] = None

    def learn(self, reasons: list[str]) -> None:
        """Add the compiler-disabled functions Dynamo's graph-break ``reasons`` name."""
        for fn, where in disabled_functions(reasons):
            code = getattr(inspect.unwrap(fn), "__code__", None)
            if code is not None and code not in self.functions:
                self.functions[code] = (inspect.unwrap(fn), where)
                self.names.add(getattr(fn, "__name__", code.co_name))

    def arm(self, report: GraphReport) -> None:
        """Called by every graph of ours: hook the next call of a known disabled function if the
        frame running this graph calls one."""
        if not self.functions or self._armed is not None or sys.getprofile() is not None:
            return
        frame = _user_frame(sys._getframe(1))
        if frame is None or not self.names.intersection(frame.f_code.co_names):
            return
        self._armed = (frame, report)
        sys.setprofile(self._hook)

    def _hook(self, frame: FrameType, event: str, arg: Any) -> None:
        armed = self._armed
        if armed is None:
            sys.setprofile(None)
        elif self._returning is not None:
            if event == "return" and frame is self._returning:
                self._disarm()
                self._on_return(frame, arg, armed[1])
        elif event == "call" and frame.f_code in self.functions:
            self._on_call(frame, armed[1])
            if self._returned_reads(frame.f_code):
                self._returning = frame
            else:
                self._disarm()
        elif event == "return" and frame is armed[0]:
            self._disarm()

    def _disarm(self) -> None:
        sys.setprofile(None)
        self._armed = None
        self._returning = None

    def _returned_reads(self, code: CodeType) -> dict[str, EagerRead]:
        """The learnt reads of ``code``'s calls by the name of the dict entry they read."""
        return {read.path[-1]: read for (c, _), reads in self.learned.items() if c is code
                for read in reads if isinstance(read.path[-1], str)}

    def _on_return(self, frame: FrameType, value: Any, report: GraphReport) -> None:
        """Replace, in the dicts a disabled function returns, the dense entries named like the
        entries its calls read as caches (``k_vision`` returned by the call that made it, read by
        the next ones). The compiled frames the value flows through then see a `QVGCache` from
        the cache's creation on, as they did the call before: swapping it only at its first read
        would show them a dense tensor one chunk and a cache the next, a recompile every time."""
        fn, where = self.functions[frame.f_code]
        reads = self._returned_reads(frame.f_code)
        for container, name in _returned_entries(value, set(reads)):
            dense = container[name]
            read = reads[name]
            if type(dense) is not torch.Tensor or dense.dim() <= read.seq_dim:
                continue
            source = f"{fn.__name__}: returned [{name!r}]"
            site = _site(source, dense, read, self.roles.get(name, read.role), where)
            cache = self._cache_for(dense, site)
            if cache is not None:
                container[name] = cache
                report.record_swap(source, cache.memory())

    def _on_call(self, frame: FrameType, report: GraphReport) -> None:
        fn, where = self.functions[frame.f_code]
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        args = {n: frame.f_locals[n] for n in names if n in frame.f_locals}
        key = (code, _structure(args))
        if key not in self.learned:
            try:
                self.learned[key] = observe_reads(fn, args)
            except Exception as exc:  # noqa: BLE001 (any failure of a fake run: the caches stay dense)
                self.learned[key] = []
                self.warn(f"caches read inside compiler-disabled {where}: not replaced (running it on fake "
                          f"tensors failed: {type(exc).__name__}: {first_line(str(exc))})")
        for read in self.learned[key]:
            for path in _sibling_paths(args, read.path):
                self._swap(args, path, read, fn.__name__, where, report)

    def _swap(self, args: dict[str, Any], path: tuple, read: EagerRead, name: str, where: str,
              report: GraphReport) -> None:
        *parents, last = path
        container: Any = args
        for step in parents:
            container = container[step]
        dense = container[last]
        if type(dense) is not torch.Tensor or isinstance(container, tuple):
            return
        source = f"{name}: " + parents[0] + "".join(f"[{p!r}]" for p in parents[1:] + [last])
        site = _site(source, dense, read, self.roles.get(str(last), read.role), where)
        cache = self._cache_for(dense, site)
        if cache is None:
            return
        container[last] = cache
        if source not in {s.source for s in report.sites}:
            report.sites.append(site)
        report.record_swap(source, cache.memory())

    def _cache_for(self, dense: torch.Tensor, site: Site) -> Optional[QVGCache]:
        """One `QVGCache` per dense tensor (the text K/V sits in the list of every pass)."""
        entry = self.made.get(id(dense))
        if entry is not None and entry[0]() is dense:
            return entry[1]
        try:
            cache = self.make(dense, site)
        except (ValueError, TypeError) as exc:
            self.warn(f"{site.source}: not replaced (it could not be quantized: {first_line(str(exc))})")
            return None
        # Made afresh each chunk, longer each time: symbolic in its length from the first graph
        # on, like a cache grown by ``cat`` (a marking that differs between calls recompiles).
        cache.mark_growing()
        key = id(dense)
        self.made[key] = (weakref.ref(dense, lambda _, key=key: self.made.pop(key, None)), cache)
        return cache


def _sibling_paths(args: dict[str, Any], path: tuple) -> list[tuple]:
    """``path`` and the same entry in every other element of the first list on it (the other
    layers' dicts of a per-layer cache list) that holds a dense tensor of the entry's rank and
    dtype. The compiled frames that pass the list along then see every layer's entry change type
    at once: one recompile, where swapping layer by layer costs one per layer and reaches
    Dynamo's recompile limit on a deep model."""
    found = [path]
    node: Any = args
    for i, step in enumerate(path[:-1]):
        node = node[step]
        index = path[i + 1]
        if not (isinstance(node, list) and isinstance(index, int)):
            continue
        entry = _resolve(node[index], path[i + 2:])
        for j, element in enumerate(node):
            other = None if j == index else _resolve(element, path[i + 2:])
            if (type(other) is torch.Tensor and isinstance(entry, torch.Tensor)
                    and (other.dim(), other.dtype) == (entry.dim(), entry.dtype)):
                found.append(path[:i + 1] + (j,) + path[i + 2:])
        break
    return found


def _resolve(node: Any, steps: tuple) -> Any:
    """``node[steps[0]][steps[1]]...``, or None where a step does not exist."""
    for step in steps:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _returned_entries(value: Any, names: set[str], depth: int = 3) -> list[tuple[dict, str]]:
    """``(dict, key)`` for every key in ``names`` of a dict inside ``value`` (tuples, lists and
    dicts, ``depth`` levels down)."""
    found: list[tuple[dict, str]] = []
    if isinstance(value, dict):
        found += [(value, key) for key in value if key in names]
    if depth and isinstance(value, (tuple, list, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            found += _returned_entries(item, names, depth - 1)
    return found


def _site(source: str, dense: torch.Tensor, read: EagerRead, role: str, where: str) -> Site:
    layout = {1: "[B, S, H, D]", 2: "[B, H, S, D]"}.get(read.seq_dim, f"seq dim {read.seq_dim}")
    return Site("-", source, ["L"], [role], read.seq_dim, tuple(dense.shape), str(dense.dtype).removeprefix("torch."),
                layout, ["sdpa"], notes=[f"read inside compiler-disabled {where}; replaced at its call"])


def _structure(args: dict[str, Any]) -> tuple:
    """The argument structure a fake run depends on: containers, tensor ranks and dtypes, and the
    values of everything else (``block_idx``, flags)."""
    leaves, spec = torch.utils._pytree.tree_flatten(args)
    return str(spec), tuple((t.dim(), t.dtype) if isinstance(t, torch.Tensor) else repr(t) for t in leaves)


def _user_frame(frame: Optional[FrameType]) -> Optional[FrameType]:
    """The nearest frame outside torch and this package: the model code running the graph."""
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        if str(frame.f_globals.get("__name__", "")).split(".")[0] not in _SKIPPED:
            return frame
        frame = frame.f_back
    return None
