"""RoPE over a cache view, handed to the read instead of computed on a decoded copy (idiom E).

Pattern (LongCat-Video's denoising attention, after idiom K made its cache a `QVGCache`)::

    k_full = cat([k_cache, k_new], dim=seq).contiguous()        # a cache view (stored + dense)
    out = f(k_full, cos, sin)                                   # RoPE, spelled any way

where ``f`` is any chain of ops that reads only the cache value and two tables and computes
``x * cos + rot(x) * sin`` (`cache.rope`: channel pairs or halves, in fp32 or the cache's dtype).
Run on a `QVGCache`, each op of ``f`` would decode the whole history (a counted fallback per op)
and attention would then read dense keys beside cached values.

Rewrite: ``out`` becomes ``qvg::rope(k_full, cos, sin, layout, compute)``, which on a `QVGCache`
is a rotated view (nothing decoded; the read rotates the rows it gathers). ``f`` is recognised
by what it computes, not by its spelling: the chain between the cache value and ``out`` (every
intermediate used only inside it, nothing read from outside but the two tables) is copied into a
small graph and run on random probes at a few tokens; it must equal the canonical rotation
of one layout and compute dtype, with either table as ``cos``, on two draws. A chain that does not
(or cannot run at probe size, e.g. a reshape that writes the token count out) is left as
written and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..cache import QVGCache
from ..cache.rope import LAYOUTS, RopeSpec, apply
from .boundary import SAME_RANK
from .graph_ops import (CAT_TARGETS, SDPA_TARGETS, example_value, is_call, op_name, reshape_shape,
                        traced_value)

# Queries padded with ``empty_like(cache)`` to share the keys' RoPE call become a rotated view
# too where `pad_slice` cannot drop the padding (it drops LongCat's at any length, symbolic ones
# included). Torch 2.11's Dynamo failed building the shape guards of a graph that received a
# slice of such a view across a compiler-disabled call (view replay of a subclass gives the slice
# start an ephemeral symbol, which reached a guard on ``q._base.size()``: InternalTorchDynamoError,
# LongCat at real width on an H200, commit 004a120), so before 2.13 a graph swapped in eagerly
# keeps those queries dense and their RoPE is a counted fallback.
_PADS = {"empty_like", "zeros_like"} if torch.torch_version.TorchVersion(torch.__version__) >= (2, 13) else set()
# Nodes looked at after a cache value when searching for the end of its RoPE chain.
CHAIN_LIMIT = 64
PROBE_TOKENS = 5
PROBE_LEAD = 2


@dataclass(frozen=True)
class RopeChain:
    """A recognised chain: its cache value, last node, tables (as ``cos``, ``sin``), and how it rotates."""

    root: fx.Node
    out: fx.Node
    cos: fx.Node
    sin: fx.Node
    spec: RopeSpec
    nodes: frozenset


def rope_at_read(graph: fx.Graph) -> tuple[list[str], list[str]]:
    """Rewrite every RoPE chain over a `QVGCache` value of ``graph`` into ``qvg::rope``. Returns
    one line per rewrite and one per cache value whose other computation was left as written."""
    done, left = [], []
    claimed: set[fx.Node] = set()
    for root in list(graph.nodes):
        if root in claimed or root.graph is not graph or _seq_dim(root) is None:
            continue
        chain = find_chain(root)
        if chain is None:
            continue
        with graph.inserting_before(chain.out):
            new = graph.call_function(torch.ops.qvg.rope.default,
                                      (root, chain.cos, chain.sin, chain.spec.layout, chain.spec.compute))
        new.meta.update(chain.out.meta)
        chain.out.replace_all_uses_with(new)
        claimed |= chain.nodes
        done.append(f"{chain.out.name}: RoPE ({chain.spec.layout}, {chain.spec.compute}) of the cache value "
                    f"{root.name} applied at read (tables {chain.cos.name}, {chain.sin.name})")
    if done:
        graph.eliminate_dead_code()
    for node in graph.nodes:
        if isinstance(example_value(node), QVGCache) and _dense_users(node):
            left.append(f"{node.name}: computed on by {', '.join(u.name for u in _dense_users(node))}, not "
                        f"recognised as RoPE; left as written (runs on a decoded copy)")
    return done, left


def _dense_users(node: fx.Node) -> list[fx.Node]:
    """Users of a cache value that make a dense tensor out of it, other than attention."""
    out = []
    for user in node.users:
        value = example_value(user)
        if user.op in ("call_function", "call_method") and isinstance(value, torch.Tensor) \
                and not isinstance(value, QVGCache) and not _is_read(user):
            out.append(user)
    return out


def _is_read(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in SDPA_TARGETS or str(node.target).startswith("qvg."))


def _seq_dim(root: fx.Node) -> Optional[int]:
    """The sequence dim of a value a RoPE chain may start at: a `QVGCache` value, or a ``cat`` that appends new
    tokens to a graph input (idiom K's producing graph before its input is swapped: the graph
    then runs eagerly on the swapped cache once, and must not rotate it op by op). None for
    anything else."""
    value = example_value(root)
    if isinstance(value, QVGCache):
        return value.seq_dim
    if not is_call(root, CAT_TARGETS) or not isinstance(value, torch.Tensor) or value.dim() < 3 \
            or not value.dtype.is_floating_point:
        return None
    parts = root.args[0] if root.args else root.kwargs.get("tensors", ())
    if not isinstance(parts, (list, tuple)) or len(parts) < 2 or not all(_from_input(p) for p in parts[:-1]):
        return None
    dim = root.args[1] if len(root.args) > 1 else root.kwargs.get("dim", 0)
    return dim % value.dim()


def _from_input(node: object) -> bool:
    """``node`` is a graph input through same-rank ops (moves, casts, batch repeats), or a padding
    of its shape (queries padded to share the cache's RoPE call when `pad_slice` cannot drop it)."""
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if op_name(node) not in SAME_RANK | _PADS:
            return False
        node = node.args[0] if node.args else None
    return isinstance(node, fx.Node)


def find_chain(root: fx.Node) -> Optional[RopeChain]:
    """The RoPE chain that starts at the cache value ``root``, if one does (see the module doc)."""
    value = example_value(root)
    forward = _descendants(root)
    for out in forward:
        out_value = example_value(out)
        if not isinstance(out_value, torch.Tensor) or out_value.dtype != value.dtype \
                or out_value.dim() != value.dim() or not _same_shape(out_value, value):
            continue
        nodes = _between(root, out, set(forward))
        if not all(set(n.users) <= nodes for n in nodes if n is not out):
            continue
        tables = _external(nodes, root)
        if tables is None or len(tables) != 2:
            continue
        spec, order = _probe(root, out, nodes, tables)
        if spec is not None:
            return RopeChain(root, out, order[0], order[1], spec, frozenset(nodes))
    return None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _descendants(root: fx.Node) -> list[fx.Node]:
    """Up to `CHAIN_LIMIT` nodes computed from ``root``, in graph order."""
    seen: set[fx.Node] = set()
    todo = list(root.users)
    while todo and len(seen) < CHAIN_LIMIT:
        node = todo.pop(0)
        if node in seen or node.op not in ("call_function", "call_method"):
            continue
        seen.add(node)
        todo.extend(node.users)
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _between(root: fx.Node, out: fx.Node, forward: set[fx.Node]) -> set[fx.Node]:
    """Nodes computed from ``root`` that ``out`` depends on, ``out`` included."""
    nodes, todo = set(), [out]
    while todo:
        node = todo.pop()
        if node in nodes or node not in forward:
            continue
        nodes.add(node)
        todo.extend(node.all_input_nodes)
    return nodes


def _external(nodes: set[fx.Node], root: fx.Node) -> Optional[list[fx.Node]]:
    """The nodes the chain reads besides ``root`` and itself: tensors only, else None."""
    found: list[fx.Node] = []
    for node in nodes:
        sizes = _leading_sizes(node)
        for arg in node.all_input_nodes:
            if arg is root or arg in nodes or arg in found or arg in sizes:
                continue
            if not isinstance(example_value(arg), torch.Tensor) or isinstance(example_value(arg), QVGCache):
                return None
            found.append(arg)
    return found


def _probe_shapes(root: fx.Node, tables: list[fx.Node]) -> Optional[tuple[list[int], list[list[int]]]]:
    """Shapes of the probes: the cache value's rank with `PROBE_TOKENS` tokens, `PROBE_LEAD` rows
    along every other dim but the (static) channels; each table sized to broadcast the same way."""
    value = example_value(root)
    seq, rank = _seq_dim(root), value.dim()
    channels = value.shape[-1]
    if not isinstance(channels, int):
        return None
    shape = [PROBE_TOKENS if d == seq else channels if d == rank - 1 else PROBE_LEAD for d in range(rank)]
    table_shapes = []
    for t in tables:
        tv = example_value(t)
        if tv.dim() > rank:
            return None
        sizes = []
        for i, size in enumerate(tv.shape):
            d = rank - tv.dim() + i
            if d == seq and not statically_known_true(size == 1):
                sizes.append(PROBE_TOKENS)  # one row per token: the probe's tokens
            elif statically_known_true(size == 1) or (d == rank - 1 and statically_known_true(size == channels)):
                sizes.append(int(size))
            else:
                return None  # a table that varies along a batch or head dim
        table_shapes.append(sizes)
    return shape, table_shapes


def _probe(root: fx.Node, out: fx.Node, nodes: set[fx.Node], tables: list[fx.Node]
           ) -> tuple[Optional[RopeSpec], tuple[fx.Node, ...]]:
    """The rotation the chain computes, and its tables as ``(cos, sin)``; ``(None, ())`` if none."""
    shapes = _probe_shapes(root, tables)
    if shapes is None:
        return None, ()
    chain = _chain_module(root, out, nodes, tables)
    value = example_value(root)
    dtypes = [example_value(t).dtype for t in tables]
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(2):
        x = torch.randn(shapes[0], generator=gen).to(value.dtype)
        ts = [torch.randn(s, generator=gen).to(dt) for s, dt in zip(shapes[1], dtypes)]
        try:
            with torch.no_grad():
                got = chain(x, *ts)
        except Exception:  # noqa: BLE001 (a chain that cannot run at probe size is not rewritten)
            return None, ()
        draws.append((x, ts, got))
    computes = dict.fromkeys([torch.float32, torch.promote_types(value.dtype, dtypes[0])])
    for layout in LAYOUTS:
        for compute in computes:
            spec = RopeSpec(layout, str(compute).removeprefix("torch."))
            for order in ((0, 1), (1, 0)):
                if all(_matches(got, apply(x, ts[order[0]], ts[order[1]], spec)) for x, ts, got in draws):
                    return spec, (tables[order[0]], tables[order[1]])
    return None, ()


def _matches(got: Any, want: torch.Tensor) -> bool:
    if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
        return False
    eps = torch.finfo(want.dtype).eps
    return torch.allclose(got.float(), want.float(), rtol=8 * eps, atol=8 * eps)


def _chain_module(root: fx.Node, out: fx.Node, nodes: set[fx.Node], tables: list[fx.Node]) -> fx.GraphModule:
    """The chain as a graph module of ``(x, *tables)``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {root: graph.placeholder("x")}
    for i, t in enumerate(tables):
        env[t] = graph.placeholder(f"table{i}")
    for node in root.graph.nodes:
        if node not in nodes:
            continue
        lead = len(_leading_sizes(node))
        if lead:
            # A reshape that spells out its input's leading sizes (einops' ``rearrange`` does:
            # ``x.reshape([B, H, N, D // 2, 2])``, the token count included, as ints or as size
            # symbols) reshapes only its trailing dims: at probe size those sizes are the probe's.
            x = env[node.args[0]]
            sizes = reshape_shape(node)
            rest = [env[v] if isinstance(v, fx.Node) else v for v in sizes[lead:]]
            env[node] = graph.call_method("reshape", (x, [graph.call_method("size", (x, i))
                                                         for i in range(lead)] + rest))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[out])
    return fx.GraphModule(torch.nn.Module(), graph)


def _leading_sizes(node: fx.Node) -> list:
    """The leading entries of a reshape's target shape that are its input's own sizes (ints or
    size nodes, known equal; never the last dim); [] for any other node."""
    sizes = reshape_shape(node)
    source = example_value(node.args[0]) if sizes is not None and isinstance(node.args[0], fx.Node) else None
    if not isinstance(source, torch.Tensor):
        return []
    lead = 0
    while lead < min(len(sizes), source.dim()) - 1:
        entry = sizes[lead]
        size = traced_value(entry)
        if not isinstance(size, (int, torch.SymInt)) or not statically_known_true(source.shape[lead] == size):
            break
        lead += 1
    return sizes[:lead]
