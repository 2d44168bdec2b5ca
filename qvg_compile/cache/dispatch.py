"""The ATen op table of `QVGCache`: what each op means on compressed storage.

Native ops (no dense copy of the history):
- views: ``slice``, ``select``, ``split``/``split_with_sizes``/``unbind`` (sequence, leading
  dims, or channel parts for K|V packed caches), ``transpose``, ``permute``, ``unsqueeze``,
  ``squeeze``, ``view``/``_unsafe_view`` (size-1 dims, ``expand`` + ``reshape`` GQA), ``expand``,
  ``alias``, ``detach``;
- ``repeat`` (leading dims, e.g. CFG) and ``repeat_interleave`` (GQA heads): shared storage;
- writes: ``copy_`` of a dense tensor (quantize on write, by the sealing policy) or of another
  cache (packed tokens moved as they are), ``index_copy_``/``index_put_`` along the sequence,
  ``slice_scatter``/``index_copy``/``index_put`` (clone + write), ``fill_``/``zero_``;
- ``clone``, ``_to_copy`` (device and dtype), ``cat`` along the sequence with dense tensors or
  views of the same store (shares the store, appended tokens stay dense), ``zeros_like``/
  ``empty_like`` (an empty cache);
- ``qvg::sdpa`` (``F.scaled_dot_product_attention``): ``qvg::cache_attention`` over the packed
  store (``qvg::cache_attention_rope`` when the keys are a view rotated by RoPE);
- ``qvg::rope`` (`rope`): a rotated view (`rotated`); on such a view the layout views above that
  keep the tokens and channels (marked ``keeps_rope``) and the read run natively, anything else
  decodes and rotates.

Everything else decodes the caches it touches, runs the dense op and, for in-place ops, writes
the result back: correct, counted in `stats` and warned about once per op.

The entries map ops onto the modules below: writes, copies and clones are `cache_writes`, the
results of view ops are built by `view_results`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.utils._pytree import tree_map

from . import ops as _ops  # noqa: F401  (registers the qvg::cache_* ops)
from . import tally
from .cache_writes import clone_cache, copy_cache, ensure_slots, make_writable, write_dense
from .codec import flat_lead, flat_pieces
from .joined import JoinedCache, join
from .rotated import rotate_view, rotated_read, rotated_slice
from .spec import StoreSpec
from .tensor import QVGCache, StoreHandle
from .view import CHAN, COW, DENSE, RUN, SEQ, Lead, Unsupported, View, merge_pieces
from .view_results import dense_concat, make_view, no_dense, spec_dims, view_result

aten = torch.ops.aten
implements = QVGCache.implements


# --- views -------------------------------------------------------------------------------------
@implements(aten.slice.Tensor, keeps_rope=True)
def _slice(func, args, kwargs):
    t, dim, start, end, step = (list(args) + [0, None, None, 1][len(args) - 1:])[:5]
    dim = kwargs.get("dim", dim)
    start, end, step = kwargs.get("start", start), kwargs.get("end", end), kwargs.get("step", step)
    if step != 1:
        raise Unsupported("slices with a step")
    dim %= t.dim()
    if t._dense and t._view.dims[dim] != SEQ:
        no_dense(t, "slicing a leading or channel dim")
    view = t._view.slice(dim, start, end, spec_dims(t))
    if t._rope is not None and view is not t._view and t._view.dims[dim] == CHAN:
        raise Unsupported("slicing the channels of a view rotated by RoPE (the rotation mixes them)")
    if t._rope is not None and view is not t._view and t._view.dims[dim] == SEQ:
        # The tables have one row per token: a slice of the tokens slices them the same way.
        return view_result(func, args, kwargs, rotated_slice(t, view, start, end))
    return view_result(func, args, kwargs, make_view(t, view))


@implements(aten.select.int, keeps_rope=True)
def _select(func, args, kwargs):
    t, dim, index = args
    no_dense(t, "select")
    return view_result(func, args, kwargs, make_view(t, t._view.select(dim % t.dim(), index, spec_dims(t))))


@implements(aten.split.Tensor, aten.split_with_sizes.default)
def _split(func, args, kwargs):
    t, size = args[0], args[1]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % t.dim()
    total = t.shape[dim]
    sizes = list(size) if isinstance(size, (list, tuple)) else \
        [size] * (total // size) + ([total % size] if total % size else [])
    out, pos = [], 0
    for n in sizes:
        if t._dense and t._view.dims[dim] != SEQ:
            no_dense(t, "split of a leading or channel dim")
        out.append(make_view(t, t._view.slice(dim, pos, pos + n, spec_dims(t))))
        pos = pos + n
    return view_result(func, args, kwargs, out)


@implements(aten.unbind.int)
def _unbind(func, args, kwargs):
    t = args[0]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % t.dim()
    no_dense(t, "unbind")
    out = [make_view(t, t._view.select(dim, i, spec_dims(t))) for i in range(t.shape[dim])]
    return view_result(func, args, kwargs, out)


@implements(aten.transpose.int, keeps_rope=True)
def _transpose(func, args, kwargs):
    t, a, b = args
    return view_result(func, args, kwargs, make_view(t, t._view.transpose(a, b)))


@implements(aten.permute.default, keeps_rope=True)
def _permute(func, args, kwargs):
    t, order = args
    return view_result(func, args, kwargs, make_view(t, t._view.permute(order)))


@implements(aten.unsqueeze.default, keeps_rope=True)
def _unsqueeze(func, args, kwargs):
    t, dim = args
    if t._dense:
        no_dense(t, "unsqueeze")
    return view_result(func, args, kwargs, make_view(t, t._view.unsqueeze(dim)))


@implements(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, keeps_rope=True)
def _squeeze(func, args, kwargs):
    t = args[0]
    dims = list(range(t.dim())) if len(args) == 1 else ([args[1]] if isinstance(args[1], int) else list(args[1]))
    return view_result(func, args, kwargs, make_view(t, t._view.squeeze(dims, spec_dims(t))))


@implements(aten.view.default, aten._unsafe_view.default)
def _reshape(func, args, kwargs):
    t, shape = args
    no_dense(t, "view")
    out = make_view(t, t._view.reshape(shape, spec_dims(t)))
    return view_result(func, args, kwargs, out) if func is aten.view.default else out


@implements(aten.expand.default, keeps_rope=True)
def _expand(func, args, kwargs):
    t, sizes = args[0], args[1]
    no_dense(t, "expand")
    return view_result(func, args, kwargs, make_view(t, t._view.expand(sizes, spec_dims(t))))


@implements(aten.alias.default, aten.detach.default, keeps_rope=True)
def _alias(func, args, kwargs):
    t = args[0]
    return view_result(func, args, kwargs, make_view(t, t._view))


@implements(aten.repeat.default, keeps_rope=True)
def _repeat(func, args, kwargs):
    """Repeats along leading dims (CFG batch doubling) tile the view; tokens appended by cat are
    small and dense, so they are repeated for real, in the view's lead order."""
    t, reps = args
    view = t._view.repeat(reps, spec_dims(t))
    if not t._dense:
        return make_view(t, view)
    if len(reps) != len(t._view.dims) or t._view.bcast:
        raise Unsupported("repeat that adds dims to, or tiles a broadcast dim of, a cache with tokens appended by cat")
    lead_reps = [1] * len(t._view.lead)
    for d, r in zip(t._view.dims, reps):
        if d >= 0:
            lead_reps[d] = r
    return make_view(t, view, [x.repeat(*lead_reps, 1, 1) for x in t._dense])


