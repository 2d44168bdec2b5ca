"""Find KV-cache sites: graph inputs that persist across calls and are read by attention.

Starting from each attention reader's K and V, walk producers backwards through views, layout
changes, casts, device moves, GQA expansion, RoPE arithmetic and ``cat`` until graph inputs
(placeholders) are reached. A placeholder reached this way is a *cache* when something in the
graph shows it persists and grows along a sequence dim:

===  ==========================================================  =============================
id   evidence in the graph                                       rewrite (through QVGCache)
===  ==========================================================  =============================
A    slice writes into it (``setitem`` / ``copy_`` of a slice)   quantize-on-write, fused read
B    A plus a write whose value is a slice of itself (roll)      segment relabel, no requantize
C    a ``clone`` of it is written and read, it is not mutated    clone shares sealed segments
D    ``cat([it, new], seq)`` feeds attention (functional)        append returns a QVGCache
E    D or A with RoPE arithmetic between cache and attention     RoPE on the fused read path
F    K and V both sliced/split out of it along the last dim      packed split views
G    only read here, but known as a cache from another graph     carried across graphs
H    tensor-indexed writes (``index_put`` / ``index_copy_``)     contiguous-range writes
===  ==========================================================  =============================

Anything else read by attention (a ``cat`` of activations, a cross-attention constant) is
rejected with a reason and left untouched.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from .graph_ops import (CAT_TARGETS, ELEMENTWISE, ELEMENTWISE_METHODS, GQA_METHODS, MOVE_METHODS,
                        VIEW_FUNCTIONS, VIEW_METHODS, arg, example_value, is_call, is_method,
                        op_name)
from .readers import Reader, find_readers


@dataclass
class Site:
    """One cache tensor (a graph input) and how the graph uses it."""

    placeholder: str
    source: str
    idioms: list[str]
    roles: list[str]
    seq_dim: Optional[int]
    shape: tuple
    dtype: str
    layout: str
    readers: list[str]
    path: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def module_path(self) -> str:
        """The source as the model spells it: ``blocks.0.attn.k_cache``, ``kv_cache[3]['k']``."""
        return readable(self.source)


@dataclass
class Rejected:
    """A candidate left untouched, and why (``roles``: how attention read it, if it did)."""

    node: str
    source: str
    reason: str
    roles: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Known:
    """What other graphs (or earlier calls) showed about an input, keyed by its source.

    ``evidence`` is ``"cache"`` (proven), ``"written"`` (slice or index writes, no attention read
    in that graph), ``"read"`` (read by attention as K/V, never written in that graph) or
    ``"fed_back"`` (the tensor is an output of an earlier compiled graph). A ``"written"`` input
    read by attention here, or a ``"read"`` input written here, is a cache whose write and read
    were split by a graph break (idiom G); a ``"fed_back"`` input that attention reads
    concatenated with new tokens is a functional cache (idiom D)."""

    evidence: str
    seq_dim: Optional[int] = None
    roles: tuple[str, ...] = ()
    tokens: Optional[int] = None


@dataclass
class Trace:
    """What the backwards walk from one K or V input met."""

    placeholder: fx.Node
    ops: list[str]
    via_cat: Optional[int] = None
    cat_node: Optional[fx.Node] = None
    rope: bool = False
    moved: bool = False
    gqa: bool = False
    packed_last_dim: bool = False
    clone_of: bool = False
    read_dim: Optional[int] = None


_MODULE_DICTS = re.compile(r"\._(?:modules|buffers|parameters)\[['\"]([^'\"]+)['\"]\]")


def readable(source: str) -> str:
    """A Dynamo source name as the model spells it: ``L['self']._modules['blocks']._modules['0']
    ._buffers['k']`` -> ``blocks.0.k``; ``L['kv_cache'][0]['k']`` -> ``kv_cache[0]['k']``."""
    out = _MODULE_DICTS.sub(r".\1", source)
    out = re.sub(r"^L\['self'\]\.?", "", out)
    out = re.sub(r"^[LG]\['([^']+)'\]", r"\1", out)
    return out or source


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return source.name if source is not None and hasattr(source, "name") else str(node.target)


def _first_sliced_dim(index: object) -> Optional[int]:
    """Dim of the first non-trivial slice in an indexing tuple (``(slice(None), slice(s, e))`` -> 1)."""
    items = index if isinstance(index, tuple) else (index,)
    for dim, item in enumerate(items):
        if isinstance(item, slice) and (item.start, item.stop, item.step) != (None, None, None):
            return dim
        if isinstance(item, fx.Node):
            return dim
        if item is Ellipsis:
            return None
    return None


def _last_dim_slice(index: object, rank: int) -> bool:
    """``index`` slices only the last dim: ``x[:, :, :, :d]`` or ``x[..., d:]``."""
    items = index if isinstance(index, tuple) else (index,)
    full = len(items) == rank or (Ellipsis in items and items.index(Ellipsis) == len(items) - 2)
    return full and isinstance(items[-1], slice) and items[-1] != slice(None) and \
        all(i == slice(None) or i is Ellipsis for i in items[:-1])


def trace_back(node: object, limit: int = 64, seq_dim: int = -2) -> list[Trace]:
    """All placeholders ``node`` is computed from through data-preserving ops (``seq_dim``: the
    sequence dim of ``node`` as its reader sees it, followed back through transposes)."""
    out: list[Trace] = []

    def walk(n: object, ops: list[str], state: dict, depth: int) -> None:
        if not isinstance(n, fx.Node) or depth > limit:
            return
        if n.op == "placeholder":
            out.append(Trace(n, list(reversed(ops)), **state))
            return
        name = op_name(n)
        if is_call(n, CAT_TARGETS) or is_method(n, {"cat"}):
            dim = arg(n, 1, "dim", 0)
            parts = list(n.args[0] if n.args else n.kwargs.get("tensors", ()))
            for i, t in enumerate(parts):
                # Only the parts before the last are history; the last part is the new chunk.
                history = {"via_cat": dim, "cat_node": n} if i < len(parts) - 1 else {}
                walk(t, ops + [f"cat(dim={dim})"], {**state, **history}, depth + 1)
            return
        if is_call(n, VIEW_FUNCTIONS) or is_method(n, VIEW_METHODS):
            new_state = dict(state)
            new_state["read_dim"] = _dim_before(n, state["read_dim"])
            if is_method(n, MOVE_METHODS) or name in ("to", "_to_copy"):
                new_state["moved"] = new_state["moved"] or _is_device_move(n)
            if is_method(n, GQA_METHODS) or name in ("repeat_interleave", "expand"):
                new_state["gqa"] = True
            if is_method(n, {"clone"}) or name == "clone":
                new_state["clone_of"] = True
            if n.target is operator.getitem and isinstance(n.args[0], fx.Node):
                base = example_value(n.args[0])
                if isinstance(n.args[1], int) and n.args[0].op != "placeholder":
                    # getitem of a split/chunk/unbind result: a packed-layout read.
                    src = n.args[0]
                    if (is_method(src, {"split", "chunk", "unbind"}) or op_name(src) in ("split", "chunk")):
                        dim = arg(src, 2 if src.op == "call_function" else 2, "dim", 0)
                        if dim in (-1, (base.dim() - 1 if base is not None else -2)) or (
                                isinstance(dim, int) and dim == -1):
                            new_state["packed_last_dim"] = True
                elif base is not None and _last_dim_slice(n.args[1], base.dim()):
                    new_state["packed_last_dim"] = True
            walk(n.args[0], ops + [name], new_state, depth + 1)
            return
        if is_call(n, ELEMENTWISE) or is_method(n, ELEMENTWISE_METHODS):
            for t in n.args:
                if isinstance(t, (list, tuple)):
                    for u in t:
                        walk(u, ops + [name], {**state, "rope": True}, depth + 1)
                else:
                    walk(t, ops + [name], {**state, "rope": True}, depth + 1)
            return

    value = example_value(node) if isinstance(node, fx.Node) else None
    start_dim = seq_dim % value.dim() if value is not None and value.dim() >= 2 else None
    walk(node, [], dict(via_cat=None, cat_node=None, rope=False, moved=False, gqa=False, packed_last_dim=False,
                        clone_of=False, read_dim=start_dim), 0)
    return out


def _dim_before(n: fx.Node, dim: Optional[int]) -> Optional[int]:
    """Where dim ``dim`` of ``n``'s output sits in its input (None when a view mixes dims)."""
    if dim is None:
        return None
    src = example_value(n.args[0]) if isinstance(n.args[0], fx.Node) else None
    out = example_value(n)
    if src is None or out is None:
        return None
    name = op_name(n)
    if name in ("transpose", "swapaxes") and len(n.args) >= 3:
        a, b = (d % src.dim() for d in n.args[1:3])
        return b if dim == a else a if dim == b else dim
    if name == "permute":
        dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else n.args[1:]
        return dims[dim] % src.dim()
    if src.dim() == out.dim() and src.shape[:dim] == out.shape[:dim]:
        return dim
    return None


