"""``qvg_compile.explain``: what the QVG backend finds and rewrites in a model, without side effects."""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch

from .backend import QVGBackend
from .cache.tally import stats
from .passes.report import Report, graph_break_reasons, read_counts
from .quant.config import QVGConfig


def explain(model_or_fn: Callable, *args: Any, config: Optional[QVGConfig] = None,
            calls: int = 2, cache_options: Optional[dict[str, Any]] = None, **kwargs: Any) -> Report:
    """Compile ``model_or_fn`` with a private QVG backend, call it ``calls`` times on deep copies
    of the example inputs, and report per graph: cache sites (idiom, module path, shape, layout,
    seq dim), the dense caches replaced by QVGCache, candidates left untouched and why, attention
    readers, which reads of the replaced caches took the fast path and why others did not (or
    fell back to a dense copy), graph breaks, recompiles, and a unified diff of each graph's code
    before (Dynamo) and after (post-grad ATen with the ``qvg::`` ops): ``report.summary(diff=True)``,
    ``report.to_dict()``, ``report.to_json()``.

    The second call (``calls=2``) runs the graph recompiled over QVGCache inputs, which is where
    the fused ``qvg::`` ops appear. Dynamo's caches are reset before and after (compiled code of
    other functions is recompiled on its next call); the caller's model, tensors and containers
    are never modified. ``kwargs`` go to the model; ``cache_options`` to `QVGCache.from_dense`.
    """
    if not callable(model_or_fn):
        raise TypeError(f"model_or_fn: expected an nn.Module or a callable, got {type(model_or_fn).__name__}")
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls: expected a positive int, got {calls!r}")
    backend = QVGBackend(config, **(cache_options or {}))
    reads_before = stats()
    model = copy.deepcopy(model_or_fn) if isinstance(model_or_fn, torch.nn.Module) else model_or_fn
    args, kwargs = copy.deepcopy((args, kwargs))
    torch._dynamo.reset()
    before = graph_break_reasons()
    compiled = torch.compile(model, backend=backend)
    # Cached compiles skip the post-grad pass that records each graph's code after the rewrite.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), torch.no_grad():
        try:
            for _ in range(calls):
                compiled(*args, **kwargs)
        finally:
            torch._dynamo.reset()
    report = backend.report
    report.cache_reads = read_counts(reads_before, stats())
    report.record_graph_breaks(before)
    if not report.graphs:
        report.notes.append("Dynamo captured no graph: nothing to rewrite (the function ran eagerly).")
    elif not report.sites:
        report.notes.append(
            "No KV cache found: no graph input is read by attention (SDPA, flash-attn, or "
            "matmul-softmax-matmul) and also written, appended to and returned, or known as a "
            "cache from another graph. The model runs unchanged under the QVG backend (Inductor only).")
    return report
