"""``qvg_backend``: the torch.compile backend that moves KV caches into 2-bit QVG storage.

For every graph Dynamo captures:
1. `passes.sites.find_sites` finds the cache inputs (idioms A-H of DESIGN.md §5) read by attention;
2. on the first call that receives such a cache as a dense tensor, the backend quantizes it into a
   `QVGCache` (`QVGCache.from_dense`) and puts that where the model keeps the tensor (its dict,
   list, tuple or module attribute, found through Dynamo's source of the input), so the BF16
   buffer is freed; that call runs eagerly on the `QVGCache`, whose ops quantize on write and read
   through the fused ``qvg::`` attention;
3. Dynamo's guards then see `QVGCache` inputs and recompile once; the backend hands that graph to
   Inductor (`compile_fx`), where AOTAutograd flattens the subclass into its packed tensors and
   the ``qvg::`` custom ops, and everything else keeps Inductor's fusions.
Graphs without caches go to Inductor unchanged. Nothing uncertain is rewritten: rejected
candidates are reported with their reason (`qvg_compile.explain`).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from .cache import QVGCache
from .passes.report import GraphReport, Report
from .passes.sites import Site, find_sites
from .passes.sources import SourceError, replace_at_source
from .quant.config import QVGConfig


class ValidationError(AssertionError):
    """``validate=True`` found the compiled graph disagreeing with eager QVG execution."""


class _PostGradCapture(torch._inductor.custom_graph_pass.CustomGraphPass):
    """Records the post-grad ATen code of a graph (for the report's diff); changes nothing."""

    def __init__(self, sink: GraphReport) -> None:
        self.sink = sink

    def __call__(self, graph: fx.Graph) -> None:
        self.sink.code_after = graph.python_code("self").src

    def uuid(self) -> Optional[Any]:
        return "qvg-post-grad-capture-v1"


class QVGBackend:
    """A torch.compile backend; build one with `backend(...)` or use the default `qvg_backend`.

    Args:
        config: how caches are quantized (default: the ``qvg`` preset).
        validate: on the first compiled call of each graph over `QVGCache` inputs, also run the
            graph eagerly on copies of the caches and raise `ValidationError` on mismatch.
        rtol, atol: tolerances of that check.
        cache_options: forwarded to `QVGCache.from_dense` (segment length, dense chunks, sinks).
    """

    def __init__(self, config: Optional[QVGConfig] = None, validate: bool = False,
                 rtol: float = 1e-3, atol: float = 1e-3, **cache_options: Any) -> None:
        if config is not None and not isinstance(config, QVGConfig):
            raise TypeError(f"config: expected a QVGConfig, got {type(config).__name__}")
        self.config = config or QVGConfig.preset("qvg")
        self.validate = bool(validate)
        self.rtol, self.atol = rtol, atol
        self.cache_options = cache_options
        self.report = Report()
        self._lock = threading.Lock()
        # Sources of inputs already proven to be caches: a later graph that only reads them
        # (write and read split by a graph break, idiom G) still treats them as caches.
        self._known_sources: set[str] = set()

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        with self._lock:
            graph_report = GraphReport(len(self.report.graphs), f"graph_{len(self.report.graphs)}",
                                       inputs_are_caches=False, code_before=gm.code)
            self.report.graphs.append(graph_report)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

        def known(node: fx.Node) -> bool:
            value = node.meta.get("example_value")
            source = getattr(node.meta.get("grapharg"), "source", None)
            return isinstance(value, QVGCache) or (source is not None and source.name in self._known_sources)

        sites, rejected, readers = find_sites(gm.graph, known_cache=known)
        graph_report.sites, graph_report.rejected = sites, rejected
        for r in readers:
            graph_report.readers[r.kind] = graph_report.readers.get(r.kind, 0) + 1
        for s in sites:
            self._known_sources.add(s.source)
        position = {n.name: i for i, n in enumerate(placeholders)}
        dense_sites = []
        for s in sites:
            node = placeholders[position[s.placeholder]]
            source = getattr(node.meta.get("grapharg"), "source", None)
            if isinstance(node.meta.get("example_value"), QVGCache):
                continue
            if source is None:
                graph_report.swap_errors.append(f"{s.source}: Dynamo recorded no source for it")
                continue
            dense_sites.append((position[s.placeholder], s, source))
        graph_report.inputs_are_caches = any(isinstance(n.meta.get("example_value"), QVGCache)
                                             for n in placeholders)
        if not dense_sites:
            compiled = self._inductor(gm, example_inputs, graph_report)
            if self.validate and graph_report.inputs_are_caches:
                return _Validated(gm, compiled, self.rtol, self.atol)
            return compiled
        return _SwapOnFirstUse(self, gm, dense_sites, graph_report)

    def _inductor(self, gm: fx.GraphModule, example_inputs: list[Any], graph_report: GraphReport) -> Callable:
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs,
                          config_patches={"post_grad_custom_post_pass": _PostGradCapture(graph_report)})

    def to_cache(self, dense: torch.Tensor, site: Site) -> QVGCache:
        return QVGCache.from_dense(dense, seq_dim=site.seq_dim, config=self.config, **self.cache_options)