# --- data ops ----------------------------------------------------------------------------------
@implements(aten.copy_.default)
def _copy(func, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, QVGCache):
        tally.fallback("copy_ (cache into a dense tensor)", "the destination is dense")
        return dst.copy_(src.dequantize())
    if isinstance(src, QVGCache):
        copy_cache(dst, src)
    else:
        write_dense(dst, src)
    return dst


@implements(aten.clone.default)
def _clone(func, args, kwargs):
    return clone_cache(args[0])


@implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    t = args[0]
    dtype = kwargs.get("dtype") or t.dtype
    device = torch.device(kwargs["device"]) if kwargs.get("device") is not None else t.device
    if not dtype.is_floating_point or dtype.itemsize == 1:
        raise Unsupported(f"conversion to {dtype}")
    spec = t._handle.spec
    new_spec = StoreSpec(spec.config, spec.policy, spec.part_dims, spec.roles, str(dtype).removeprefix("torch."),
                         spec.slot_tokens, spec.segments, spec.codebook)
    arrays = []
    for name, a in zip(spec.names(), t._handle.settled()):
        if spec.is_host(name):
            arrays.append(a.clone())
        elif name.startswith("tail"):
            arrays.append(a.to(device=device, dtype=dtype, copy=True))
        else:
            arrays.append(a.to(device=device, copy=True))
    dense = [d.to(device=device, dtype=dtype, copy=True) for d in t._dense]
    return QVGCache(StoreHandle(new_spec, arrays), t._view, dense)