def _is_device_move(n: fx.Node) -> bool:
    if is_method(n, {"cuda", "cpu"}):
        return True
    values = list(n.args[1:]) + list(n.kwargs.values())
    return any(isinstance(v, (str, torch.device)) for v in values)


@dataclass
class Writes:
    seq_dim: Optional[int] = None
    slice_writes: int = 0
    index_writes: int = 0
    self_copies: int = 0
    clone_writes: int = 0
    # Tokens one write covers along seq_dim, when static (the chunk length of the pipeline).
    tokens: Optional[int] = None

    @property
    def any(self) -> bool:
        return bool(self.slice_writes or self.index_writes)


def _writes_into(ph: fx.Node) -> Writes:
    """How the graph mutates placeholder ``ph`` (directly, or a clone of it for idiom C)."""
    w = Writes()
    roots = [ph] + [u for u in ph.users if is_method(u, {"clone"}) or op_name(u) == "clone"]
    for root in roots:
        for user in list(root.users):
            if user.target is operator.setitem and user.args[0] is root:
                index, value = user.args[1], user.args[2]
                dim = _first_sliced_dim(index)
                has_tensor_index = any(isinstance(i, fx.Node) for i in
                                       (index if isinstance(index, tuple) else (index,)))
                if has_tensor_index:
                    w.index_writes += 1
                else:
                    w.slice_writes += 1
                if root is not ph:
                    w.clone_writes += 1
                if w.seq_dim is None:
                    w.seq_dim = dim
                    w.tokens = _static_size(value, dim)
                if any(t.placeholder is ph for t in trace_back(value)):
                    w.self_copies += 1
            elif is_method(user, {"index_copy_", "index_put_", "index_add_"}) and user.args[0] is root:
                w.index_writes += 1
                if w.seq_dim is None and isinstance(user.args[1], int):
                    w.seq_dim = user.args[1]
            elif user.target is operator.getitem and user.args[0] is root:
                for uu in user.users:
                    if is_method(uu, {"copy_"}) and uu.args[0] is user:
                        w.slice_writes += 1
                        if w.seq_dim is None:
                            w.seq_dim = _first_sliced_dim(user.args[1])
    return w


