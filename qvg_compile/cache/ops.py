"""The ``qvg::cache_*`` custom ops: every step of `QVGCache` that touches its arrays.

They take the store's arrays as one list (in `StoreSpec.names` order), positions as SymInt
lists and the static layout as a JSON string, so a compiled graph calls them with whatever
positions a chunk has without guarding on them. Mutating ops declare the whole list mutated;
Inductor keeps them in place (no copy of the store). The bodies build a `Store` and run its
algorithms; fake implementations give output shapes from the spec alone. The two ops a model
calls at every layer, ``cache_write`` and ``cache_attention``, are registered through `lean_op`
(no per-call Python autograd and version bookkeeping); the rest through `torch.library.custom_op`.

``qvg::sdpa`` is the entry point ``F.scaled_dot_product_attention`` is routed to when a
`QVGCache` is involved: on dense tensors it is SDPA, on caches `QVGCache` dispatches it to
``qvg::cache_attention`` (or to a dense fallback).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import seal_ahead
from .ahead import just_sealed
from .clone import clone_store
from .codec import lead_sel, leads, piece_tokens, positions
from .host import host_thread
from .lean_op import CACHE_OP_TAGS, lean_op
from .read import ReadSide, attend
from .read_fast import replay
from .read_plan import args_key
from .spec import StoreSpec
from .store import Store, replay_rows_write, runs_of
from .view import Lead

Tensor = torch.Tensor


def store_of(arrays: Sequence[Tensor], spec: str) -> Store:
    return Store(StoreSpec.from_json(spec), list(arrays))


# --- mutations ---------------------------------------------------------------------------------
@lean_op("cache_write", mutates_args=("arrays",), tags=CACHE_OP_TAGS)
def cache_write(arrays: list[Tensor], values: list[Tensor], parts: list[int], start: int,
                index: Optional[Tensor], lead: list[int], spec: str, relocate: bool) -> None:
    """Write ``values`` (``[*lead(sel), n, D_p]`` for each part in ``parts``) at positions
    ``[start, start + n)``, or at ``index[i]`` for the i-th token when ``index`` is given."""
    if index is None and not relocate and replay_rows_write(arrays, values, parts, start, lead,
                                                            StoreSpec.from_json(spec)):
        return
    with host_thread(arrays[0].device):
        store = store_of(arrays, spec)
        full = [None] * store.parts
        for p, v in zip(parts, values):
            full[p] = v
        sel = lead_sel(lead)
        if index is None:
            store.write(int(start), full, sel, relocate)
            return
        idx = index.reshape(-1).cpu().long()
        idx = torch.where(idx < 0, idx + store.capacity, idx)
        if bool(((idx < 0) | (idx >= store.capacity)).any()):
            raise IndexError(f"index out of range in self: positions {idx.tolist()} for a cache of "
                             f"{store.capacity} tokens")
        for i, first, n in runs_of(idx):
            store.write(first, [None if v is None else v[..., i:i + n, :] for v in full], sel, relocate)


@cache_write.register_fake
def _(arrays, values, parts, start, index, lead, spec, relocate) -> None:
    return None


@torch.library.custom_op("qvg::cache_copy", mutates_args=("dst",), tags=CACHE_OP_TAGS)
def cache_copy(dst: list[Tensor], src: list[Tensor], pieces: list[int], start: int, dst_spec: str,
               src_spec: str) -> None:
    """Copy the store positions ``pieces`` (runs only) of ``src`` (empty list: ``dst`` itself) to
    ``[start, start + n)`` of ``dst``."""
    with host_thread(dst[0].device):
        target = store_of(dst, dst_spec)
        source = target if not src else store_of(src, src_spec)
        target.copy_from(int(start), source, positions(pieces))


@cache_copy.register_fake
def _(dst, src, pieces, start, dst_spec, src_spec) -> None:
    return None


@torch.library.custom_op("qvg::cache_release", mutates_args=("arrays",), tags=CACHE_OP_TAGS)
def cache_release(arrays: list[Tensor], pieces: list[int], spec: str) -> None:
    """Make the store positions of ``pieces`` holes (``zero_`` / ``fill_(0)``)."""
    with host_thread(arrays[0].device):
        store = store_of(arrays, spec)
        pos = positions(pieces)
        if pos.numel() == store.capacity and torch.equal(pos, torch.arange(store.capacity)):
            store.reset()
        else:
            store.release(pos)


@cache_release.register_fake
def _(arrays, pieces, spec) -> None:
    return None


@torch.library.custom_op("qvg::cache_seal", mutates_args=("arrays",), tags=CACHE_OP_TAGS)
def cache_seal(arrays: list[Tensor], spec: str) -> None:
    """Seal every dense slot."""
    with host_thread(arrays[0].device):
        store_of(arrays, spec).seal_all()


@cache_seal.register_fake
def _(arrays, spec) -> None:
    return None


@torch.library.custom_op("qvg::cache_load", mutates_args=("arrays",), tags=CACHE_OP_TAGS)
def cache_load(arrays: list[Tensor], values: list[Tensor], spec: str) -> None:
    """Replace the whole content by dense ``values[p]`` ``[*lead, capacity, D_p]``."""
    with host_thread(arrays[0].device):
        store_of(arrays, spec).load_dense(values)


@cache_load.register_fake
def _(arrays, values, spec) -> None:
    return None


# --- reads -------------------------------------------------------------------------------------
@torch.library.custom_op("qvg::cache_decode", mutates_args=(), tags=CACHE_OP_TAGS)
def cache_decode(arrays: list[Tensor], pieces: list[int], lead: list[int], parts: list[int],
                 spec: str) -> list[Tensor]:
    """Dense ``[*lead sizes, n, D_p]`` of the runs in ``pieces`` (in order), for each part in
    ``parts`` (first, count), leading dims mapped by ``lead`` (4 ints per dim)."""
    with host_thread(arrays[0].device):
        store = store_of(arrays, spec)
        axes = leads(lead)
        sel = tuple((ax.offset, ax.length) for ax in axes)
        outs = store.decode(positions(pieces), range(int(parts[0]), int(parts[0]) + int(parts[1])), sel)
        return [repeat_lead(x, axes).contiguous() for x in outs]


@cache_decode.register_fake
def _(arrays, pieces, lead, parts, spec) -> list[Tensor]:
    s = StoreSpec.from_json(spec)
    n = piece_tokens(pieces)
    sizes = [ax.size for ax in leads(lead)]
    dev = arrays[0].device
    return [arrays[0].new_empty((*sizes, n, s.part_dims[p]), dtype=s.torch_dtype, device=dev)
            for p in range(parts[0], parts[0] + parts[1])]


@torch.library.custom_op("qvg::cache_clone", mutates_args=(), tags=CACHE_OP_TAGS)
def cache_clone(arrays: list[Tensor], dense: list[Tensor], pieces: list[int], lead: list[int],
                parts: list[int], spec: str) -> list[Tensor]:
    """The arrays of a new store holding exactly the view (``pieces``, ``lead``, ``parts``);
    ``dense[p]`` ``[*lead sizes, m, D_p]`` are the view's dense pieces, concatenated."""
    with host_thread(arrays[0].device):
        store = store_of(arrays, spec)
        return clone_store(store, positions(pieces), leads(lead), (int(parts[0]), int(parts[1])), list(dense))


