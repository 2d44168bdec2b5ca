"""What the QVG backend did to each captured graph, as tables (tabulate) or a dict/JSON."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gc
import inspect
import json
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from tabulate import tabulate

from .sites import Rejected, Site, readable


@dataclass
class GraphReport:
    """One graph Dynamo handed to the backend."""

    index: int
    name: str
    inputs_are_caches: bool
    # Dynamo's compile id "frame/compile": "0/1" is frame 0's first recompile.
    compile_id: str = ""
    # The frame as `Report.frame_of` names it (unique across `torch._dynamo.reset`); "" when
    # Dynamo gave no compile id (the graph's name stands for its frame).
    frame: str = ""
    sites: list[Site] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    readers: dict[str, int] = field(default_factory=dict)
    swapped: list[str] = field(default_factory=list)
    # `QVGCache.memory()` of each swapped cache when it was made (bits per element by component).
    swapped_memory: list[dict] = field(default_factory=list)
    # Graph rewrites applied before compiling (hand-written attention fused into SDPA).
    rewrites: list[str] = field(default_factory=list)
    swap_errors: list[str] = field(default_factory=list)
    # Computations over a cache value a pass looked at and left as written (they run on a
    # decoded copy, counted as fallbacks), one line each with the reason.
    untouched: list[str] = field(default_factory=list)
    # Why this graph (or some call of it) runs eagerly instead of through Inductor, if it does.
    eager: list[str] = field(default_factory=list)
    # For a graph over caches: "yes" when the backend hands Inductor the caches' inner tensors
    # (`passes.flat_inputs`), else why AOTAutograd unwraps them on every call.
    flat_inputs: str = ""
    code_before: str = ""
    code_after: Optional[str] = None

    def record_swap(self, source: str, memory: dict) -> None:
        """Note that the input at ``source`` became a `QVGCache` (``memory``: its `QVGCache.memory()`), once."""
        if source not in self.swapped:
            self.swapped.append(source)
            self.swapped_memory.append(memory)

    def diff(self) -> str:
        """Unified diff of the graph's code before the rewrite and after (post-grad ATen)."""
        if self.code_after is None:
            return ""
        return "".join(difflib.unified_diff(
            self.code_before.splitlines(keepends=True), self.code_after.splitlines(keepends=True),
            fromfile=f"{self.name} (Dynamo graph)", tofile=f"{self.name} (after QVG, post-grad)"))


def first_line(text: str, limit: int = 200) -> str:
    """The first line of an error or graph-break text, at most ``limit`` characters."""
    lines = text.strip().splitlines()
    return lines[0][:limit] if lines else ""


def graph_break_reasons() -> dict[str, int]:
    """Dynamo's graph-break reasons so far in this process, with their counts."""
    return dict(torch._dynamo.utils.counters.get("graph_break", {}))


# Dynamo's reason for a call it skips: "... Skip calling function `<function f at 0x...>` since it
# was wrapped with `torch.compiler.disable` ...".
_DISABLED = re.compile(r"calling function `<function ([\w.<>]+) at (0x[0-9a-fA-F]+)>")
_DISABLED_NOTE = "Calls to compiler-disabled functions"


@functools.lru_cache(maxsize=64)
def _function_at(name: str, address: str) -> Optional[weakref.ref]:
    """The function Dynamo's reason names by its address, when it is still alive (found among
    the live objects by id and name, never dereferenced; one scan per function)."""
    ident = int(address, 16)
    fn = next((o for o in gc.get_objects() if id(o) == ident and callable(o)
               and getattr(o, "__qualname__", "").endswith(name.rsplit(".", 1)[-1])), None)
    try:
        return weakref.ref(fn) if fn is not None else None
    except TypeError:
        return None


def _where_defined(name: str, address: str) -> str:
    """``name at file:line`` for the function Dynamo's reason names by its address; else ``name``."""
    ref = _function_at(name, address)
    fn = ref() if ref is not None else None
    code = getattr(inspect.unwrap(fn), "__code__", None) if fn is not None else None
    return f"`{name}` at {code.co_filename}:{code.co_firstlineno}" if code is not None else f"`{name}`"


def disabled_functions(reasons: list[str]) -> list[tuple[Any, str]]:
    """The live compiler-disabled functions Dynamo's graph-break ``reasons`` name, each with
    ``name at file:line``."""
    out = []
    for name, address in sorted({m.groups() for reason in reasons if (m := _DISABLED.search(reason))}):
        ref = _function_at(name, address)
        fn = ref() if ref is not None else None
        if fn is not None:
            out.append((fn, _where_defined(name, address)))
    return out


