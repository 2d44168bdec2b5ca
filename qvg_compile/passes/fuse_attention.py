"""Fusing hand-written attention over a cache into one SDPA, so the read takes the fused ``qvg::`` path.

`QVGCache` serves ``F.scaled_dot_product_attention`` with its fused blockwise read; attention
written out by hand (``softmax(q @ k^T * s + mask) @ v``) would instead decode the whole cache
for the matmuls. `fuse_matmul_softmax` turns that exact chain into one SDPA call when its K or V
is a cache. Anything that does not match exactly (a mask applied before the scale, a
``masked_fill``, probabilities used elsewhere, a softmax over another dim) is left as it is.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_ops import CAST_METHODS, example_value, is_call, is_method
from .readers import Reader, _is_matmul, _is_softmax, _untranspose

@dataclass
class _Chain:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    mask: Optional[fx.Node]
    nodes: list[fx.Node]  # from the final matmul back to q @ k^T, erased in this order


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _is_cast(node: object) -> bool:
    if not is_method(node, CAST_METHODS):
        return False
    # Only dtype casts: a device move or a tensor argument changes more than precision.
    return all(isinstance(a, torch.dtype) for a in list(node.args[1:]) + list(node.kwargs.values()))


def _scalar(value: object) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _match(reader: Reader) -> Optional[_Chain]:
    out, probs = reader.node, reader.node.args[0]
    nodes = [out]
    while _is_cast(probs):
        if not _single_user(probs):
            return None
        nodes.append(probs)
        probs = probs.args[0]
    if not _is_softmax(probs) or not _single_user(probs):
        return None
    dim = probs.kwargs.get("dim", probs.args[1] if len(probs.args) > 1 else None)
    value = example_value(probs)
    if value is None or dim not in (-1, value.dim() - 1) or probs.kwargs.get("dtype") is not None:
        return None
    nodes.append(probs)
    node = probs.args[0]
    while _is_cast(node) and _single_user(node):
        nodes.append(node)
        node = node.args[0]
    mask = None
    if (is_call(node, {operator.add, torch.add}) or is_method(node, {"add"})) and _single_user(node) \
            and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs:
        nodes.append(node)
        node, mask = node.args
    scale = 1.0
    if (is_call(node, {operator.mul, torch.mul}) or is_method(node, {"mul"})) and _single_user(node) \
            and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        factor = _scalar(b) if isinstance(a, fx.Node) else _scalar(a)
        if factor is None:
            return None
        nodes.append(node)
        scale, node = factor, a if isinstance(a, fx.Node) else b
    elif is_call(node, {operator.truediv, torch.div}) and _single_user(node) and len(node.args) == 2 \
            and not node.kwargs and _scalar(node.args[1]):
        nodes.append(node)
        scale, node = 1.0 / _scalar(node.args[1]), node.args[0]
    if not _is_matmul(node) or not _single_user(node) or node is not reader.scores_matmul:
        return None
    nodes.append(node)
    kt = node.args[1]
    if _single_user(kt):
        nodes.append(kt)
    q, k, v = node.args[0], _untranspose(kt), out.args[1]
    shapes = [example_value(t) for t in (q, k, v)]
    if any(s is None or s.dim() < 2 for s in shapes) or (mask is not None and example_value(mask) is None):
        return None
    return _Chain(q, k, v, scale, mask, nodes)


def fuse_matmul_softmax(graph: fx.Graph, reader: Reader, masks: bool = True) -> Optional[str]:
    """Replace ``reader`` (a ``matmul_softmax`` reader) by ``F.scaled_dot_product_attention(q, k,
    v, attn_mask=mask, scale=s)``. Returns what was done, or None when the chain does not match
    exactly, or has a mask and ``masks`` is False (the graph is then unchanged)."""
    if reader.kind != "matmul_softmax":
        return None
    chain = _match(reader)
    if chain is None or (chain.mask is not None and not masks):
        return None
    out = reader.node
    q_value = example_value(chain.q)
    with graph.inserting_before(out):
        mask = chain.mask
        if mask is not None and example_value(mask).dtype not in (q_value.dtype, torch.bool):
            mask = graph.call_method("to", (mask, q_value.dtype))
        sdpa = graph.call_function(F.scaled_dot_product_attention, (chain.q, chain.k, chain.v),
                                   {"attn_mask": mask, "scale": chain.scale})
    sdpa.meta.update({k: v for k, v in out.meta.items() if k in ("example_value", "stack_trace", "nn_module_stack")})
    out.replace_all_uses_with(sdpa)
    for node in chain.nodes:
        if not node.users:
            graph.erase_node(node)
    masked = " + mask" if chain.mask is not None else ""
    return (f"{out.name}: softmax(q @ k^T * {chain.scale:.4g}{masked}) @ v -> scaled_dot_product_attention "
            "(the fused QVGCache read)")
