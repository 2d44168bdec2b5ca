"""Counting the graphs a whole pipeline run compiles, and capturing the one graph of a function
(shared by the tests)."""

from __future__ import annotations

from typing import Callable

import torch


def graphs_compiled(run: Callable[[Callable], None], backend: Callable) -> int:
    """Graphs that ``run(counting_backend)`` hands to ``backend``, from a fresh Dynamo state.
    ``run`` compiles the model with the backend it is given and drives the pipeline."""
    torch._dynamo.reset()
    count = 0

    def counting(gm, inputs):
        nonlocal count
        count += 1
        return backend(gm, inputs)

    run(counting)
    torch._dynamo.reset()
    return count


def traced_module(fn: Callable, *args: object) -> torch.fx.GraphModule:
    """The one graph Dynamo traces from ``fn(*args)`` (``fullgraph=True``), as handed to a backend,
    from a fresh Dynamo state."""
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    assert len(graphs) == 1, f"expected one graph, Dynamo traced {len(graphs)}"
    return graphs[0]
