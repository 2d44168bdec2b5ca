"""Caches whose read crosses a call outside the compiled graphs (idiom K).

Pattern: graph X concatenates an input with new tokens (``cat([cache, k], seq)``, optionally
RoPE after it) and returns the result; the caller hands it to a ``torch.compiler.disable``d
function (LongCat-Video's and HY-WorldPlay's sequence-parallel all-to-alls), which returns it
unchanged without context parallelism; graph Y, compiled after the break, reads it as attention's
K or V. Neither graph alone shows a cache: X has no attention reader, Y's input is an activation.

Rewrite: none here. `appended_inputs` names X's input and its sequence dim; the backend makes that
input a `QVGCache` on X's next call (found where the model keeps it by identity), so X's ``cat``
appends to the compressed history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .graph_ops import example_value
from .sites import trace_back, written_inputs


@dataclass(frozen=True)
class Crossing:
    """An input of the producing graph that one of its outputs appends new tokens to."""

    placeholder: fx.Node
    seq_dim: int
    rope: bool


def appended_inputs(graph: fx.Graph, output_index: int) -> list[Crossing]:
    """The inputs that output ``output_index`` of ``graph`` is the history part of a ``cat`` of,
    through data-preserving ops (views, casts, moves, batch repeats, RoPE), with the sequence dim
    in the input. Inputs the graph writes are not included (their writes are caches of another
    idiom), nor inputs whose sequence dim cannot be told."""
    outputs = graph.output_node().args[0]
    outputs = outputs if isinstance(outputs, (list, tuple)) else (outputs,)
    if not 0 <= output_index < len(outputs) or not isinstance(outputs[output_index], fx.Node):
        return []
    node = outputs[output_index]
    value = example_value(node)
    if value is None or value.dim() < 3:
        return []
    written = written_inputs(graph)
    found: dict[fx.Node, Crossing] = {}
    for t in trace_back(node):
        ph = t.placeholder
        if t.via_cat is None or ph in written or ph in found:
            continue
        # Between the input and the cat only same-rank ops (moves, casts, batch repeats) keep the
        # cat's dim the input's sequence dim; anything that reshapes is not followed.
        cat_value, ph_value = example_value(t.cat_node), example_value(ph)
        if cat_value is None or ph_value is None or ph_value.dim() != cat_value.dim():
            continue
        if ph_value.dim() < 3 or not ph_value.dtype.is_floating_point:
            continue
        if any(op not in SAME_RANK for op in t.ops[:t.ops.index(f"cat(dim={t.via_cat})")]):
            continue
        found[ph] = Crossing(ph, t.via_cat % ph_value.dim(), t.rope)
    return list(found.values())


# Ops between an input and the cat that keep every dim where it is (batch repeats only grow dim 0).
SAME_RANK = {"to", "_to_copy", "cuda", "cpu", "contiguous", "clone", "repeat", "expand", "float", "bfloat16", "half",
              "type_as", "detach"}