@dataclass
class Report:
    """All graphs of one model (or one `explain` call)."""

    graphs: list[GraphReport] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Reads of the replaced caches while the report was made: ``{"fast": n, "general": {why: n},
    # "fallbacks": {op: n}}`` (`explain` fills it from `qvg_compile.stats()`).
    cache_reads: dict = field(default_factory=dict)
    # `torch._dynamo.reset` calls seen (`frame_of`), and the frames first compiled since the last.
    resets: int = 0
    _first_compiles: set[int] = field(default_factory=set, repr=False)

    def frame_of(self, frame_id: int, frame_compile_id: int) -> str:
        """The key of the Dynamo frame a graph of compile id ``frame_id/frame_compile_id`` comes
        from, unique across `torch._dynamo.reset` (which numbers frames from 0 again): ``"5"``
        before the first reset, ``"5 after reset 2"`` after the second. A reset shows as a first
        compile of a frame id that already had one; graphs must be passed in compile order."""
        if frame_compile_id == 0:
            if frame_id in self._first_compiles:
                self.resets += 1
                self._first_compiles.clear()
            self._first_compiles.add(frame_id)
        return str(frame_id) if self.resets == 0 else f"{frame_id} after reset {self.resets}"

    @property
    def sites(self) -> list[Site]:
        return [s for g in self.graphs for s in g.sites]

    def record_graph_breaks(self, before: dict[str, int]) -> None:
        """Set ``graph_breaks`` to Dynamo's breaks since ``before`` (`graph_break_reasons`), and
        a note naming the compiler-disabled functions among them: a cache living only inside one
        is never seen by the backend."""
        new = {reason: count - before.get(reason, 0) for reason, count in graph_break_reasons().items()
               if count > before.get(reason, 0)}
        self.graph_breaks = [f"{first_line(reason)} (x{count})" for reason, count in new.items()]
        disabled = sorted({m.groups() for reason in new if (m := _DISABLED.search(reason))})
        self.notes = [n for n in self.notes if not n.startswith(_DISABLED_NOTE)]
        if disabled:
            names = ", ".join(sorted({_where_defined(name, address) for name, address in disabled}))
            self.notes.append(
                f"{_DISABLED_NOTE} ({names}) ran eagerly, outside every graph. A cache appended to "
                "before such a call and read by attention after it is found (idiom K); one the "
                "function reads from a list, dict or tuple argument is replaced at the call (idiom L, "
                "listed above when it happened); one it only receives as a bare tensor argument, or "
                "one read in a frame no graph of the backend runs in, stays dense.")

    def compiles_per_frame(self) -> dict[str, int]:
        """Graphs compiled per Dynamo frame (a graph break starts a new frame; a frame compiled
        again after `torch._dynamo.reset` counts as another)."""
        out: dict[str, int] = {}
        for g in self.graphs:
            frame = g.frame or g.name
            out[frame] = out.get(frame, 0) + 1
        return out

    @property
    def recompiles(self) -> int:
        """Compiles beyond the first of each frame (the budget is 2 per frame for a whole video)."""
        return sum(n - 1 for n in self.compiles_per_frame().values())

    def budget_notes(self) -> list[str]:
        """Frames over the compile budget (1 compile + 2 recompiles per video), and frames that
        reached Dynamo's recompile limit, after which their calls run eagerly."""
        limit = getattr(torch._dynamo.config, "recompile_limit", None) or \
            getattr(torch._dynamo.config, "cache_size_limit", 8)
        out = []
        for frame, n in self.compiles_per_frame().items():
            if n >= limit:
                out.append(f"frame {frame}: {n} compiles reached torch._dynamo.config.recompile_limit={limit}: "
                           "its later calls run eagerly (QVGCache eager is correct but slower)")
            elif n > 3:
                out.append(f"frame {frame}: {n} compiles, over the budget of 1 compile + 2 recompiles")
        return out

    def to_dict(self) -> dict:
        return {
            "graphs": [plain(g) | {"diff": g.diff()} for g in self.graphs],
            "graph_breaks": self.graph_breaks,
            "recompiles": self.recompiles,
            "notes": self.notes + self.budget_notes(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def summary(self, diff: bool = False) -> str:
        """Tables: sites found, rewrites applied (swaps), candidates rejected, graph breaks; and
        with ``diff=True`` each graph's unified diff (Dynamo code -> post-grad ATen code)."""
        lines = [f"QVG backend: {len(self.graphs)} graph(s) ({self.recompiles} recompile(s)), "
                 f"{len({s.source for s in self.sites})} cache(s), "
                 f"{sum(len(g.swapped) for g in self.graphs)} dense cache(s) replaced by QVGCache, "
                 f"{len(self.graph_breaks)} graph break(s)"]
        rows = [[g.index, s.module_path, ",".join(s.idioms), "/".join(s.roles), s.layout, s.seq_dim,
                 "x".join(map(str, s.shape)), s.dtype, "; ".join(s.notes) or "-"]
                for g in self.graphs for s in g.sites]
        if rows:
            lines.append(tabulate(rows, headers=["graph", "cache", "idiom", "role", "layout",
                                                 "seq dim", "shape", "dtype", "notes"], tablefmt="github"))
        readers = [[g.index, kind, n] for g in self.graphs for kind, n in sorted(g.readers.items())]
        if readers:
            lines.append(tabulate(readers, headers=["graph", "attention reader", "calls"], tablefmt="github"))
        swaps = [[g.index, readable(src), *memory_columns(mem)] for g in self.graphs
                 for src, mem in zip(g.swapped, g.swapped_memory)]
        if swaps:
            lines.append(tabulate(swaps, headers=["graph", "replaced by QVGCache", "x smaller",
                                                  "bits/elem: codes+scales", "codebooks", "open dense rows",
                                                  "token state"],
                                  tablefmt="github"))
            lines.extend(small_cache_note(readable(src), mem) for g in self.graphs
                         for src, mem in zip(g.swapped, g.swapped_memory) if mem["ratio"] < SMALL_CACHE_RATIO)
        rewrites = [[g.index, r] for g in self.graphs for r in g.rewrites]
        if rewrites:
            lines.append(tabulate(rewrites, headers=["graph", "rewrite"], tablefmt="github"))
        rejected = [[g.index, readable(r.source), r.reason] for g in self.graphs for r in g.rejected]
        errors = [[g.index, "-", e] for g in self.graphs for e in g.swap_errors + g.untouched]
        if rejected or errors:
            lines.append(tabulate(rejected + errors, headers=["graph", "left untouched", "why"],
                                  tablefmt="github"))
        eager = [[g.index, e] for g in self.graphs for e in g.eager]
        if eager:
            lines.append(tabulate(eager, headers=["graph", "runs eagerly because"],
                                  tablefmt="github"))
        unwrapped = [[g.index, g.flat_inputs] for g in self.graphs if g.flat_inputs not in ("", "yes")]
        if unwrapped:
            lines.append(tabulate(unwrapped, headers=["graph", "cache inputs unwrapped by AOTAutograd at every call "
                                                               "(slower host) because"], tablefmt="github"))
        reads = read_rows(self.cache_reads)
        if reads:
            lines.append(tabulate(reads, headers=["cache reads while explaining", "calls"], tablefmt="github"))
        if self.graph_breaks:
            lines.append(tabulate([[b] for b in self.graph_breaks], headers=["graph break"],
                                  tablefmt="github"))
        lines.extend(self.notes)
        lines.extend(self.budget_notes())
        if diff:
            lines.extend(d for d in (g.diff() for g in self.graphs) if d)
        return "\n\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def read_counts(before: dict, after: dict) -> dict:
    """What happened between two `qvg_compile.stats()` snapshots: fast reads, general reads by
    reason, fallbacks by op."""
    def diff(a: dict, b: dict) -> dict:
        return {k: n - a.get(k, 0) for k, n in b.items() if n > a.get(k, 0)}

    return {"fast": after["fast_reads"] - before["fast_reads"],
            "general": diff(before["general_why"], after["general_why"]),
            "fallbacks": diff(before["fallbacks"], after["fallbacks"])}


def read_rows(reads: dict) -> list[list]:
    """Table rows of `read_counts`: the fast path, then each reason for the general path and
    each fallback."""
    if not reads or not (reads["fast"] or reads["general"] or reads["fallbacks"]):
        return []
    rows: list[list] = [["fast path (one gather + one SDPA)", reads["fast"]]]
    rows += [[f"general path: {why}", n] for why, n in sorted(reads["general"].items())]
    rows += [[f"dense fallback: {op}", n] for op, n in sorted(reads["fallbacks"].items())]
    return rows


# Below this, a replaced cache is explained: what its small size costs.
SMALL_CACHE_RATIO = 4.0


def memory_columns(mem: dict) -> list[str]:
    return [f"{mem['ratio']:.2f}", f"{mem['codes'] + mem['scales'] + mem['assignments']:.3f}",
            f"{mem['codebooks']:.3f}", f"{mem['open_rows']:.3f}", f"{mem['token_state'] + mem['dense_pieces']:.3f}"]


def small_cache_note(name: str, mem: dict) -> str:
    """Why ``name`` gains only ``mem['ratio']``: the fixed costs that a small cache spreads over
    few tokens (see `QVGCache.memory`)."""
    dense_bits = mem["ratio"] * mem["total"]
    sealed = dense_bits / max(mem["total"] - mem["open_rows"], 1e-12)
    return (f"{name}: {mem['ratio']:.1f}x smaller while generating ({sealed:.1f}x once sealed): its "
            f"open dense rows cost {mem['open_rows']:.2f} bits per element and its codebooks "
            f"{mem['codebooks']:.2f}, on top of {mem['codes'] + mem['scales'] + mem['assignments']:.2f} "
            "for the codes. The open rows (dense_chunks chunks of chunk_tokens, and the sinks) cost "
            "the cache dtype's bits x rows / capacity and are freed by qvg_compile.seal at the end of "
            "a video; a codebook of C centroids costs (8 for FP8, 16 for BF16) x C / (tokens sharing it) "
            "bits. The gain grows with the capacity over the chunk length.")


def plain(obj: Any) -> Any:
    """``obj`` as JSON-ready values: dataclasses and mappings as dicts, sequences as lists, other
    values as strings. Unlike `dataclasses.asdict` it never copies a value, so symbolic sizes and
    fake tensors of a traced graph are printed, not deep-copied (which they refuse)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