@implements(aten.fill_.Scalar, aten.zero_.default)
def _fill(func, args, kwargs):
    t = args[0]
    value = 0 if func is aten.zero_.default else args[1]
    make_writable(t)
    view = t._view
    if isinstance(value, (int, float)) and value == 0 and t._view.lead_sel(t._handle.arrays[0].shape[:-2]) is None \
            and view.parts == (0, len(t._handle.spec.part_dims)):
        torch.ops.qvg.cache_release(t._handle.arrays, flat_pieces(view), t._handle.spec.json)
        if t._handle.concrete and t._handle.spec.policy.chunk_tokens:
            # An eager reset re-opens slots that seal() freed, so a compiled model can write next.
            ensure_slots(t, t._handle.spec.policy.chunk_tokens)
    else:
        write_dense(t, torch.full((), value, dtype=t.dtype, device=t.device))
    return t


def _seq_index(t: QVGCache, dim: int, index: torch.Tensor) -> torch.Tensor:
    if t._view.dims[dim % t.dim()] != SEQ or len(t._view.pieces) != 1 or t._view.pieces[0][0] != RUN:
        raise Unsupported("indexed writes along a dim other than the sequence")
    if index.dtype not in (torch.int64, torch.int32) or index.dim() != 1:
        raise Unsupported("indexed writes with a non 1-D integer index")
    return index


@implements(aten.index_copy_.default)
def _index_copy_(func, args, kwargs):
    t, dim, index, source = args
    index = _seq_index(t, dim, index)
    shape = list(t.shape)
    shape[dim % t.dim()] = index.numel()
    write_dense(t, source.expand(shape), index=index)
    return t


@implements(aten.index_put_.default)
def _index_put_(func, args, kwargs):
    t, indices, values = args[0], args[1], args[2]
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    tensors = [(i, x) for i, x in enumerate(indices) if x is not None]
    if accumulate or len(tensors) != 1 or tensors[0][1].dtype == torch.bool:
        raise Unsupported("index_put_ other than one integer index along the sequence")
    dim, index = tensors[0]
    index = _seq_index(t, dim, index)
    shape = list(t.shape)
    shape[dim] = index.numel()
    write_dense(t, values.expand(shape), index=index)
    return t


@implements(aten.index_copy.default, aten.index_put.default, aten.slice_scatter.default)
def _functional_write(func, args, kwargs):
    t = args[0]
    if not isinstance(t, QVGCache):
        raise Unsupported("a dense destination")
    out = clone_cache(t)
    if func is aten.slice_scatter.default:
        names = ("src", "dim", "start", "end", "step")
        a = dict(zip(names, (None, 0, None, None, 1)))
        a.update(zip(names, args[1:]))
        a.update(kwargs)
        if a["step"] != 1:
            raise Unsupported("slices with a step")
        target = make_view(out, out._view.slice(a["dim"] % out.dim(), a["start"], a["end"], spec_dims(out)))
        _copy(aten.copy_.default, (target, a["src"]), {})
    elif func is aten.index_copy.default:
        _index_copy_(aten.index_copy_.default, (out, *args[1:]), kwargs)
    else:
        _index_put_(aten.index_put_.default, (out, *args[1:]), kwargs)
    return out


@implements(aten.cat.default)
def _cat(func, args, kwargs):
    tensors = [t for t in args[0] if not (t.dim() == 1 and t.shape[0] == 0)]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if any(isinstance(t, JoinedCache) for t in tensors):
        return join(tensors, dim)
    head = next(t for t in tensors if isinstance(t, QVGCache))
    dim %= head.dim()
    if head._view.dims[dim] != SEQ or head._view.bcast:
        raise Unsupported("cat along a dim other than the sequence, or of an expanded cache")
    pieces: list[tuple[str, Any, Any]] = []
    dense: list[torch.Tensor] = []
    for t in tensors:
        if not isinstance(t, QVGCache):
            pieces.append((DENSE, len(dense), t.shape[dim]))
            dense.append(head._view.to_normalised(t.to(device=head.device, dtype=head.dtype)))
            continue
        if t._handle is not head._handle or not t._view.same_layout(head._view):
            if _joinable(tensors, dim):
                return join(tensors, dim)
            raise Unsupported("cat of caches with different stores or layouts")
        for kind, a, n in t._view.pieces:
            if kind == DENSE:
                pieces.append((DENSE, len(dense), n))
                dense.append(t._dense[a])
            else:
                pieces.append((kind, a, n))
    v = head._view
    merged = merge_pieces(tuple(pieces))
    out = make_view(head, View(v.dims, v.lead, merged, v.parts, v.bcast, COW), dense)
    grows = v.plain_lead and all(statically_known_true(b == 1) for b in v.bcast)
    if _grown_by_appends(merged) and grows:
        # A cache grown by repeated functional appends (``k = cat([k, k_new])``) would keep every
        # appended chunk dense: from the second appended piece on, everything but the last piece
        # goes into a store of its own (older appended chunks are sealed there by the policy) and
        # the last piece stays dense after it. The result then has the structure of a first
        # append (one run, one dense piece), so a cache fed back call after call always flattens
        # to the same metadata and compiles once per structure, not once per parity of the call.
        # Decided on the structure of the pieces alone (never their lengths) so compiled code
        # takes the same branch as eager.
        last = len(dense) - 1
        history = clone_cache(make_view(out, View(v.dims, v.lead, merged[:-1], v.parts, v.bcast, COW), dense[:last]))
        n = history._view.length()
        out = QVGCache(history._handle, View(v.dims, history._view.lead, ((RUN, 0, n), (DENSE, 0, merged[-1][2])),
                                             history._view.parts, v.bcast, COW), [dense[last]])
    if grows and [kind for kind, _, _ in out._view.pieces] == [RUN, DENSE]:
        out.mark_growing()
    return out