KnownFn = Callable[[fx.Node], "Optional[Known] | bool"]


def _as_known(value: "Optional[Known] | bool") -> Optional[Known]:
    if isinstance(value, Known):
        return value
    return Known("cache") if value else None


# Why a traced attention operand that no idiom claims is left untouched.
APPENDED_CONSTANT = ("concatenated with new tokens for attention, but the concatenation is not returned "
                     "and the tensor neither came from a graph output nor is known as a cache from another "
                     "graph (a constant prefix such as text K/V): left untouched")
READ_ONLY = ("read by attention but never written or appended to in this graph, and not known as a "
             "cache from another graph (cross-attention constant or positional table): left untouched")


def idioms_of(t: Trace, writes: Writes, known: Optional[Known]) -> tuple[list[str], Optional[str]]:
    """The idioms (design doc, section 5) a graph input shows as the attention operand traced by
    ``t``, given the writes into it and what other graphs showed (``known``): ``(idioms, None)``,
    or ``([], reason)`` when it is not a cache."""
    idioms: list[str] = []
    if writes.slice_writes and not writes.clone_writes:
        idioms.append("A")
    if writes.self_copies:
        idioms.append("B")
    if writes.clone_writes:
        idioms.append("C")
    appended = t.via_cat is not None and not writes.slice_writes
    if appended and (_reaches_output(t.cat_node) or (
            known is not None and known.evidence in ("cache", "written", "fed_back"))):
        idioms.append("D")
    if writes.index_writes:
        idioms.append("H")
    if t.packed_last_dim:
        idioms.append("F")
    if (not idioms or idioms == ["F"]) and known is not None and known.evidence in ("cache", "written"):
        idioms.append("G")
    if not idioms or idioms == ["F"]:
        return [], APPENDED_CONSTANT if appended else READ_ONLY
    if t.rope:
        idioms.append("E")
    return idioms, None


