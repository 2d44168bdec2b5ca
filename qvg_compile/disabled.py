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
compressed cache from its first read on. ``cat``, ``repeat``/``expand`` and SDPA inside the body
run on `QVGCache` (and `cache.joined.JoinedCache` across stores) eagerly.
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
        elif event == "call" and frame.f_code in self.functions:
            self._disarm()
            self._on_call(frame, armed[1])
        elif event == "return" and frame is armed[0]:
            self._disarm()

    def _disarm(self) -> None:
        sys.setprofile(None)
        self._armed = None

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
            self._swap(args, read, fn.__name__, where, report)

    def _swap(self, args: dict[str, Any], read: EagerRead, name: str, where: str, report: GraphReport) -> None:
        *parents, last = read.path
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
        key = id(dense)
        self.made[key] = (weakref.ref(dense, lambda _, key=key: self.made.pop(key, None)), cache)
        return cache


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
