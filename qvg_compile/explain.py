"""``qvg_compile.explain``: what the QVG backend finds and rewrites in a model, without side effects."""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch

from .backend import QVGBackend
from .passes.report import Report
from .quant.config import QVGConfig


def _graph_break_reasons() -> dict[str, int]:
    return dict(torch._dynamo.utils.counters.get("graph_break", {}))


def explain(model_or_fn: Callable, *args: Any, config: Optional[QVGConfig] = None,
            calls: int = 2, **kwargs: Any) -> Report:
    """Compile ``model_or_fn`` with a private QVG backend, call it on deep copies of the example
    inputs, and report per graph: cache sites (idiom, source, shape, layout, seq dim), the dense
    caches replaced by QVGCache, candidates left untouched and why, graph breaks, and a unified
    diff of each graph's code before (Dynamo) and after (post-grad ATen with ``qvg::`` ops).

    The second call (``calls=2``) runs the graph recompiled over QVGCache inputs, which is where
    the fused ``qvg::`` ops appear. Dynamo's caches are reset first; the caller's tensors and
    containers are never modified.
    """
    if not callable(model_or_fn):
        raise TypeError(f"model_or_fn: expected an nn.Module or a callable, got {type(model_or_fn).__name__}")
    if not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls: expected a positive int, got {calls!r}")
    backend = QVGBackend(config)
    model = copy.deepcopy(model_or_fn) if isinstance(model_or_fn, torch.nn.Module) else model_or_fn
    args, kwargs = copy.deepcopy((args, kwargs))
    torch._dynamo.reset()
    before = _graph_break_reasons()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for _ in range(calls):
            compiled(*args, **kwargs)
    after = _graph_break_reasons()
    report = backend.report
    report.graph_breaks = [f"{reason} (x{count - before.get(reason, 0)})"
                           for reason, count in after.items() if count > before.get(reason, 0)]
    report.recompiles = max(0, len(report.graphs) - 1)
    if not report.sites:
        report.notes.append(
            "No KV cache found: no graph input is both read by attention and written or appended "
            "to. The model runs unchanged under the QVG backend (Inductor only).")
    torch._dynamo.reset()
    return report