def seq_dim_of(t: Trace, writes: Writes, known: Optional[Known], rank: int) -> Optional[int]:
    """The sequence dim of a cache input: where it is written, else where new tokens are
    concatenated, else what another graph showed, else the dim attention reads along."""
    seq_dim = writes.seq_dim if writes.seq_dim is not None else t.via_cat
    if seq_dim is None and known is not None:
        seq_dim = known.seq_dim
    if seq_dim is None:
        seq_dim = t.read_dim
    if isinstance(seq_dim, int) and seq_dim < 0:
        seq_dim += rank
    return seq_dim


def _add_reading(site: Site, t: Trace, idioms: Sequence[str], role: str, reader: Reader) -> None:
    for i in idioms:
        if i not in site.idioms:
            site.idioms.append(i)
    if role not in site.roles:
        site.roles.append(role)
    if reader.node.name not in site.readers:
        site.readers.append(reader.node.name)
    for flag, note in ((t.moved, "device move at read"), (t.gqa, "GQA expansion"), (t.rope, "RoPE applied at read")):
        if flag and note not in site.notes:
            site.notes.append(note)


def _written_for_another_graph(graph: fx.Graph, found: dict[fx.Node, Site], known_cache: KnownFn) -> None:
    """Inputs written here and read by attention in another graph (a graph break between them)."""
    for ph, writes in written_inputs(graph).items():
        known = _as_known(known_cache(ph))
        if ph in found or known is None or known.evidence not in ("cache", "read"):
            continue
        seq_dim = writes.seq_dim if writes.seq_dim is not None else known.seq_dim
        site = new_site(ph, example_value(ph), seq_dim, [])
        site.idioms = ["G"] + (["H"] if writes.index_writes else []) + (["B"] if writes.self_copies else [])
        site.roles = list(known.roles)
        site.notes.append("written here, read by attention in another graph")
        found[ph] = site


