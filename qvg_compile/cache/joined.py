"""`JoinedCache`: caches of different stores joined along the sequence by ``cat`` (eager only).

Pattern: attention code that keeps two caches per layer and reads them together, e.g.
HY-WorldPlay's ``cat([repeat(k_txt), cat([k_vision, k_new], 2)], 2)`` (a text store and a vision
store). One `QVGCache` view reads one store, so such a ``cat`` used to decode both.

Rewrite: the ``cat`` returns a `JoinedCache` holding its pieces as they are (`QVGCache` views and
dense tensors, in order). SDPA over a joined K and V with the same piece boundaries reads every
piece on its own with its log-sum-exp (``qvg::cache_attention_lse`` for cache pieces, a dense SDPA
for dense ones) and merges the partial outputs: the result is SDPA over the concatenation, and
no cache is decoded to a dense copy. Any other op decodes the pieces (a counted fallback).

Only concrete (eager) tensors are joined: inside a compiled graph the ``cat`` keeps the
`QVGCache` rule (one store). The read of a piece is the general one (`read.attend_general`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from . import tally
from ..kernels.attention import merge_partial, sdpa_with_lse
from .codec import leads
from .host import host_thread
from .lean_op import CACHE_OP_TAGS
from .ops import store_of
from .read import attend_general
from .read_plan import ReadSide
from .spec import StoreSpec
from .tensor import QVGCache, contiguous_strides
from .torch_function import RoutesSdpa

Tensor = torch.Tensor
# (q, k piece, v piece, scale) -> (out [B, H, M, Dv], lse [B, H, M] fp32), or None when the pair
# cannot be read compressed (registered by `dispatch`, which knows the views).
PairReader = Callable[[Tensor, QVGCache, QVGCache, Optional[float]], Optional[tuple[Tensor, Tensor]]]


@torch.library.custom_op("qvg::cache_attention_lse", mutates_args=(), tags=CACHE_OP_TAGS)
def cache_attention_lse(q: Tensor, k: list[Tensor], k_dense: list[Tensor], k_pieces: list[int], k_lead: list[int],
                        k_part: int, k_spec: str, v: list[Tensor], v_dense: list[Tensor], v_pieces: list[int],
                        v_lead: list[int], v_part: int, v_spec: str,
                        scale: Optional[float]) -> tuple[Tensor, Tensor]:
    """``qvg::cache_attention`` (same arguments) that also returns the fp32 log-sum-exp
    ``[B, Hq, M]``, read by the general path."""
    def side(arrays, dense, pieces, lead, part, spec) -> ReadSide:
        return ReadSide(store_of(arrays, spec), pieces, dense[0] if dense else None, leads(lead), part)

    with host_thread(q.device):
        out, lse = attend_general(q, side(k, k_dense, k_pieces, k_lead, k_part, k_spec),
                                  side(v, v_dense, v_pieces, v_lead, v_part, v_spec), scale, return_lse=True)
    return out.contiguous(), lse.float().contiguous()


@cache_attention_lse.register_fake
def _(q, k, k_dense, k_pieces, k_lead, k_part, k_spec, v, v_dense, v_pieces, v_lead, v_part, v_spec, scale):
    dv = StoreSpec.from_json(v_spec).part_dims[v_part]
    return q.new_empty((*q.shape[:-1], dv)), q.new_empty(q.shape[:-1], dtype=torch.float32)


class JoinedCache(RoutesSdpa):
    """Pieces (`QVGCache` views and dense tensors of one rank, dtype and device) joined along
    ``dim``: the tensor ``cat(pieces, dim)`` without the copy."""

    _PAIR_READER: Optional[PairReader] = None
    pieces: tuple[Tensor, ...]
    dim: int

    @staticmethod
    def __new__(cls, pieces: Sequence[Tensor], dim: int) -> "JoinedCache":
        head = pieces[0]
        shape = list(head.shape)
        shape[dim] = sum(p.shape[dim] for p in pieces)
        self = torch.Tensor._make_wrapper_subclass(cls, shape, strides=contiguous_strides(shape), dtype=head.dtype,
                                                   device=head.device, requires_grad=False)
        self.pieces, self.dim = tuple(pieces), dim
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __repr__(self) -> str:  # must not decode anything
        kinds = ", ".join(type(p).__name__ for p in self.pieces)
        return f"JoinedCache(shape={list(self.shape)}, dim={self.dim}, pieces=[{kinds}])"

    def dequantize(self) -> Tensor:
        """The dense tensor (decodes every cache piece)."""
        return torch.cat([p.dequantize() if isinstance(p, QVGCache) else p for p in self.pieces], self.dim)

    @classmethod
    def pair_reader(cls, fn: PairReader) -> PairReader:
        """Register how one cache piece of K and its V are read with their log-sum-exp."""
        cls._PAIR_READER = fn
        return fn

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.qvg.sdpa.default:
            out = _joined_sdpa(*args, **kwargs)
            if out is not None:
                return out
        elif func is torch.ops.aten.cat.default:
            return join(list(args[0]), args[1] if len(args) > 1 else kwargs.get("dim", 0))
        elif func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return args[0]
        tally.fallback(str(func), "an op other than cat or SDPA on caches of different stores")
        dense = torch.utils._pytree.tree_map(lambda t: t.dequantize() if isinstance(t, (JoinedCache, QVGCache)) else t,
                                             (args, kwargs))
        return func(*dense[0], **dense[1])


def join(tensors: Sequence[Tensor], dim: int) -> JoinedCache:
    """``cat(tensors, dim)`` as a `JoinedCache` (joined inputs are flattened into their pieces)."""
    dim %= tensors[0].dim()
    pieces: list[Tensor] = []
    for t in tensors:
        if isinstance(t, JoinedCache):
            if t.dim != dim:
                raise ValueError(f"cat along dim {dim} of caches joined along dim {t.dim}")
            pieces.extend(t.pieces)
        elif t.numel() or t.dim() > 1:
            pieces.append(t)
    return JoinedCache(pieces, dim)


def _joined_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                 enable_gqa: bool = False) -> Optional[Tensor]:
    """SDPA over joined K and V whose pieces line up, merged by log-sum-exp; None when it cannot
    be read that way (the caller falls back)."""
    if not (isinstance(key, JoinedCache) and isinstance(value, JoinedCache)) or isinstance(query, JoinedCache):
        return None
    if attn_mask is not None or dropout_p or is_causal or enable_gqa or query.dim() != 4 or key.dim != 2:
        return None
    pairs = list(zip(key.pieces, value.pieces))
    if len(key.pieces) != len(value.pieces) or any(k.shape[2] != v.shape[2] for k, v in pairs):
        return None
    sc = 1.0 / query.shape[-1] ** 0.5 if scale is None else float(scale)
    partial = [_read_pair(query, k, v, scale, sc) for k, v in pairs]
    if any(p is None for p in partial):
        return None
    acc, lse = partial[0][0].float().contiguous(), partial[0][1].float().contiguous()
    for o, l in partial[1:]:
        merge_partial(acc, lse, o, l)
    return acc.to(query.dtype)


def _read_pair(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], sc: float) -> Optional[tuple[Tensor, Tensor]]:
    if isinstance(k, QVGCache) and isinstance(v, QVGCache) and JoinedCache._PAIR_READER is not None:
        return JoinedCache._PAIR_READER(q, k, v, scale)
    if type(k) is torch.Tensor and type(v) is torch.Tensor and k.shape[1] == q.shape[1]:
        out, lse = sdpa_with_lse(q, k.to(q.dtype), v.to(q.dtype), sc)
        return out, lse.reshape(*q.shape[:-1])
    return None
