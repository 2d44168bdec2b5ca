"""`QVGCache`: a tensor that looks like a dense KV cache and stores 2-bit QVG segments.

It is a wrapper subclass with the dense cache's shape, dtype and device. Behind it, a store
(`spec.StoreSpec`, `store.Store`) holds the sealed tokens contiguously (the kernels'
`PackedStore`), a few dense slots for the chunk being written, and the token state; a `View`
says which part of the store this tensor is. Views of one store share a `StoreHandle`.

Ops reach it at the ATen level (`__torch_dispatch__`: the table `implements` fills, which the
`dispatch` module registers, and its fallback `otherwise`); the only torch-level
hook routes ``F.scaled_dot_product_attention`` to ``qvg::sdpa`` so that attention over cache views
reads the packed store instead of a dense copy. Everything that touches the arrays is a
``qvg::cache_*`` custom op, so under torch.compile the subclass flattens into its arrays
(`__tensor_flatten__`: the spec and view as picklable metadata) and a whole video compiles once
per distinct static layout.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..quant.config import QVGConfig
from ..quant.segment import normalise_seq_dim
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import ahead
from .io import read_store, write_store
from .materialize import decode_view
from .policy import CachePolicy, policy_from_options
from .rope import RopeSpec, apply as apply_rope
from .spec import HOLE, POS_MAP_AT, StoreSpec, is_dense, is_sealed
from .store import Store, regrow
from .torch_function import RoutesSdpa
from .view import CHAN, DENSE, RUN, SEQ, VIEW, Lead, Unsupported, View

Handler = Callable[[Any, tuple, dict], Any]
RopeTables = tuple[torch.Tensor, torch.Tensor]
Fallback = Callable[[Any, tuple, dict, str], Any]

# The dispatch rules of this package are traced into compiled graphs, which AOTAutograd caches on
# disk across processes; keying its entries on these sources keeps a changed rule from being
# served code traced by the old one.
_SOURCE_FINGERPRINT = hashlib.sha256(
    b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))).hexdigest()


class StoreHandle:
    """The spec and arrays of one store, shared by every view of it. Eager code replaces both
    together (`replace`) when the first write fixes the slot length; traced code never does."""

    __slots__ = ("spec", "arrays", "views")

    def __init__(self, spec: StoreSpec, arrays: Sequence[torch.Tensor]) -> None:
        self.spec = spec
        self.arrays = list(arrays)
        self.views: weakref.WeakSet[QVGCache] = weakref.WeakSet()

    def replace(self, spec: StoreSpec, arrays: Sequence[torch.Tensor]) -> None:
        """Swap in a regrown store; every live view of it is bound to the new arrays."""
        self.spec, self.arrays = spec, list(arrays)
        for view in list(self.views):
            view._bind()

    @property
    def store(self) -> Store:
        return Store(self.spec, self.arrays)

    def settled(self) -> list[torch.Tensor]:
        """The arrays, after undoing a write opened ahead on them (`ahead`): what code that copies
        or reads them whole, without an op that builds a `Store`, must use."""
        if self.concrete:
            ahead.undo(self.arrays[POS_MAP_AT])
        return self.arrays

    @property
    def concrete(self) -> bool:
        """Real tensors (eager), not fake or functional ones of a trace."""
        return type(self.arrays[0]) is torch.Tensor


def contiguous_strides(shape: Sequence[Any]) -> list[Any]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc = acc * size
    return strides[::-1]


class QVGCache(RoutesSdpa):
    """A KV cache tensor (``[B, S, H, D]``, ``[B, H, N, D]``, any layout with a sequence dim and
    the head dim last) whose written tokens are stored as QVG codes.

    Build one with `empty`, `empty_like` or `from_dense` (or `qvg_compile.cache.compress`). Use it
    as the dense tensor: slice it, write into slices, ``cat`` to it, ``repeat`` it, pass views to
    ``F.scaled_dot_product_attention``. `nbytes`, `compression_ratio`, `dequantize`, `seal`,
    `save` and `load` are its own API.
    """

    _OPS: dict[Any, Handler] = {}
    # Ops whose handler keeps a rotated view's RoPE right (layout views that leave the sequence
    # and channels as they are, the read); any other op on a rotated view takes the fallback.
    _KEEPS_ROPE: set[Any] = set()
    _FALLBACK: Optional[Fallback] = None
    _handle: StoreHandle
    _view: View
    _dense: tuple[torch.Tensor, ...]
    _rope: Optional[RopeSpec]

    @staticmethod
    def __new__(cls, handle: StoreHandle, view: View, dense: Sequence[torch.Tensor] = (),
                rope: Optional[tuple[RopeSpec, RopeTables]] = None) -> "QVGCache":
        shape = view.outer_shape(handle.spec.part_dims)
        self = torch.Tensor._make_wrapper_subclass(
            cls, shape, strides=contiguous_strides(shape), dtype=handle.spec.torch_dtype,
            device=handle.arrays[0].device, requires_grad=False)
        self._handle, self._view, self._dense = handle, view, tuple(dense)
        self._flat: Optional[tuple[Any, tuple[list[str], tuple]]] = None
        for i, d in enumerate(self._dense):
            setattr(self, f"_dense{i}", d)
        # A rotated view (`cache.rope`): RoPE by the tables ``[n, D]`` (one row per token of the
        # view, in view order) is part of what this tensor stands for, applied by its reads.
        self._rope = None if rope is None else rope[0]
        if rope is not None:
            self._rope_cos, self._rope_sin = rope[1]
        handle.views.add(self)
        self._bind()
        return self

    def _bind(self) -> None:
        # The inner tensors named by __tensor_flatten__ are plain instance attributes, so that
        # the guards and the subclass unwrapping of every compiled call find them without
        # running Python (a __getattr__ here cost ~10 us per lookup, ~20 lookups per call).
        for name, array in zip(self._handle.spec.attr_names, self._handle.arrays):
            setattr(self, name, array)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def empty(cls, shape: Sequence[int], seq_dim: int, config: Optional[QVGConfig] = None, role: str = "key",
              dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
              policy: Optional[CachePolicy] = None, roles: Optional[Sequence[str]] = None,
              **options: Any) -> "QVGCache":
        """An all-zero cache of ``shape`` (every token a hole).

        Args:
            seq_dim: the sequence dim; the last dim is the head dim.
            config: quantization (default: the ``qvg`` preset).
            role: ``"key"`` or ``"value"`` (bit width).
            roles: for K and V packed along the last dim (MAGI-1): one role per equal part,
                e.g. ``("key", "value")``; ``split``/``chunk`` on the last dim give each part.
            policy, options: `CachePolicy` and keyword overrides of its fields (``chunk_tokens``,
                ``dense_chunks``, ``seal_chunks``, ``codebook_chunks``, ``codebook_bits``, ...).
        """
        shape = tuple(int(s) for s in shape)
        seq_dim = normalise_seq_dim(torch.Size(shape), seq_dim)
        config = QVGConfig.preset("qvg") if config is None else config
        if not isinstance(config, QVGConfig):
            raise TypeError(f"config: expected a QVGConfig, got {type(config).__name__}")
        if not dtype.is_floating_point or dtype.itemsize == 1:
            raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64, got {dtype}")
        roles = (role,) if roles is None else tuple(roles)
        if shape[-1] % len(roles):
            raise ValueError(f"roles: {len(roles)} parts do not divide the last dim {shape[-1]}")
        policy = policy_from_options(policy, **options)
        spec = StoreSpec(config, policy, (shape[-1] // len(roles),) * len(roles), roles,
                         str(dtype).removeprefix("torch."))
        lead = [s for d, s in enumerate(shape) if d not in (seq_dim, len(shape) - 1)]
        cap = shape[seq_dim]
        if policy.chunk_tokens is not None:
            spec = spec.sized_for(policy.chunk_tokens, cap)
        arrays = spec.allocate(lead, cap, torch.device(device))
        dims, axis = [], 0
        for d in range(len(shape)):
            if d == seq_dim:
                dims.append(SEQ)
            elif d == len(shape) - 1:
                dims.append(CHAN)
            else:
                dims.append(axis)
                axis += 1
        view = View(tuple(dims), tuple(Lead(0, n) for n in lead), ((RUN, 0, cap),), (0, len(roles)))
        return cls(StoreHandle(spec, arrays), view)

    @classmethod
    def empty_like(cls, t: torch.Tensor, seq_dim: int, config: Optional[QVGConfig] = None, **kwargs: Any) -> "QVGCache":
        """An empty cache with ``t``'s shape, dtype and device (``t`` is not read)."""
        return cls.empty(tuple(t.shape), seq_dim, config, dtype=t.dtype, device=t.device, **kwargs)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, seq_dim: int, config: Optional[QVGConfig] = None,
                   **kwargs: Any) -> "QVGCache":
        """Compress a dense cache buffer (the buffer is not kept).

        Tokens up to the last non-zero one count as written. With a known slot length
        (``chunk_tokens``) the last slot's worth stays dense (it may still be rewritten); sinks
        (``dense_sinks``) stay dense; the rest is sealed in segments of ``seal_chunks`` slots (one
        segment when the slot length is not known yet).
        """
        if not isinstance(dense, torch.Tensor) or isinstance(dense, QVGCache):
            raise TypeError(f"dense: expected a dense torch.Tensor, got {type(dense).__name__}")
        if not dense.dtype.is_floating_point:
            raise TypeError(f"dense: expected a floating-point cache, got {dense.dtype}")
        cache = cls.empty_like(dense, seq_dim, config, **kwargs)
        values = cache._view.to_normalised(dense.detach())
        splits = list(torch.split(values, list(cache._handle.spec.part_dims), dim=-1))
        handle = cache._handle
        written = values.ne(0).reshape(-1, values.shape[-2], values.shape[-1]).any(-1).any(0).nonzero()
        if written.numel() and not handle.spec.slot_tokens:
            sized = handle.spec.sized_for_segment(int(written[-1]) + 1)
            handle.replace(sized, regrow(handle.store, sized))
        torch.ops.qvg.cache_load(handle.arrays, splits, handle.spec.json)
        return cache

    # --- introspection -------------------------------------------------------------------------
    @property
    def spec(self) -> StoreSpec:
        return self._handle.spec

    @property
    def seq_dim(self) -> int:
        """The outer dim that is the sequence."""
        return self._view.seq_dim()

    def nbytes(self) -> int:  # type: ignore[override]
        """Bytes really allocated for this tensor's store: every array (packed codes, scales,
        assignments, codebooks, the dense tail, the token state) plus dense pieces."""
        arrays = self._handle.arrays + list(self._dense)
        return sum(t.numel() * t.element_size() for t in arrays)

    def mark_growing(self) -> None:
        """Eager only: this cache comes back longer on the next call (a history grown by ``cat``,
        a cache re-made each chunk). Its sequence length and the store dims that grow with
        capacity are marked ``maybe_mark_dynamic``, so the first graph that reads it is already
        symbolic in them instead of compiling once static and again dynamic when the next chunk
        arrives."""
        handle = self._handle
        if not handle.concrete:
            return
        torch._dynamo.maybe_mark_dynamic(self, self._view.seq_dim())
        store = handle.store
        now, more = handle.spec.shapes(store.lead, store.capacity), handle.spec.shapes(store.lead, store.capacity + 1)
        for name, array in zip(handle.spec.names(), handle.arrays):
            dims = [d for d, (a, b) in enumerate(zip(now[name], more[name])) if a != b]
            if dims:
                torch._dynamo.maybe_mark_dynamic(array, dims)

    def memory(self) -> dict[str, float]:
        """Where this store's bytes go, in bits per element of the dense tensor it stands for
        (``[*lead, capacity, channels]``): ``codes``, ``scales`` (with zero points),
        ``assignments``, ``codebooks``, ``open_rows`` (the BF16 tail: open chunks and sinks),
        ``token_state`` (the token map, slots and segment ids), ``dense_pieces`` (tokens appended
        by ``cat``), and their sum ``total``; ``ratio`` is the dense bits over ``total``.

        On a small cache the open rows and codebooks dominate: a chunk of L tokens kept open
        costs ``bits(dtype) * L / capacity`` bits per element on its own, and a codebook of C
        BF16 centroids shared by n tokens ``16 * C / n``."""
        groups = {"codes": "codes", "scales": "scales", "zeros": "scales", "assign": "assignments",
                  "cents": "codebooks", "tail": "open_rows"}
        store = self._handle.store
        elements = math.prod(store.lead) * store.capacity * self._handle.spec.channels
        out = dict.fromkeys(("codes", "scales", "assignments", "codebooks", "open_rows", "token_state",
                             "dense_pieces"), 0.0)
        for name, t in zip(self._handle.spec.names(), self._handle.arrays):
            key = groups.get(name.rstrip("0123456789"), "token_state")
            out[key] += t.numel() * t.element_size() * 8 / max(1, elements)
        out["dense_pieces"] = sum(t.numel() * t.element_size() for t in self._dense) * 8 / max(1, elements)
        out["total"] = sum(out.values())
        out["ratio"] = 8 * self.dtype.itemsize / max(out["total"], 1e-12)
        return out

    def compression_ratio(self) -> float:
        """Bytes of the dense tensor this store stands for (its dtype) over `nbytes`."""
        store = self._handle.store
        dense = math.prod(store.lead) * store.capacity * self._handle.spec.channels * self.dtype.itemsize
        dense += sum(t.numel() * t.element_size() for t in self._dense)
        return dense / max(1, self.nbytes())

    def token_counts(self) -> dict[str, int]:
        """Tokens of the store by state: ``sealed``, ``dense``, ``holes``; and ``segments`` (live
        codebooks)."""
        store = self._handle.store
        pm = store.pos_map
        return {"sealed": int(is_sealed(pm).sum()), "dense": int(is_dense(pm).sum()),
                "holes": int((pm == HOLE).sum()), "segments": int((store.segs[:, 0] > 0).sum())}

    def __repr__(self) -> str:  # must not decode anything
        counts = self.token_counts() if self._handle.concrete else {}
        return (f"QVGCache(shape={list(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"seq_dim={self.seq_dim}, {counts}, nbytes={self.nbytes()})")

    # --- explicit operations -------------------------------------------------------------------
    def snapshot(self, memo: Optional[dict[int, StoreHandle]] = None) -> "QVGCache":
        """An exact copy: the whole store's arrays copied as they are (token states, codebooks,
        open rows) under the same view, and the dense pieces copied. Unlike ``clone()``, which
        stores a view's appended tokens the way the pipeline would have written them (sealing
        all but the newest chunk), nothing is quantized again. ``memo`` (store id -> copy) keeps
        views of one store views of one copy when several caches are copied together."""
        memo = {} if memo is None else memo
        handle = memo.get(id(self._handle))
        if handle is None:
            handle = StoreHandle(self._handle.spec, [a.clone() for a in self._handle.settled()])
            memo[id(self._handle)] = handle
        return QVGCache(handle, self._view, [d.clone() for d in self._dense])

    @property
    def rope(self) -> Optional[tuple[RopeSpec, RopeTables]]:
        """``(spec, (cos, sin))`` of a rotated view (tables ``[n, D]``, one row per token of the
        view), None for a plain one."""
        return None if self._rope is None else (self._rope, (self._rope_cos, self._rope_sin))

    def dequantize(self) -> torch.Tensor:
        """The dense tensor this cache (view) stands for (a new tensor; rotated for a rotated view)."""
        dense = decode_view(self)
        if self._rope is None:
            return dense
        view = self._view
        rows = view.to_normalised(dense)
        return view.from_normalised(apply_rope(rows, self._rope_cos, self._rope_sin, self._rope)).contiguous()

    def seal(self, release: bool = True) -> "QVGCache":
        """End of a video: quantize the dense slots now (each chunk still once; sinks stay dense).

        Args:
            release: also free the dense slot rows (one BF16 chunk per store, by default), so the
                store holds only packed tokens and sinks. Eager only. The next eager write, or
                an eager ``zero_()`` (the reset before the next video), allocates the rows again;
                a compiled graph cannot grow its inputs, so it cannot be the first to write.
        Returns self.
        """
        if not isinstance(release, bool):
            raise TypeError(f"release: expected a bool, got {type(release).__name__}")
        handle = self._handle
        torch.ops.qvg.cache_seal(handle.arrays, handle.spec.json)
        if release and handle.spec.slot_tokens:
            if not handle.concrete:
                raise RuntimeError("QVGCache.seal(release=True) frees arrays and runs eagerly only; "
                                   "use seal(release=False) inside a compiled function")
            released = handle.spec.released()
            handle.replace(released, regrow(handle.store, released))
        return self

    def is_whole(self) -> bool:
        """Whether this tensor is its whole store, in store order along every store dim, with no
        appended dense tokens."""
        view, handle = self._view, self._handle
        return (not self._dense and self._rope is None and view.plain_lead and view.parts == (0, len(handle.spec.part_dims))
                and view.lead_sel(handle.arrays[0].shape[:-2]) is None and len(view.pieces) == 1
                and statically_known_true(view.pieces[0][1] == 0)
                and statically_known_true(view.pieces[0][2] == handle.arrays[POS_MAP_AT].shape[0]))

    def save(self, path: str) -> None:
        """Write this cache (a clone, when it is a view) to a safetensors file (`io.write_store`)."""
        if not isinstance(path, (str, Path)):
            raise TypeError(f"path: expected a str or Path, got {type(path).__name__}")
        if self._rope is not None:
            raise ValueError("save: a view rotated by RoPE has no store of its own; save the cache it was made from")
        cache = self if self.is_whole() and self._view.mode == VIEW else self.clone()
        write_store(str(path), cache._handle.spec, cache._handle.settled(), cache._view)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> "QVGCache":
        """Read a cache written by `save`: device arrays go to ``device``, the token state stays
        on the host."""
        spec, arrays, view = read_store(str(path), device)
        return cls(StoreHandle(spec, arrays), view)

    # --- torch.compile -------------------------------------------------------------------------
    def __tensor_flatten__(self) -> tuple[list[str], tuple[StoreSpec, View, Optional[RopeSpec]]]:
        # Called by the guards and the unwrapping of every compiled call: built once per spec.
        spec = self._handle.spec
        if self._flat is None or self._flat[0] is not spec:
            names = list(spec.attr_names) + [f"_dense{i}" for i in range(len(self._dense))]
            if self._rope is not None:
                names += ["_rope_cos", "_rope_sin"]
            self._flat = (spec, (names, (spec, _symbolless(self._view), self._rope)))
        names, meta = self._flat[1]
        return list(names), meta

    def __reduce_ex__(self, protocol: int) -> tuple[Callable[..., "QVGCache"], tuple]:
        """Pickle as the flattened cache: inner arrays, layout metadata and outer size, no cycle.

        The default reduction of a tensor subclass pickles ``__dict__``, which reaches the
        handle's set of views and so this tensor again: `torch.save` failed on the weak
        references, and Inductor's cache-key pickler (``fast`` mode, no memo) on the cycle. On
        torch < 2.13 AOTAutograd keys a compiled graph by pickling its example inputs, so a graph
        taking a cache bypassed AOTAutograd's cache (Inductor's FX graph cache still served its
        compiled code). The package's source fingerprint rides
        along so that such keys also change with the dispatch rules traced into the graph; it is
        ignored on load. Views of one store come back as separate stores over the same arrays."""
        if self._handle.concrete:
            self._handle.settled()
        names, meta = self.__tensor_flatten__()
        inner = {name: getattr(self, name) for name in names}
        return _unpickle, (inner, meta, tuple(self.shape), _SOURCE_FINGERPRINT)

    def _stable_hash_for_caching(self) -> str:
        """Key of this subclass input for AOTAutograd's cache: the layout, not the data.

        The inner arrays' sizes and strides are part of it: the metadata leaves out lengths the
        arrays determine, so a store regrown by ``cat`` can flatten to the same metadata and the
        same outer (symbolic) size with larger arrays. Without them a recompile for the larger
        store would reuse the compiled code of the smaller one, whose Inductor input asserts
        then fail at run time. The package's source fingerprint is part of it too."""
        names, (spec, view, rope) = self.__tensor_flatten__()
        inner = [f"{n}:{t.dtype}:{tuple(t.shape)}:{t.stride()}" for n in names for t in (getattr(self, n),)]
        key = "|".join([_SOURCE_FINGERPRINT, spec.json, repr(view), repr(rope), str(tuple(self.shape)), *inner])
        return hashlib.sha256(key.encode()).hexdigest()

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: tuple[StoreSpec, View, Optional[RopeSpec]],
                             outer_size: Sequence[Any], outer_stride: Sequence[Any]) -> "QVGCache":
        spec, view, rope = meta
        arrays = [inner[f"_{n}"] for n in spec.names()]
        dense = [inner[f"_dense{i}"] for i in range(view.dense_count())]
        tables = None if rope is None else (rope, (inner["_rope_cos"], inner["_rope_sin"]))
        return QVGCache(StoreHandle(spec, arrays), _restore_lengths(view, dense, outer_size[view.seq_dim()]), dense,
                        tables)

    # --- dispatch ------------------------------------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        handler = cls._OPS.get(func)
        why = "no compressed implementation"
        if handler is not None and func not in cls._KEEPS_ROPE and _any_rotated(args):
            handler, why = None, "an op other than a layout view or the read on a view rotated by RoPE"
        if handler is not None:
            try:
                return handler(func, args, kwargs)
            except Unsupported as exc:
                why = str(exc)
        if cls._FALLBACK is None:
            raise RuntimeError("QVGCache: its op table is not loaded (import qvg_compile.cache)")
        return cls._FALLBACK(func, args, kwargs, why)

    @classmethod
    def implements(cls, *ops: Any, keeps_rope: bool = False) -> Callable[[Handler], Handler]:
        """Register a handler ``(func, args, kwargs) -> result`` for ATen ops (torchao's pattern);
        a handler raises `view.Unsupported` to send a call to the fallback. ``keeps_rope``: the
        handler also serves views rotated by RoPE (it keeps their tables right, through
        `view_results.make_view`); otherwise such views take the fallback."""
        def register(fn: Handler) -> Handler:
            for op in ops:
                cls._OPS[op] = fn
                if keeps_rope:
                    cls._KEEPS_ROPE.add(op)
            return fn
        return register

    @classmethod
    def otherwise(cls, fn: Fallback) -> Fallback:
        """Register the fallback ``(func, args, kwargs, why) -> result`` for ops without a handler."""
        cls._FALLBACK = fn
        return fn