def find_sites(
    graph: fx.Graph,
    known_cache: KnownFn = lambda node: None,
) -> tuple[list[Site], list[Rejected], list[Reader]]:
    """Cache sites of ``graph``, the candidates rejected (with the reason) and the attention readers.

    ``known_cache(placeholder)`` returns what other graphs (or earlier calls) showed about that
    input: a `Known`, ``True`` for a proven cache, or ``None``. It turns an input that is only
    read here, or only written here, into a site when another graph did the other half (G).
    """
    readers = find_readers(graph)
    found: dict[fx.Node, Site] = {}
    rejected: list[Rejected] = []

    def reject(node: fx.Node, reason: str, role: Optional[str] = None) -> None:
        for r in rejected:
            if r.node == node.name and r.reason == reason:
                if role and role not in r.roles:
                    r.roles.append(role)
                return
        rejected.append(Rejected(node.name, _source_name(node), reason, [role] if role else []))

    for reader in readers:
        # Inputs the query is computed from hold the current chunk's activations, not history.
        query_inputs = {t.placeholder for t in trace_back(reader.q)}
        for role, operand in (("key", reader.k), ("value", reader.v)):
            traces = trace_back(operand, seq_dim=reader.seq_dim)
            if not traces:
                rejected.append(Rejected(reader.node.name, "-", f"{role} of {reader.kind} is computed "
                                         "from activations only (no graph input): not a cache"))
            for t in traces:
                ph = t.placeholder
                writes = _writes_into(ph)
                value = example_value(ph)
                if (ph in query_inputs and not writes.slice_writes) or value is None or value.dim() < 3 \
                        or not value.dtype.is_floating_point:
                    continue
                known = _as_known(known_cache(ph))
                idioms, reason = idioms_of(t, writes, known)
                if reason is not None:
                    reject(ph, reason, role)
                    continue
                if ph not in found:
                    found[ph] = new_site(ph, value, seq_dim_of(t, writes, known, value.dim()), t.ops)
                _add_reading(found[ph], t, idioms, role, reader)
    _written_for_another_graph(graph, found, known_cache)
    for site in found.values():
        if "F" in site.idioms and len(site.roles) < 2:
            # A last-dim split feeding only K (e.g. RoPE halves) is not a packed K/V layout.
            site.idioms.remove("F")
        site.idioms.sort()
        if site.seq_dim is None:
            rejected.append(Rejected(site.placeholder, site.source,
                                     "could not tell its sequence dim: left untouched", list(site.roles)))
    sites = [s for s in found.values() if s.seq_dim is not None]
    return sites, rejected, readers


def _reaches_output(node: Optional[fx.Node]) -> bool:
    """``node`` (or a view, copy or cast of it) is returned by the graph: a functional append
    whose result the caller keeps (idiom D)."""
    seen: set[fx.Node] = set()
    todo = [node] if node is not None else []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user.op == "output":
                return True
            if (is_call(user, VIEW_FUNCTIONS) or is_method(user, VIEW_METHODS)) and user.args and user.args[0] is n:
                todo.append(user)
    return False


def new_site(ph: fx.Node, value: torch.Tensor, seq_dim: Optional[int], ops: list[str]) -> Site:
    """A `Site` for input ``ph`` (example ``value``) with no idioms or roles yet."""
    layout = {1: "[B, S, H, D]", 2: "[B, H, S, D]"}.get(seq_dim, f"seq dim {seq_dim}")
    return Site(ph.name, _source_name(ph), [], [], seq_dim, tuple(value.shape),
                str(value.dtype).replace("torch.", ""), layout, [], ops)


def written_inputs(graph: fx.Graph) -> dict[fx.Node, Writes]:
    """Floating-point inputs of rank >= 3 that ``graph`` writes by slice or index (their seq dim
    is the written dim), whether or not attention reads them here."""
    out: dict[fx.Node, Writes] = {}
    for ph in graph.nodes:
        if ph.op != "placeholder":
            continue
        value = example_value(ph)
        if value is None or value.dim() < 3 or not value.dtype.is_floating_point:
            continue
        writes = _writes_into(ph)
        if writes.any and not writes.clone_writes and writes.seq_dim is not None:
            out[ph] = writes
    return out


def _static_size(value: object, dim: Optional[int]) -> Optional[int]:
    t = example_value(value) if isinstance(value, fx.Node) else None
    if t is None or dim is None or dim >= t.dim():
        return None
    size = t.shape[dim]
    return size if isinstance(size, int) else None
