"""Queries padded to a cache's length only to share one RoPE call: the padding is dropped.

Pattern (LongCat-Video's denoising attention)::

    padded = cat([empty_like(cache), q], dim=d)        # or zeros_like
    rotated = f(padded, tables...)                     # token by token along d
    q = rotated[..., -n:, ...]                         # exactly q's n tokens back

where ``f`` is a chain of elementwise ops and views of the dims after ``d`` (``unbind`` and
``stack`` of such dims, ``reshape`` with the token count written out or read from ``size()``), and
every table it reads either broadcasts over the tokens or has one row per token. The slice's start
may be a graph value (``-q.size(d)``) whose traced value is ``-n``. The padded rows are computed
and thrown away: on a `QVGCache`, ``empty_like`` is an empty cache, the ``cat`` an append and the
RoPE products a decode of the whole history.

Rewrite: ``f`` over ``q`` itself, each per-token table narrowed to its last ``n`` rows; the slice's
users take the result and the padding is gone. Same values (the dropped rows never reach a
result). The token counts may be symbolic (a growing cache, a chunk length Dynamo made dynamic):
sizes are compared only where the shape environment proves them equal, and a symbolic ``n`` is
read back from ``q`` (``q.size(d)``). Anything else in the chain, a padded row or size used
elsewhere, or a slice that is not exactly the last ``n`` tokens leaves the graph as it is.
"""

from __future__ import annotations

import heapq
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

from .graph_ops import CAT_TARGETS, example_value, is_call, is_method, op_name, reshape_shape, traced_value

_PADS = {"empty_like", "zeros_like"}
# Ops that act on each token alone when they keep the dims up to the token dim (checked by shape).
_TOKENWISE_FUNCTIONS = {operator.mul, operator.add, operator.sub, operator.neg, operator.truediv, operator.getitem,
                        torch.mul, torch.add, torch.sub, torch.neg, torch.stack, torch.flatten, torch.unflatten,
                        torch.reshape}
_TOKENWISE_METHODS = {"float", "to", "type_as", "contiguous", "unflatten", "flatten", "view", "reshape", "mul",
                      "add", "sub", "neg", "half", "bfloat16"}