class _SwapOnFirstUse:
    """Runs a graph whose cache inputs are still dense: swaps them for QVGCache where the model
    keeps them, runs that call eagerly on the QVGCache, and leaves the next call to Dynamo's
    recompile. Calls whose caches cannot be swapped run the Inductor-compiled dense graph."""

    def __init__(self, backend: QVGBackend, gm: fx.GraphModule, sites: list[tuple[int, Site, Any]],
                 report: GraphReport) -> None:
        # No example inputs are kept: they are the dense caches whose memory the swap frees.
        self.backend, self.gm = backend, gm
        self.sites, self.report = sites, report
        self._dense: Optional[Callable] = None

    def __call__(self, *args: Any) -> Any:
        args = list(args)
        swapped = False
        for index, site, source in self.sites:
            value = args[index]
            if type(value) is not torch.Tensor:
                continue
            try:
                cache = self.backend.to_cache(value, site)
                replace_at_source(source, value, cache)
            except (SourceError, ValueError, TypeError) as exc:
                message = f"{site.source}: not replaced ({exc})"
                if message not in self.report.swap_errors:
                    self.report.swap_errors.append(message)
                continue
            args[index] = cache
            swapped = True
            if site.source not in self.report.swapped:
                self.report.swapped.append(site.source)
        if swapped:
            return self.gm(*args)
        if self._dense is None:
            self._dense = self.backend._inductor(self.gm, args, self.report)
        return self._dense(*args)


class _Validated:
    """First call: compiled and eager (on cloned caches) must agree, else `ValidationError`."""

    def __init__(self, gm: fx.GraphModule, compiled: Callable, rtol: float, atol: float) -> None:
        self.gm, self.compiled, self.rtol, self.atol = gm, compiled, rtol, atol
        self.checked = False

    def __call__(self, *args: Any) -> Any:
        if self.checked:
            return self.compiled(*args)
        self.checked = True
        copies = [a.clone() if isinstance(a, QVGCache) else a for a in args]
        expected = self.gm(*copies)
        got = self.compiled(*args)
        flat_expected, _ = torch.utils._pytree.tree_flatten(expected)
        flat_got, _ = torch.utils._pytree.tree_flatten(got)
        for i, (e, g) in enumerate(zip(flat_expected, flat_got)):
            if isinstance(e, torch.Tensor) and not isinstance(e, QVGCache):
                if not torch.allclose(g.float(), e.float(), rtol=self.rtol, atol=self.atol):
                    diff = float((g.float() - e.float()).abs().max())
                    raise ValidationError(
                        f"qvg_backend(validate=True): output {i} of the compiled graph differs from "
                        f"eager QVG execution by {diff:.3g} (rtol={self.rtol}, atol={self.atol})")
        return got


_BACKEND_FIELDS = {f.name for f in dataclasses.fields(QVGConfig)}


def backend(config: Optional[QVGConfig] = None, *, preset: str = "qvg", bits: Optional[int] = None,
            validate: bool = False, **options: Any) -> QVGBackend:
    """A configured QVG backend: ``torch.compile(model, backend=qvg_compile.backend(bits=2, stages=1))``.

    Keyword options that name `QVGConfig` fields override the ``preset``; ``bits`` sets both key
    and value bits; the rest go to `QVGCache.from_dense` (cache policy).
    """
    quant = {k: options.pop(k) for k in list(options) if k in _BACKEND_FIELDS}
    if bits is not None:
        quant.setdefault("key_bits", bits)
        quant.setdefault("value_bits", bits)
    if config is None:
        config = QVGConfig.preset(preset, **quant)
    elif quant:
        config = config.replace(**quant)
    return QVGBackend(config, validate=validate, **options)


def qvg_backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """The default backend (the ``qvg`` preset): ``torch.compile(model, backend=qvg_backend)``.

    Each `torch.compile` call with this function gets the shared default instance; use
    `backend()` for a private one with its own report.
    """
    return _default()(gm, example_inputs)


_DEFAULT: Optional[QVGBackend] = None


def _default() -> QVGBackend:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = QVGBackend()
    return _DEFAULT


def default_report() -> Report:
    """The report of the shared default backend (`qvg_backend`)."""
    return _default().report


def register() -> None:
    """Make ``torch.compile(model, backend="qvg")`` work (also declared as an entry point)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "qvg" not in _BACKENDS:
        register_backend(name="qvg")(qvg_backend)
