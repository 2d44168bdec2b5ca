"""Find attention readers in an FX graph: the nodes that consume K and V.

Kinds recognised:
- ``sdpa``: ``F.scaled_dot_product_attention`` and its ATen variants (flash, efficient, cuDNN,
  the CPU flash kernel), whose output 0 is the attention output;
- ``flash_attn``: flash-attn custom ops (``flash_attn::_flash_attn_forward`` and varlen forms),
  inputs ``[B, N, H, D]``;
- ``matmul_softmax``: ``softmax(q @ k^T * s [+ mask]) @ v`` written out by hand, with the
  softmax optionally in fp32 and cast back.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .graph_ops import (CAST_METHODS, MATMUL_TARGETS, SDPA_TARGETS, SDPA_TUPLE_TARGETS, SOFTMAX_TARGETS, arg,
                        is_call, is_method)


@dataclass
class Reader:
    """One attention call: its node, kind, and the nodes feeding q, k, v (k already untransposed
    for ``matmul_softmax``: ``k_node`` is the tensor before ``transpose(-2, -1)``)."""

    node: fx.Node
    kind: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    # matmul_softmax only: the softmax node and the ``q @ k^T`` matmul feeding it.
    scores: Optional[fx.Node] = None
    scores_matmul: Optional[fx.Node] = None
    # Sequence dim of k/v as the reader sees them: -2 for [B, H, N, D], 1 for flash-attn's
    # [B, N, H, D], 0 for its varlen [total, H, D].
    seq_dim: int = -2


def _unwrap_casts(node: object) -> object:
    while is_method(node, CAST_METHODS) or (
            isinstance(node, fx.Node) and node.op == "call_function"
            and getattr(node.target, "__name__", "") in ("_to_copy", "to")):
        node = node.args[0]
    return node


def _is_softmax(node: object) -> bool:
    return is_call(node, SOFTMAX_TARGETS) or is_method(node, {"softmax"})


def _is_matmul(node: object) -> bool:
    return is_call(node, MATMUL_TARGETS) or is_method(node, {"matmul", "bmm", "__matmul__"})


def _untranspose(node: object) -> Optional[fx.Node]:
    """``x`` for ``x.transpose(-2, -1)`` / ``x.mT`` / ``x.permute(..last two swapped)``."""
    if is_method(node, {"transpose"}) or (isinstance(node, fx.Node) and node.op == "call_function"
                                          and getattr(node.target, "__name__", "") == "transpose"):
        dims = {d % 4 if isinstance(d, int) and d < 0 else d for d in node.args[1:3]}
        if dims in ({2, 3}, {-2, -1}) or set(node.args[1:3]) == {-2, -1}:
            return node.args[0]
    if is_method(node, {"mT"}):
        return node.args[0]
    return None


def _scores_source(node: object) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
    """Walk back from the softmax input through scale/mask arithmetic to ``q @ k^T``."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        seen += 1
        node = _unwrap_casts(node)
        if _is_matmul(node):
            return node, None
        if isinstance(node, fx.Node) and (node.op in ("call_function", "call_method")) and \
                getattr(node.target, "__name__", node.target) in (
                    "mul", "truediv", "div", "add", "masked_fill", "where", "sub"):
            nexts = [a for a in node.args if isinstance(a, fx.Node)]
            node = nexts[0] if nexts else None
            continue
        if node.op == "call_function" and node.target in (operator.mul, operator.truediv, operator.add):
            nexts = [a for a in node.args if isinstance(a, fx.Node)]
            node = nexts[0] if nexts else None
            continue
        return None, None
    return None, None


def _op_name(target: object) -> str:
    """``namespace::name`` of a torch op (overload or packet), else the Python name."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}"


def _default_overload(target: object) -> object:
    """Dynamo records ``torch.ops.aten.x(...)`` with the packet: compare by its default overload."""
    if isinstance(target, torch._ops.OpOverloadPacket) and hasattr(target, "default"):
        return target.default
    return target


def _is_flash_attn_forward(node: fx.Node) -> bool:
    name = _op_name(node.target)
    return "flash_attn" in name and ("forward" in name or "fwd" in name or name.endswith("_func"))


def find_readers(graph: fx.Graph) -> list[Reader]:
    """Every attention reader in ``graph``, in graph order."""
    readers: list[Reader] = []
    for node in graph.nodes:
        target = _default_overload(node.target) if node.op == "call_function" else None
        if target in SDPA_TARGETS or target in SDPA_TUPLE_TARGETS:
            readers.append(Reader(node, "sdpa", arg(node, 0, "query"), arg(node, 1, "key"),
                                  arg(node, 2, "value")))
        elif node.op == "call_function" and _is_flash_attn_forward(node) and len(node.args) >= 3:
            varlen = "varlen" in _op_name(node.target)
            readers.append(Reader(node, "flash_attn", node.args[0], node.args[1], node.args[2],
                                  seq_dim=0 if varlen else 1))
        elif _is_matmul(node):
            probs = _unwrap_casts(node.args[0])
            if not _is_softmax(probs):
                continue
            qk, _ = _scores_source(probs.args[0])
            if qk is None:
                continue
            k = _untranspose(qk.args[1])
            if k is None:
                continue
            readers.append(Reader(node, "matmul_softmax", qk.args[0], k, node.args[1], scores=probs,
                                  scores_matmul=qk))
    return readers