def _as_int(value: object) -> Optional[int]:
    """``value`` as an int when it is one: an int, or a SymInt whose expression is a constant."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt) and is_concrete_int(value):
        return int(value.node.expr)
    return None


def _size(value: object) -> Optional[Any]:
    """``value`` as a size: an int, or a SymInt (kept symbolic); None for anything else."""
    if isinstance(value, torch.SymInt) and not is_concrete_int(value):
        return value
    return _as_int(value)


def _same(a: object, b: object) -> bool:
    """Sizes ``a`` and ``b`` (ints or SymInts) are equal for every value of their symbols (no guard)."""
    return a is not None and b is not None and statically_known_true(a == b)


def _is_size(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "size"


def _is_unbind(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "unbind") or is_call(node, {torch.unbind})


def _unbind_dim(node: fx.Node) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % example_value(node.args[0]).dim()


def drop_query_padding(graph: fx.Graph) -> list[str]:
    """Apply the rewrite wherever the pattern holds; returns one line per rewrite."""
    done = []
    for cat in list(graph.nodes):
        if cat.graph is graph and (is_call(cat, CAT_TARGETS) or is_method(cat, {"cat"})):
            note = _rewrite(graph, cat)
            if note:
                done.append(note)
    if done:
        graph.eliminate_dead_code()
    return done


def _rewrite(graph: fx.Graph, cat: fx.Node) -> Optional[str]:
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    value = example_value(cat)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or value is None:
        return None
    pad, tail = parts
    if not (isinstance(pad, fx.Node) and isinstance(tail, fx.Node) and op_name(pad) in _PADS):
        return None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    dim %= value.dim()
    total, tail_value = _size(value.shape[dim]), example_value(tail)
    n = None if tail_value is None else _size(tail_value.shape[dim])
    if total is None or n is None:
        return None
    lead = tuple(value.shape[:dim + 1])
    chain, slices = _chain(cat, dim, lead, total, n)
    if chain is None or not slices:
        return None
    new: dict[fx.Node, Any] = {cat: tail}
    for node in chain[1:]:
        if not _is_size_value(node) and not _is_unbind(node) and not (
                node.target is operator.getitem and _is_unbind(node.args[0])) \
                and not _token_args_ok(node, chain, dim, total):
            return None
    with graph.inserting_before(chain[1]):
        # The rewritten chain's token count: a symbolic one is read back from q when the graph runs.
        count = n if isinstance(n, int) else graph.call_method("size", (tail, dim))
    for node in chain[1:]:
        with graph.inserting_before(node):
            args = _map(node.args, new, graph, dim, total, count, node)
            kwargs = _map(node.kwargs, new, graph, dim, total, count, node)
            if reshape_shape(node) is not None:
                args = _token_count(args, dim, total, count)
            new[node] = graph.create_node(node.op, node.target, args, kwargs)
    for s in slices:
        s.replace_all_uses_with(new[s.args[0]])
    return f"{cat.name}: queries padded with {pad.name} along dim {dim} ({total - n} rows dropped)"


def _chain(cat: fx.Node, dim: int, lead: tuple, total: Any, n: Any
           ) -> tuple[Optional[list[fx.Node]], list[fx.Node]]:
    """The nodes computed from ``cat`` (topological, ``cat`` first) and the slices that end them;
    None when a node is not token-wise or a padded row (or a size of one) reaches anything else."""
    # Visited in graph order, so every input a node takes from the chain is seen before it (a
    # reshape is also reached through the sizes it writes out, before the tensor it reshapes).
    order = {node: i for i, node in enumerate(cat.graph.nodes)}
    chain, slices, todo = [cat], [], [(order[u], u) for u in cat.users]
    heapq.heapify(todo)
    seen = {cat}

    def push(users) -> None:
        for user in users:
            heapq.heappush(todo, (order[user], user))

    while todo:
        node = heapq.heappop(todo)[1]
        if node in seen:
            continue
        seen.add(node)
        if _is_last_rows(node, dim, total, n) and node.args[0] in seen:
            slices.append(node)
            continue
        if _is_size_value(node):
            # Sizes of a padded tensor: taken again from the rewritten one (its token count is n).
            chain.append(node)
            push(node.users)
            continue
        if not any(isinstance(a, fx.Node) and a in seen and not _is_size_value(a) for a in _tensor_args(node)):
            return None, []  # reached through a size only: it does not compute on padded rows
        if _is_unbind(node):
            if _unbind_dim(node) <= dim:
                return None, []
            chain.append(node)
            push(node.users)
            continue
        if node.target is operator.getitem and _is_unbind(node.args[0]):
            if not isinstance(node.args[1], int):
                return None, []
            chain.append(node)
            push(node.users)
            continue
        out = example_value(node)
        tokenwise = (node.op == "call_function" and node.target in _TOKENWISE_FUNCTIONS) or \
            (node.op == "call_method" and node.target in _TOKENWISE_METHODS)
        if not tokenwise or out is None or out.dim() <= dim or not all(map(_same, out.shape[:dim + 1], lead)):
            return None, []
        if node.target is torch.stack and ((node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
                                          % out.dim()) <= dim:
            return None, []
        if node.target is operator.getitem and not _indexes_after(node, dim):
            return None, []
        if reshape_shape(node) is not None and not _token_count_known(node, dim, total, seen):
            return None, []
        chain.append(node)
        push(node.users)
    return sorted(chain, key=order.__getitem__), slices


def _is_size_value(node: fx.Node) -> bool:
    return _is_size(node) or (node.target is operator.getitem and isinstance(node.args[0], fx.Node)
                              and _is_size(node.args[0]))


def _indexes_after(node: fx.Node, dim: int) -> bool:
    """``x[..., i, j]`` with constant indices that only reach dims after ``dim``."""
    index, base = node.args[1], example_value(node.args[0])
    if not isinstance(index, tuple) or not index or index[0] is not Ellipsis or base is None:
        return False
    rest = index[1:]
    if any(isinstance(i, fx.Node) or i is Ellipsis for i in rest):
        return False
    return sum(1 for i in rest if i is not None) <= base.dim() - dim - 1


def _is_last_rows(node: fx.Node, dim: int, total: Any, n: Any) -> bool:
    """``node`` is ``x[:, ..., -n:]`` (or ``x[..., total - n:, ...]``) along ``dim`` only."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[1], tuple):
        return False
    index = node.args[1]
    if len(index) != dim + 1 or any(i != slice(None) for i in index[:dim]):
        return False
    last = index[dim]
    if not isinstance(last, slice) or last.step is not None:
        return False
    start, stop = _size(traced_value(last.start)), _size(traced_value(last.stop))
    return (last.stop is None or _same(stop, total)) and (_same(start, -n) or _same(start, total - n))


