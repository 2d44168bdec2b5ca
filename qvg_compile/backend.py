"""``qvg_backend``: the torch.compile backend that moves KV caches into 2-bit QVG storage.

For every graph Dynamo captures:
1. `passes.sites.find_sites` finds the cache inputs (idioms A-H of docs/design.md §5) read by attention,
   helped by what other graphs and calls showed (a write and a read split by a graph break; a
   tensor fed back from a graph output and appended to);
2. hand-written attention over a cache becomes SDPA (`passes.fuse_attention`), the fused read's entry;
   queries padded with a cache's shape to share its RoPE call lose the padding
   (`passes.pad_slice`);
3. whether every dense cache of the graph can become a `QVGCache` is decided at compile time
   (config against shape, an assignable source): all of them or none;
4. on the first call, the backend quantizes them (`QVGCache.from_dense`) and puts each where the
   model keeps it (its dict, list, tuple or module attribute, found through Dynamo's source of
   the input), so the BF16 buffer is freed; that call runs eagerly on the `QVGCache`, whose ops
   quantize on write and read through the fused ``qvg::`` attention;
5. Dynamo's guards then see `QVGCache` inputs and recompile once; the backend hands that graph to
   Inductor (`compile_fx`), where AOTAutograd flattens the subclass into its packed tensors and
   the ``qvg::`` custom ops, and everything else keeps Inductor's fusions. Should Inductor fail on
   it, the graph runs eagerly on the caches (correct), with a warning and a report note.
Graphs without caches go to Inductor unchanged. Nothing uncertain is rewritten: rejected
candidates are reported with their reason (`qvg_compile.explain`).
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
import weakref
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from .cache import QVGCache
from .passes.report import GraphReport, Report, first_line, graph_break_reasons
from .passes.fuse_attention import fuse_matmul_softmax
from .passes.flat_inputs import flatten_cache_inputs
from .passes.boundary import appended_inputs
from .passes.graph_ops import example_value
from .passes.pad_slice import drop_query_padding
from .passes.rope_read import rope_at_read
from .passes.sites import Known, Rejected, Site, find_sites, new_site, written_inputs
from .quant.config import QVGConfig
from .disabled import DisabledCalls
from .owned_outputs import OwnedOutputs
from .swap import (EagerOnLayoutMismatch, Feed, QVGBackendWarning, Recording, SourceError, SwapOnFirstUse, Validated,
                   check_source_kind, eager_note)
from .swap import ValidationError  # noqa: F401  (part of the backend's API)


_STACK = "['___stack"


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
        roles: the role of caches read inside compiler-disabled functions, by the name of their
            entry (``{"k_txt": "key", "v_txt": "value"}``); entries not named are read as attention
            reads them (K or V).
        cudagraphs: compile with Inductor's CUDA graphs (``mode="reduce-overhead"`` of the default
            backend): the model's GPU work between cache ops is captured and replayed; the cache
            ops, which change host state on every call, run between the graphs (Inductor's graph
            partitioning, `cache.lean_op.CACHE_OP_TAGS`). A graph's fresh outputs are copied out
            of the graphs' memory pool (`owned_outputs`), so a model that keeps outputs across
            calls runs unchanged. Off by default (see the design document's measurements).
        cache_options: forwarded to `QVGCache.from_dense` (segment length, dense chunks, sinks).
    """

    def __init__(self, config: Optional[QVGConfig] = None, validate: bool = False,
                 rtol: float = 1e-3, atol: float = 1e-3, roles: Optional[dict[str, str]] = None,
                 cudagraphs: bool = False, **cache_options: Any) -> None:
        if config is not None and not isinstance(config, QVGConfig):
            raise TypeError(f"config: expected a QVGConfig, got {type(config).__name__}")
        if not isinstance(cudagraphs, bool):
            raise TypeError(f"cudagraphs: expected a bool, got {type(cudagraphs).__name__}")
        self.cudagraphs = cudagraphs
        check_roles(roles)
        for name, value in (("rtol", rtol), ("atol", atol)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
        self.config = config or QVGConfig.preset("qvg")
        self.validate = bool(validate)
        self._warned: set[str] = set()
        self.rtol, self.atol = rtol, atol
        self.cache_options = cache_options
        self.report = Report()
        self._breaks_before = graph_break_reasons()
        self._lock = threading.Lock()
        # What each graph showed about its inputs, by Dynamo source: later graphs (write and read
        # split by a graph break, idiom G) and later calls build on it.
        self._known: dict[str, Known] = {}
        # Dense tensors returned by graphs this backend compiled, by id: (weak reference, the
        # graph's `Recording`, output index). One fed back as a cache input is state the caller
        # keeps across calls (a functional cache, idiom D): that output is then returned as a
        # QVGCache on the producer's later calls, so the next graph never sees it dense.
        self._outputs: dict[int, tuple[weakref.ref, "Recording", int]] = {}
        # Per Dynamo frame and output names: output index -> the cache it feeds (`Feed`), shared
        # by the frame's recompiles (a dynamic-shape recompile of the producer keeps returning
        # QVGCache); the names keep apart graphs of one frame that return different things (a
        # cache pass and a denoising pass through the same block).
        self._convert: dict[tuple[str, tuple[str, ...]], dict[int, Feed]] = {}
        # Per Dynamo frame: input source -> the `Site` a later graph showed it to be (idiom K),
        # swapped by every compile of that frame that gets it dense.
        self._pending: dict[str, dict[str, Site]] = {}
        # Caches read inside compiler-disabled functions (idiom L), replaced at their calls.
        self._disabled = DisabledCalls(self.to_cache, self.warn_once, roles)

    def _known_of(self, node: fx.Node, fed_back: set[str] = frozenset()) -> Optional[Known]:
        value = node.meta.get("example_value")
        if isinstance(value, QVGCache):
            return Known("cache", value.seq_dim)
        source = getattr(node.meta.get("grapharg"), "source", None)
        known = self._known.get(source.name) if source is not None else None
        if known is None and node.name in fed_back:
            return Known("fed_back")
        return known

    def _producer(self, value: Any) -> Optional[tuple["Recording", int]]:
        """The graph (and output index) that returned ``value``, if one of ours did."""
        entry = self._outputs.get(id(value))
        if entry is None or entry[0]() is not value:
            return None
        return entry[1], entry[2]

    def record_outputs(self, producer: "Recording", outputs: Any, skip: frozenset[int] = frozenset()) -> None:
        """Remember the dense tensors a compiled graph returned (see ``_outputs``), except the
        outputs at ``skip`` (inputs the graph hands back, which it did not make)."""
        for i, t in enumerate(outputs if isinstance(outputs, (list, tuple)) else (outputs,)):
            if type(t) is torch.Tensor and t.dim() >= 3 and i not in skip:
                key = id(t)
                self._outputs[key] = (weakref.ref(t, lambda _, key=key: self._outputs.pop(key, None)), producer, i)

    def _learn(self, graph: fx.Graph, sites: list[Site], rejected: list[Rejected]) -> None:
        # A resume function's stack slot (``___stack0[1]``) holds a value for one call only:
        # what it held says nothing about the next call's.
        sites = [s for s in sites if _STACK not in s.source]
        rejected = [r for r in rejected if _STACK not in r.source]
        for s in sites:
            prior = self._known.get(s.source)
            tokens = prior.tokens if prior is not None else None
            self._known[s.source] = Known("cache", s.seq_dim, tuple(s.roles), tokens)
        cached = {s.placeholder for s in sites}
        for ph, writes in written_inputs(graph).items():
            source = getattr(ph.meta.get("grapharg"), "source", None)
            if ph.name in cached or source is None or source.name in self._known:
                continue
            self._known[source.name] = Known("written", writes.seq_dim, (), writes.tokens)
        for r in rejected:
            if r.roles and r.source != "-" and r.source not in self._known:
                self._known[r.source] = Known("read", None, tuple(r.roles))

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        with self._lock:
            compile_id = torch._guards.CompileContext.current_compile_id()
            numbered = compile_id is not None and compile_id.frame_id is not None
            graph_report = GraphReport(
                len(self.report.graphs), f"graph_{len(self.report.graphs)}", inputs_are_caches=False,
                code_before=gm.code, compile_id=str(compile_id) if compile_id is not None else "",
                frame=self.report.frame_of(compile_id.frame_id, compile_id.frame_compile_id) if numbered else "")
            self.report.graphs.append(graph_report)
            # Dynamo records a break before it compiles the graph that ends there.
            self.report.record_graph_breaks(self._breaks_before)
            self._disabled.learn(list(graph_break_reasons()))
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            producers = {n.name: self._producer(x) for n, x in zip(placeholders, example_inputs)}
            fed_back = {name for name, p in producers.items() if p is not None}
            sites, rejected, readers = find_sites(gm.graph, known_cache=lambda n: self._known_of(n, fed_back))
            self._learn(gm.graph, sites, rejected)
            rejected = self._learn_crossings(producers, rejected, graph_report)
        graph_report.sites, graph_report.rejected = sites, rejected
        dropped = drop_query_padding(gm.graph)
        rotated, left = rope_at_read(gm.graph)
        graph_report.rewrites.extend(dropped + rotated)
        graph_report.untouched.extend(left)
        if dropped or rotated:
            gm.recompile()
        for r in readers:
            graph_report.readers[r.kind] = graph_report.readers.get(r.kind, 0) + 1
        position = {n.name: i for i, n in enumerate(placeholders)}
        dense_sites, errors = [], []
        for s in sites:
            node = placeholders[position[s.placeholder]]
            if isinstance(node.meta.get("example_value"), QVGCache):
                continue
            source = getattr(node.meta.get("grapharg"), "source", None)
            problem = "Dynamo recorded no source for it" if source is None else self._cannot_swap(s, source, node)
            if problem:
                errors.append(f"{s.source}: not replaced ({problem})")
            else:
                dense_sites.append((position[s.placeholder], s, source))
        if errors and dense_sites:
            # All of a graph's caches or none: attention never mixes a dense and a QVG operand.
            errors += [f"{s.source}: not replaced (kept dense with the other caches of this graph)"
                       for _, s, _ in dense_sites]
            dense_sites = []
        for index, s, _ in dense_sites:
            producer = producers.get(s.placeholder)
            if producer is not None:
                producer[0].convert[producer[1]] = Feed(s, example_inputs[index].shape[s.seq_dim])
        graph_report.swap_errors.extend(errors)
        for error in errors:
            self.warn_once(error)
        graph_report.inputs_are_caches = any(isinstance(n.meta.get("example_value"), QVGCache)
                                             for n in placeholders)
        if dense_sites or graph_report.inputs_are_caches:
            self._fuse_attention(gm, sites, readers, graph_report)
        # Per frame, not per compile id: a frame's recompiles share what earlier compiles learned;
        # a frame compiled again after `torch._dynamo.reset` (same id, maybe another function) not.
        frame = graph_report.frame or graph_report.name
        outputs = gm.graph.output_node().args[0]
        names = tuple(str(o) for o in (outputs if isinstance(outputs, (list, tuple)) else (outputs,)))
        convert = self._convert.setdefault((frame, names), {})
        pending = self._pending.setdefault(frame, {})
        sources = [getattr(getattr(n.meta.get("grapharg"), "source", None), "name", None) for n in placeholders]
        if not dense_sites:
            if not graph_report.inputs_are_caches:
                return Recording(self, self._inductor(gm, example_inputs, graph_report), convert, gm, graph_report,
                                  pending, sources)
            compiled = self._inductor_or_eager(gm, example_inputs, graph_report)
            if self.validate:
                compiled = Validated(gm, compiled, self.rtol, self.atol)
            return Recording(self, compiled, convert, gm, graph_report, pending, sources)
        return Recording(self, SwapOnFirstUse(self, gm, dense_sites, graph_report), convert, gm, graph_report,
                          pending, sources)

    def arm_disabled(self, report: GraphReport) -> None:
        """A graph of ours ran: watch the next call of a compiler-disabled function from its frame."""
        self._disabled.arm(report)

    def _learn_crossings(self, producers: dict[str, Optional[tuple["Recording", int]]], rejected: list[Rejected],
                         graph_report: GraphReport) -> list[Rejected]:
        """Idiom K (`passes.boundary`): an input read by attention here that an earlier graph
        returned as ``cat([its input, new tokens])``; that earlier input is the cache, swapped on
        the earlier graph's next call. Returns ``rejected`` without the inputs explained so."""
        kept = []
        for r in rejected:
            producer = producers.get(r.node) if r.roles else None
            crossings = appended_inputs(producer[0].gm.graph, producer[1]) if producer is not None else []
            if not crossings:
                kept.append(r)
                continue
            recording = producer[0]
            positions = {n.name: i for i, n in enumerate(recording.gm.graph.find_nodes(op="placeholder"))}
            explained = False
            for c in crossings:
                source = recording.sources[positions[c.placeholder.name]]
                site = recording.pending.get(source) if source is not None else None
                if source is not None and site is None:
                    site = new_site(c.placeholder, example_value(c.placeholder), c.seq_dim, [])
                    site.source, site.roles = source, list(r.roles)
                    site.idioms = ["D", "K"] + (["E"] if c.rope else [])
                    site.notes.append(f"appended to in {recording.report.name}, read by attention in "
                                      f"{graph_report.name} after a call outside the compiled graphs")
                    problem = self._config_problem(site, c.placeholder)
                    if problem:
                        self.warn_once(f"{site.source}: not replaced ({problem})")
                        continue
                    recording.pending[source] = site
                    recording.report.sites.append(site)
                if site is not None:
                    explained = True
                    site.roles.extend(role for role in r.roles if role not in site.roles)
            if not explained:
                kept.append(r)
        return kept

    def _config_problem(self, site: Site, node: fx.Node) -> Optional[str]:
        """Why the config cannot hold ``site``'s input ``node`` as a `QVGCache` (None if it can)."""
        value = node.meta.get("example_value")
        try:
            # Size hints, not int(): int() of a symbolic size would guard on it and make a cache
            # grown by cat recompile at every new length.
            QVGCache.empty(tuple(_size_hint(d) for d in value.shape), site.seq_dim, self.config, dtype=value.dtype,
                           device="meta", **self.cache_kwargs(site))
        except (ValueError, TypeError) as exc:
            return str(exc)
        return None

    def warn_once(self, message: str) -> None:
        """Warn (`QVGBackendWarning`) that a cache stays dense: loudly, once per cache and
        reason, while the model keeps running on the dense tensor."""
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"qvg_backend: {message}; it stays dense", QVGBackendWarning, stacklevel=3)

    @staticmethod
    def _fuse_attention(gm: fx.GraphModule, sites: list[Site], readers: list, graph_report: GraphReport) -> None:
        """Hand-written attention over a cache becomes SDPA, so the read is the fused one. Masked
        chains stay as written: the fused read takes no mask, SDPA would decode the cache anyway."""
        cache_readers = {name for s in sites for name in s.readers}
        for r in readers:
            if r.kind == "matmul_softmax" and r.node.name in cache_readers:
                done = fuse_matmul_softmax(gm.graph, r, masks=False)
                if done:
                    graph_report.rewrites.append(done)
        if graph_report.rewrites:
            gm.recompile()

    def _cannot_swap(self, site: Site, source: Any, node: fx.Node) -> Optional[str]:
        """Why the dense input of ``site`` could not become a `QVGCache`, decided when the graph
        is compiled (so a graph that stays dense is compiled once, as Inductor would)."""
        try:
            check_source_kind(source)
        except SourceError as exc:
            return str(exc)
        return self._config_problem(site, node)

    def _inductor(self, gm: fx.GraphModule, example_inputs: list[Any], graph_report: GraphReport) -> Callable:
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        patches: dict[str, Any] = {"post_grad_custom_post_pass": _PostGradCapture(graph_report)}
        if not self.cudagraphs:
            return compile_fx(gm, example_inputs, config_patches=patches)
        patches["triton.cudagraphs"] = True
        if hasattr(inductor_config, "graph_partition"):
            patches["graph_partition"] = True
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
        if any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
            # Outputs the model keeps across calls must not live in the graphs' memory pool.
            return OwnedOutputs(compiled)
        return compiled

    def _inductor_flat(self, flat: Optional[tuple], why: str, graph_report: GraphReport) -> Optional[Callable]:
        """Inductor over the caches' inner tensors (``flat``, from `passes.flat_inputs`); None
        when the graph keeps its cache inputs (``why``, or Inductor's failure on the flattened
        graph, warned, goes to the report)."""
        compiled = None
        if flat is not None:
            flat_gm, flat_inputs, wrap = flat
            try:
                compiled = wrap(self._inductor(flat_gm, flat_inputs, graph_report))
                why = "yes"
            except Exception as exc:  # noqa: BLE001 (the unflattened graph is compiled instead)
                why = (f"Inductor could not compile it over the caches' inner tensors ({type(exc).__name__}: "
                       f"{first_line(str(exc))}); AOTAutograd unwraps them on every call")
                warnings.warn(f"qvg_backend, {graph_report.name}: {why}", QVGBackendWarning, stacklevel=2)
        graph_report.flat_inputs = why
        return compiled

    def _inductor_or_eager(self, gm: fx.GraphModule, example_inputs: list[Any],
                           graph_report: GraphReport) -> Callable:
        """Inductor over `QVGCache` inputs; a graph Inductor cannot compile runs eagerly on the
        caches (still quantized and correct), reported rather than raised."""
        flat, why = flatten_cache_inputs(gm, example_inputs)  # raises on a bad QVG_FLAT_INPUTS
        try:
            compiled = self._inductor_flat(flat, why, graph_report)
            if compiled is None:
                compiled = self._inductor(gm, example_inputs, graph_report)
        except Exception as exc:  # noqa: BLE001 (any Inductor failure: the eager graph is correct)
            eager_note(graph_report, f"Inductor could not compile it over QVGCache inputs "
                                      f"({type(exc).__name__}: {first_line(str(exc))}); it runs eagerly")
            return gm
        return EagerOnLayoutMismatch(gm, compiled, graph_report)

    def to_cache(self, dense: torch.Tensor, site: Site) -> QVGCache:
        """``dense`` quantized into a `QVGCache` for ``site`` (roles give the bit widths)."""
        return QVGCache.from_dense(dense, seq_dim=site.seq_dim, config=self.config, **self.cache_kwargs(site))

    def cache_kwargs(self, site: Site) -> dict[str, Any]:
        """`QVGCache` options for ``site``: the backend's cache options, its role(s), and for a
        cache first written in another graph (G), that write's length as the slot length."""
        options = dict(self.cache_options)
        roles = tuple(site.roles)
        if "F" in site.idioms and len(roles) == 2:
            options.setdefault("roles", ("key", "value"))
        elif len(roles) == 1:
            options.setdefault("role", roles[0])
        known = self._known.get(site.source)
        if known is not None and known.tokens and "G" in site.idioms:
            # The write already happened densely in another graph: keep that chunk an open slot,
            # as a cache written from the start would.
            options.setdefault("chunk_tokens", known.tokens)
        return options


