"""Counting the graphs a whole pipeline run compiles (shared by the example-model tests)."""

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