def _joinable(tensors: Sequence[torch.Tensor], dim: int) -> bool:
    """Eager caches of different stores joined along their sequence dim (`joined.JoinedCache`)."""
    caches = [t for t in tensors if isinstance(t, QVGCache)]
    return all(t._handle.concrete and t._view.dims[dim] == SEQ for t in caches) and \
        all(type(t) is torch.Tensor or isinstance(t, (QVGCache, JoinedCache)) for t in tensors)


def _grown_by_appends(pieces: Sequence[tuple[str, Any, Any]]) -> bool:
    """Stored tokens first, then at least two dense pieces appended after them."""
    kinds = [kind for kind, _, _ in pieces]
    if not kinds or kinds[0] != RUN or kinds.count(DENSE) < 2:
        return False
    first_dense = kinds.index(DENSE)
    return all(kind == DENSE for kind in kinds[first_dense:])


@implements(aten.zeros_like.default, aten.empty_like.default)
def _empty_like(func, args, kwargs):
    t = args[0]
    dtype = kwargs.get("dtype") or t.dtype
    device = kwargs.get("device") or t.device
    if any(not statically_known_true(b == 1) for b in t._view.bcast) or not dtype.is_floating_point:
        raise Unsupported("an empty cache of this view")
    spec = t._handle.spec.for_parts(t._view.parts)
    if spec.slot_tokens:
        spec = StoreSpec(spec.config, spec.policy, spec.part_dims, spec.roles, str(dtype).removeprefix("torch."),
                         spec.slot_tokens, spec.segments, spec.codebook)
    lead = [ax.size for ax in t._view.lead]
    n = t._view.length()
    arrays = spec.allocate(lead, n, torch.device(device))
    view = View(t._view.dims, tuple(Lead(0, s) for s in lead), ((RUN, 0, n),), (0, t._view.parts[1]), t._view.bcast)
    return QVGCache(StoreHandle(spec, arrays), view)