def check_roles(roles: Any) -> None:
    """Raise unless ``roles`` is None or a dict of entry names to ``"key"``/``"value"``."""
    if roles is None:
        return
    if not isinstance(roles, dict):
        raise TypeError(f"roles: expected a dict of cache names to 'key' or 'value', got {type(roles).__name__}")
    for name, role in roles.items():
        if not isinstance(name, str) or role not in ("key", "value"):
            raise ValueError(f"roles: {name!r} -> {role!r}; expected a name (str) mapped to 'key' or 'value'")


def _size_hint(size: Any) -> int:
    """A size's concrete value without a guard on it (a SymInt's hint; ints as they are)."""
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


_BACKEND_FIELDS = {f.name for f in dataclasses.fields(QVGConfig)}


def backend(config: Optional[QVGConfig] = None, *, preset: str = "qvg", bits: Optional[int] = None,
            validate: bool = False, cudagraphs: bool = False, **options: Any) -> QVGBackend:
    """A configured QVG backend: ``torch.compile(model, backend=qvg_compile.backend(bits=2, stages=1))``.

    Keyword options that name `QVGConfig` fields override the ``preset``; ``bits`` sets both key
    and value bits; ``validate`` and ``cudagraphs`` are `QVGBackend`'s; the rest go to
    `QVGCache.from_dense` (cache policy).
    """
    quant = {k: options.pop(k) for k in list(options) if k in _BACKEND_FIELDS}
    if bits is not None:
        quant.setdefault("key_bits", bits)
        quant.setdefault("value_bits", bits)
    if config is None:
        config = QVGConfig.preset(preset, **quant)
    elif quant:
        config = config.replace(**quant)
    return QVGBackend(config, validate=validate, cudagraphs=cudagraphs, **options)


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


def register() -> None:
    """Make ``torch.compile(model, backend="qvg")`` work (also declared as an entry point)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "qvg" not in _BACKENDS:
        register_backend(name="qvg")(qvg_backend)