def _token_args_ok(node: fx.Node, chain: list[fx.Node], dim: int, total: Any) -> bool:
    """Every tensor ``node`` reads besides the chain broadcasts over the tokens or has one row per token."""
    out = example_value(node)
    for arg in _tensor_args(node):
        if arg in chain or isinstance(traced_value(arg), (int, torch.SymInt)):
            continue
        value = example_value(arg)
        if value is None or out is None:
            return False
        k = _token_dim(value, out, dim)
        if k is not None and not (_same(value.shape[k], 1) or _same(value.shape[k], total)):
            return False
    return True


def _token_dim(value: torch.Tensor, out: torch.Tensor, dim: int) -> Optional[int]:
    """The dim of operand ``value`` that broadcasts against token dim ``dim`` of ``out``, or None."""
    k = dim - (out.dim() - value.dim())
    return k if k >= 0 else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else (a,)
        out.extend(i for i in items if isinstance(i, fx.Node))
    return out


def _map(obj: Any, new: dict[fx.Node, Any], graph: fx.Graph, dim: int, total: Any, count: Any,
         user: fx.Node) -> Any:
    """``obj`` with chain nodes replaced by their rewritten copies and per-token tables narrowed
    to their last ``count`` rows (``count``: an int, or the node holding q's token count)."""
    if isinstance(obj, fx.Node):
        if obj in new:
            return new[obj]
        value, out = example_value(obj), example_value(user)
        k = _token_dim(value, out, dim) if value is not None and out is not None else None
        if k is not None and _same(value.shape[k], total) and not _same(total, 1):
            start = -count if isinstance(count, int) else graph.call_function(operator.neg, (count,))
            return graph.call_function(torch.narrow, (obj, k, start, count))
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, new, graph, dim, total, count, user) for o in obj)
    if isinstance(obj, dict):
        return {key: _map(v, new, graph, dim, total, count, user) for key, v in obj.items()}
    return obj


def _token_count_known(node: fx.Node, dim: int, total: Any, seen: set) -> bool:
    """The target shape of a reshape in the chain says the token count as the literal ``total``,
    as ``-1``, or as a size of a padded tensor (anything else would keep ``total`` rows)."""
    shape = reshape_shape(node) or []
    if len(shape) <= dim:
        return False
    count = shape[dim]
    if isinstance(count, fx.Node):
        # ``x.size()[dim]`` (or ``x.size(dim)``) of a padded tensor: n once rewritten.
        if count.op == "call_method" and count.target == "size" and len(count.args) == 2:
            base, index = count.args
        elif count.target is operator.getitem and isinstance(count.args[0], fx.Node) and _is_size(count.args[0]) \
                and len(count.args[0].args) == 1:
            base, index = count.args[0].args[0], count.args[1]
        else:
            # A size expression Dynamo computed from its symbols (``sym_sum([4, s98])``) that is
            # the padded count for every value of them: made q's count like a literal one.
            return _same(_size(traced_value(count)), total)
        value = example_value(base) if isinstance(base, fx.Node) else None
        return base in seen and isinstance(index, int) and value is not None and index % value.dim() == dim
    return count == -1 or _same(_size(count), total)


def _token_count(args: tuple, dim: int, total: Any, count: Any) -> tuple:
    """The args of ``x.reshape(shape)`` / ``x.view(*shape)`` with the token count written out at
    ``dim`` (``total``) made ``count``; a count read from ``size()`` follows the rewritten tensor."""
    packed = len(args) == 2 and isinstance(args[1], (list, tuple))
    shape = list(args[1] if packed else args[1:])
    # A literal count, or a size expression of the padded count (a rewritten ``size()`` of a
    # chain node carries no traced value yet, so it is left as it is).
    if len(shape) > dim and _same(_size(traced_value(shape[dim])), total):
        shape[dim] = count
    return (args[0], type(args[1])(shape)) if packed else (args[0], *shape)