@implements(torch.ops.qvg.sdpa.default, keeps_rope=True)
def _sdpa(func, args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    a = dict(zip(names, defaults))
    a.update(zip(names, args))
    a.update(kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    if isinstance(q, QVGCache) and all(kind == DENSE for kind, _, _ in q._view.pieces):
        # Queries padded with an empty cache to share one RoPE call (LongCat) and sliced back:
        # no stored token is left in them, so the dense queries decode nothing.
        q = q.dequantize()
    if isinstance(q, QVGCache) or not isinstance(k, QVGCache) or not isinstance(v, QVGCache):
        raise Unsupported("queries from a cache, or only one of keys and values cached")
    if a["attn_mask"] is not None or a["dropout_p"] or a["is_causal"]:
        raise Unsupported("attention masks, dropout or is_causal")
    _fusable(q, k, v, a["enable_gqa"])
    if v._rope is not None:
        raise Unsupported("values rotated by RoPE")
    if k._rope is not None:
        return rotated_read(q, k, _read_sides(k, v), a["scale"])
    return torch.ops.qvg.cache_attention(q, *_read_sides(k, v), a["scale"])


@implements(torch.ops.qvg.rope.default)
def _rope(func, args, kwargs):
    names = ("x", "cos", "sin", "layout", "compute")
    a = dict(zip(names, args))
    a.update(kwargs)
    if not isinstance(a["x"], QVGCache) or isinstance(a["cos"], QVGCache) or isinstance(a["sin"], QVGCache):
        raise Unsupported("RoPE tables that are caches")
    return rotate_view(a["x"], a["cos"], a["sin"], a["layout"], a["compute"])


def _read_sides(k: QVGCache, v: QVGCache) -> list[Any]:
    """The K and V arguments of ``qvg::cache_attention`` (and its log-sum-exp variant)."""
    sides: list[Any] = []
    for t in (k, v):
        dense = dense_concat(t)
        sides += [t._handle.arrays, [] if dense is None else [dense], flat_pieces(t._view), flat_lead(t._view),
                  t._view.parts[0], t._handle.spec.json]
    return sides


@JoinedCache.pair_reader
def _read_pair_with_lse(q: torch.Tensor, k: QVGCache, v: QVGCache,
                        scale: Optional[float]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """One cache piece of a joined K and V (`joined`): SDPA with its log-sum-exp, or None when
    the views are not ones ``qvg::cache_attention`` reads."""
    try:
        _fusable(q, k, v, False)
    except Unsupported:
        return None
    return torch.ops.qvg.cache_attention_lse(q, *_read_sides(k, v), scale)


def _fusable(q: torch.Tensor, k: QVGCache, v: QVGCache, enable_gqa: bool) -> None:
    """Raise Unsupported unless ``qvg::cache_attention`` computes exactly what SDPA would."""
    if q.dim() != 4:
        raise Unsupported("queries that are not [B, H, M, D]")
    for t in (k, v):
        view = t._view
        if view.dims != (0, 1, SEQ, CHAN) or len(view.lead) != 2 or view.parts[1] != 1 or view.bcast:
            raise Unsupported("keys or values that are not [B, H, N, D] views of one part")
        if view.lead[0].interleave != 1 or view.lead[1].tile != 1:
            raise Unsupported("batch repeated by repeat_interleave or heads by repeat")
        if t._dense and view.lead[1].interleave != 1:
            raise Unsupported("tokens appended by cat to heads repeated for GQA")
    if k.shape[:3] != v.shape[:3]:
        raise Unsupported("keys and values of different batch or length")
    stored = sorted((k._view.lead[0].length, v._view.lead[0].length))
    if not statically_known_true(stored[1] % stored[0] == 0):
        raise Unsupported("keys and values repeated along the batch by factors that do not divide")
    # K and V pieces may carry different symbols of equal value (each cache's appended piece is
    # sized on its own): the compiled graph guards on their equality.
    kinds = [(kind, n) for kind, _, n in k._view.pieces]
    if [kind for kind, _ in kinds] != [kind for kind, _, _ in v._view.pieces] or not all(
            guard_or_false(n == m) for (_, n), (_, _, m) in zip(kinds, v._view.pieces)):
        raise Unsupported("keys and values made of different pieces")
    if not statically_known_true(k.shape[2] > 0):
        if k.shape[2] == 0:
            raise Unsupported("no keys")
    hq, hk = q.shape[1], k.shape[1]
    if (hq != hk and not enable_gqa) or hq % hk or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise Unsupported("shapes SDPA rejects")


# --- fallback ----------------------------------------------------------------------------------
def _shape_only(args: tuple) -> bool:
    """Whether the caches among ``args`` hold bare fake arrays outside a tracing proxy mode: Dynamo
    propagating example values through the frame it traces. That run only infers shapes; the
    backend may still rewrite the op away (`passes.rope_read`), and an op it keeps is counted when
    AOTAutograd traces the graph (a proxy mode is active) or when it runs eagerly. A graph loaded
    from a warm AOTAutograd cache is not traced: its fallbacks are not counted again (the decodes
    they cause still are, in ``decoded_tokens``)."""
    if get_proxy_mode() is not None:
        return False  # AOTAutograd (or make_fx) is tracing: the op will run in the compiled graph
    caches = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, QVGCache)]
    return bool(caches) and all(type(t._handle.arrays[0]) is FakeTensor for t in caches)


@QVGCache.otherwise
def fallback(func: Any, args: tuple, kwargs: dict, why: str) -> Any:
    """Decode the caches, run the dense op, write in-place results back into the caches."""
    if not _shape_only(args):
        tally.fallback(str(func), why)
    dense_args, dense_kwargs = tree_map(lambda t: t.dequantize() if isinstance(t, QVGCache) else t, (args, kwargs))
    out = func(*dense_args, **dense_kwargs)
    schema = func._schema
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            original = args[i] if i < len(args) else kwargs.get(arg.name)
            if isinstance(original, QVGCache):
                new = dense_args[i] if i < len(args) else dense_kwargs[arg.name]
                write_dense(original, new)
                written.append((new, original))
    if not written:
        return out

    def back(x: Any) -> Any:
        for new, original in written:
            if x is new:
                return original
        return x
    return tree_map(back, out)
