"""Cache inputs handed to Inductor as their inner tensors: the graph rebuilds each cache itself.

Pattern: a Dynamo graph whose placeholders hold `QVGCache` inputs of static size, none
of which is returned.

Rewrite: each such placeholder becomes one placeholder per inner tensor (`QVGCache.__tensor_flatten__`
order) followed by an `UnflattenCache` module call that builds the cache from them with the
flatten metadata and size it had; the rest of the graph is unchanged. AOTAutograd traces
through the node (the cache's ops become ``qvg::`` ops on the inner tensors, as when it unwraps
the subclass itself), and `FlatCall` passes the inner tensors at run time.

Why: on torch < 2.13 AOTAutograd unwraps subclass inputs on every call in Python, one recursive
step per inner tensor (10 per cache), at every layer and denoising pass: a compiled K+V write
costs 121 us of host on the CPU that way and 101 us flattened here, 334 against 279 us on the
H200's host (`benchmarks/cache_step.py --write-host`; torch 2.13 generates that code and gains
nothing). `FlatCall` reads the same tensors with one `operator.attrgetter` per cache, and
`tests/test_passes_flat_inputs.py` pins that a compiled call reads no cache's flatten beyond
Dynamo's guards. Dynamo's guards still see the caches, so a changed layout
recompiles as before. Graphs that return a cache, or whose caches have symbolic sizes, keep
AOTAutograd's unwrapping (`flatten_cache_inputs` says why), as do all graphs compiled with
``QVG_FLAT_INPUTS=0`` in the environment (read when a graph compiles; to compare the two).
"""

from __future__ import annotations

import operator
import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from ..cache import QVGCache
from ..cache.tensor import from_flat
from .graph_ops import example_value


class UnflattenCache(torch.nn.Module):
    """The `QVGCache` of one input, built from its inner tensors (``names`` order) with the flatten
    metadata and size it had when the graph was compiled (`cache.tensor.from_flat`). A module, not
    a function with constant arguments, so that the graph's generated code names it instead of
    writing out the metadata."""

    def __init__(self, meta: Any, size: tuple[int, ...], names: tuple[str, ...]) -> None:
        super().__init__()
        self.meta, self.size, self.names = meta, size, names

    def forward(self, *inner: torch.Tensor) -> QVGCache:
        return from_flat(dict(zip(self.names, inner)), self.meta, self.size)


SWITCH = "QVG_FLAT_INPUTS"


def enabled() -> bool:
    """``QVG_FLAT_INPUTS``: ``1`` (the default) flattens, ``0`` leaves every graph to AOTAutograd."""
    value = os.environ.get(SWITCH, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{SWITCH}: expected 0 or 1, got {value!r}")
    return value == "1"


def _static(t: torch.Tensor) -> bool:
    return all(type(s) is int for s in (*t.shape, *t.stride()))


def _why_not(gm: fx.GraphModule, placeholders: list[fx.Node], example_inputs: Sequence[Any]) -> Optional[str]:
    if len(placeholders) != len(example_inputs):
        return f"{len(placeholders)} placeholders for {len(example_inputs)} example inputs"
    outputs = gm.graph.output_node().args[0]
    for out in outputs if isinstance(outputs, (list, tuple)) else (outputs,):
        if isinstance(out, fx.Node) and isinstance(example_value(out), QVGCache):
            return f"the graph returns a cache ({out.name})"
    for ph, ex in zip(placeholders, example_inputs):
        if not isinstance(ex, QVGCache):
            continue
        fake = example_value(ph)
        if not isinstance(fake, QVGCache):
            return f"{ph.name}: no traced cache recorded for it"
        names, _ = fake.__tensor_flatten__()
        if not _static(fake) or not all(_static(getattr(fake, n)) for n in names):
            return f"{ph.name}: a cache of symbolic size"
    return None


class FlatCall:
    """Calls code compiled by `flatten_cache_inputs`'s graph with each cache argument replaced by
    its inner tensors."""

    def __init__(self, compiled: Callable, getters: Sequence[Optional[Callable[[Any], tuple]]]) -> None:
        self.compiled = compiled
        self.getters = list(getters)

    def __call__(self, *args: Any) -> Any:
        flat: list[Any] = []
        for a, get in zip(args, self.getters):
            if get is None:
                flat.append(a)
            else:
                flat.extend(get(a))
        return self.compiled(*flat)


def flatten_cache_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]
                         ) -> tuple[Optional[tuple[fx.GraphModule, list[Any], Callable[[Callable], FlatCall]]], str]:
    """The rewrite of the module docstring: ``((graph, flat example inputs, wrap), "")`` where
    ``wrap(compiled)`` is the `FlatCall` of the graph's compiled code, or ``(None, reason)`` when
    the graph is left to AOTAutograd's unwrapping (no cache input, or see `_why_not`)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not any(isinstance(ex, QVGCache) for ex in example_inputs):
        return None, "no cache input"
    if not enabled():
        return None, f"{SWITCH}=0"
    why = _why_not(gm, placeholders, example_inputs)
    if why is not None:
        return None, why
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    getters: list[Optional[Callable[[Any], tuple]]] = []
    flat: list[Any] = []
    owned: dict[str, Any] = {}
    for ph, ex in zip(placeholders, example_inputs):
        if not isinstance(ex, QVGCache):
            env[ph] = graph.placeholder(ph.name)
            env[ph].meta.update(ph.meta)
            getters.append(None)
            flat.append(ex)
            continue
        fake = example_value(ph)
        names, meta = ex.__tensor_flatten__()
        inner = []
        for name in names:
            node = graph.placeholder(f"{ph.name}{name}")
            node.meta["example_value"] = getattr(fake, name)
            inner.append(node)
            flat.append(getattr(ex, name))
        name = f"qvg_unflatten_{ph.name}"
        owned[name] = UnflattenCache(meta, tuple(ex.shape), tuple(names))
        env[ph] = graph.call_module(name, tuple(inner))
        env[ph].meta.update(ph.meta)
        getters.append(operator.attrgetter(*names))  # a cache has 10 or more inner tensors: a tuple
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node.op in ("get_attr", "call_module"):
                owned[node.target] = operator.attrgetter(node.target)(gm)
    return (fx.GraphModule(owned, graph), flat, lambda compiled: FlatCall(compiled, getters)), ""