@cache_clone.register_fake
def _(arrays, dense, pieces, lead, parts, spec) -> list[Tensor]:
    new = StoreSpec.from_json(spec).for_parts(parts)
    shapes, dtypes = new.shapes([ax.size for ax in leads(lead)], piece_tokens(pieces)), new.dtypes()
    dev = arrays[0].device
    return [arrays[0].new_empty(shapes[n], dtype=dtypes[n], device=torch.device("cpu") if new.is_host(n) else dev)
            for n in new.names()]


@lean_op("cache_attention", mutates_args=(), tags=CACHE_OP_TAGS)
def cache_attention(q: Tensor, k: list[Tensor], k_dense: list[Tensor], k_pieces: list[int], k_lead: list[int],
                    k_part: int, k_spec: str, v: list[Tensor], v_dense: list[Tensor], v_pieces: list[int],
                    v_lead: list[int], v_part: int, v_spec: str, scale: Optional[float]) -> Tensor:
    """SDPA of dense ``q`` ``[B, Hq, M, D]`` over two cache views ``[B, H, n, D]``."""
    out = None
    if not k_dense and not v_dense:
        out = replay(args_key(q, k, v, k_pieces, v_pieces, k_lead, v_lead, k_part, v_part), q, k, v, scale)
    if out is None:
        with host_thread(q.device):
            def side(arrays, dense, pieces, lead, part, spec) -> ReadSide:
                return ReadSide(store_of(arrays, spec), pieces, dense[0] if dense else None,
                                leads(lead), part)  # type: ignore[arg-type]
            k_side = side(k, k_dense, k_pieces, k_lead, k_part, k_spec)
            v_side = side(v, v_dense, v_pieces, v_lead, v_part, v_spec)
            # The key after the stores are built: building one undoes a write opened ahead.
            key = args_key(q, k, v, k_pieces, v_pieces, k_lead, v_lead, k_part, v_part)
            out = attend(q, k_side, v_side, scale, key)
    if just_sealed and not k_dense and not v_dense:
        seal_ahead.after_read(q, k, k_pieces, k_lead, k_part, k_spec, v, v_pieces, v_lead, v_part, v_spec)
    return out.contiguous()


@cache_attention.register_fake
def _(q, k, k_dense, k_pieces, k_lead, k_part, k_spec, v, v_dense, v_pieces, v_lead, v_part, v_spec, scale):
    return q.new_empty((*q.shape[:-1], StoreSpec.from_json(v_spec).part_dims[v_part]))


@torch.library.custom_op("qvg::sdpa", mutates_args=())
def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` (the dense meaning; `QVGCache` overrides it)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa).contiguous()


@sdpa.register_fake
def _(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def repeat_lead(x: Tensor, axes: Sequence[Lead]) -> Tensor:
    """``x`` ``[*stored lead, n, D]`` repeated along each leading dim as its `Lead` says (interleave,
    then tile): the rows a view of those leading dims shows."""
    for a, ax in enumerate(axes):
        if ax.interleave > 1:
            x = x.repeat_interleave(ax.interleave, dim=a)
        if ax.tile > 1:
            reps = [1] * x.dim()
            reps[a] = ax.tile
            x = x.repeat(reps)
    return x