def from_flat(inner: dict[str, torch.Tensor], meta: tuple[StoreSpec, View, Optional[RopeSpec]],
              shape: Sequence[Any]) -> QVGCache:
    """The `QVGCache` of a flattened form: ``__tensor_flatten__``'s inner arrays by name and its
    metadata, and the outer size (a cache's strides are always the contiguous ones of its size)."""
    return QVGCache.__tensor_unflatten__(inner, meta, shape, contiguous_strides(shape))


def _unpickle(inner: dict[str, torch.Tensor], meta: tuple[StoreSpec, View, Optional[RopeSpec]],
              shape: tuple[int, ...], source: str) -> QVGCache:
    """Rebuild a pickled `QVGCache` (`QVGCache.__reduce_ex__`); ``source`` is only a key part."""
    return from_flat(inner, meta, shape)


def _any_rotated(args: tuple) -> bool:
    """Whether a positional argument (or a tensor in a list of them, as ``cat`` takes) is a
    rotated `QVGCache` view."""
    for a in args:
        if isinstance(a, QVGCache):
            if a._rope is not None:
                return True
        elif isinstance(a, (list, tuple)) and any(isinstance(t, QVGCache) and t._rope is not None for t in a):
            return True
    return False


def _symbolless(view: View) -> View:
    """The view as flatten metadata: the lengths that the inner tensors and the outer size
    determine (dense pieces, a single run) are left out, so they never become guards."""
    runs = [p for p in view.pieces if p[0] == RUN]
    pieces = tuple((k, a, None) if k == DENSE or len(runs) == 1 else (k, a, n) for k, a, n in view.pieces)
    return View(view.dims, view.lead, pieces, view.parts, view.bcast, view.mode)


def _restore_lengths(view: View, dense: Sequence[torch.Tensor], length: Any) -> View:
    known = sum(d.shape[-2] for d in dense)
    pieces = []
    for k, a, n in view.pieces:
        if k == DENSE:
            n = dense[a].shape[-2]
        elif n is None:
            n = length - known
        pieces.append((k, a, n))
    return View(view.dims, view.lead, tuple(pieces), view.parts, view.bcast, view.mode)
