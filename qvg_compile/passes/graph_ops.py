"""What FX nodes mean to the KV-cache passes: readers, writers, and ops K/V flow through.

Graphs reach the passes at two levels: Dynamo's torch-level graph (``operator.setitem``,
``torch.cat``, ``call_method`` nodes such as ``transpose``) and ATen graphs (``aten.slice``,
``aten.cat``). Both spellings are listed so one walker serves both.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..cache import rope as _rope  # noqa: F401  (registers qvg::rope, a RoPE op K flows through)

aten = torch.ops.aten

SDPA_TARGETS = {
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    aten.scaled_dot_product_attention.default,
}
# ATen variants whose output 0 is the attention output.
SDPA_TUPLE_TARGETS = {
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}
SOFTMAX_TARGETS = {torch.softmax, F.softmax, torch.nn.functional.softmax, aten._softmax.default,
                   aten.softmax.int}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm, aten.bmm.default, aten.matmul.default}
CAT_TARGETS = {torch.cat, torch.concat, aten.cat.default}

# Ops through which a tensor stays "the same data" for the purpose of finding its source.
VIEW_METHODS = {
    "view", "reshape", "transpose", "permute", "contiguous", "expand", "expand_as", "repeat",
    "repeat_interleave", "to", "float", "half", "bfloat16", "double", "type", "type_as", "flatten",
    "unflatten", "unsqueeze", "squeeze", "clone", "detach", "cuda", "cpu", "narrow", "split",
    "chunk", "unbind", "view_as", "movedim", "swapaxes", "mT",
}
VIEW_FUNCTIONS = {
    operator.getitem, torch.transpose, torch.permute, torch.reshape, torch.repeat_interleave,
    torch.flatten, torch.unsqueeze, torch.squeeze, torch.clone, torch.split, torch.chunk,
    torch.narrow, torch.movedim, torch.swapaxes, torch.unbind, torch.view_as_real,
    torch.view_as_complex, torch.Tensor.to,
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int,
    aten.permute.default, aten.expand.default, aten.clone.default, aten.slice.Tensor,
    aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten._to_copy.default,
    aten.repeat.default, aten.repeat_interleave.self_int, aten.split.Tensor,
    aten.split_with_sizes.default, aten.alias.default, aten.view_as_real.default,
    aten.view_as_complex.default, aten.contiguous.default,
}
# Elementwise ops of RoPE applied at read time (cache x cos/sin tables).
ELEMENTWISE = {operator.mul, operator.add, operator.sub, torch.mul, torch.add, torch.sub,
               aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, torch.stack, torch.complex,
               aten.stack.default, torch.ops.qvg.rope.default}
ELEMENTWISE_METHODS = {"mul", "add", "sub", "mul_", "add_"}
MOVE_METHODS = {"to", "cuda", "cpu"}
GQA_METHODS = {"repeat_interleave", "expand", "repeat"}


def is_call(node: Any, targets: set) -> bool:
    """``node`` calls one of ``targets`` (an op packet, as Dynamo records ``torch.ops.aten.x``,
    counts as its default overload)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket) and hasattr(target, "default"):
        return target in targets or target.default in targets
    return target in targets


# Tensor methods that change dtype (or, for ``to``, device): attention operands pass through them.
CAST_METHODS = frozenset({"to", "type_as", "float", "half", "bfloat16", "type"})


def is_method(node: Any, names: set) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def op_name(node: fx.Node) -> str:
    """A short readable name: ``transpose``, ``setitem``, ``aten.slice``..."""
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


RESHAPE_METHODS = {"view", "reshape"}


def reshape_shape(node: fx.Node) -> Optional[list]:
    """The target shape of a ``x.reshape(...)``/``x.view(...)``/``torch.reshape`` node as a list
    (ints or size nodes, packed or spread in the call); None for any other node."""
    if not (node.op == "call_method" and node.target in RESHAPE_METHODS or is_call(node, {torch.reshape})) \
            or len(node.args) < 2 or node.kwargs:
        return None
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    return list(node.args[1] if packed else node.args[1:])


def traced_value(obj: Any) -> Any:
    """The value Dynamo traced for a node (a tensor, an int, a SymInt, a tuple); a constant as it is."""
    return obj.meta.get("example_value", obj.meta.get("val")) if isinstance(obj, fx.Node) else obj


def example_value(node: fx.Node) -> Optional[torch.Tensor]:
    value = traced_value(node)
    return value if isinstance(value, torch.Tensor) else None
