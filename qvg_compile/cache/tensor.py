"""`QVGCache`: a tensor that looks like a dense KV cache and stores sealed QVG segments.

The facade has the dense cache's shape, dtype and device. Behind it, a `_Storage` holds, along
the cache's sequence dim:
- sealed segments ``(start, end, QVGSegment)``: quantized exactly once, when writing moves past
  them, with codebooks warm-started from the previous segment;
- one open slot ``(start, end, dense)``: the slot being written, kept in the input dtype while
  denoising steps rewrite it;
- zeros everywhere else (never written), as in the freshly allocated dense buffer.

Views (`cache[:, lo:hi]`, `.transpose(1, 2)`) share the storage. Writes into a view quantize on
write; ``F.scaled_dot_product_attention`` on views reads the compressed history block by block
(`read.blockwise_attention`) without building a dense copy. Moving a range onto another range
(rolling windows) relabels whole segments. Any other op dequantizes and runs densely: correct,
counted and warned about once (`stats`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ..quant.config import QVGConfig
from ..quant.qvg import encode_qvg
from ..quant.segment import QVGSegment
from . import stats
from .read import blockwise_attention

aten = torch.ops.aten
_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


@dataclass
class _Storage:
    shape: tuple[int, ...]
    seq_dim: int
    dtype: torch.dtype
    device: torch.device
    config: QVGConfig
    role: str
    segments: list[tuple[int, int, QVGSegment]] = field(default_factory=list)
    open: Optional[tuple[int, int, torch.Tensor]] = None
    codebook_every: int = 4
    since_codebook: int = 0

    @property
    def length(self) -> int:
        return self.shape[self.seq_dim]

    def region(self, start: int, end: int) -> torch.Tensor:
        """Dense ``[.., end-start, ..]`` values of tokens ``[start, end)`` (decodes what it must)."""
        shape = list(self.shape)
        shape[self.seq_dim] = end - start
        out = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for s, e, dense in self._pieces(start, end):
            out.narrow(self.seq_dim, s - start, e - s).copy_(dense)
        return out

    def _pieces(self, start: int, end: int) -> list[tuple[int, int, torch.Tensor]]:
        pieces = []
        for s, e, seg in self.segments:
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                stats.count("decoded_tokens", hi - lo)
                pieces.append((lo, hi, seg.dequantize().narrow(self.seq_dim, lo - s, hi - lo)))
        if self.open is not None:
            s, e, dense = self.open
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                pieces.append((lo, hi, dense.narrow(self.seq_dim, lo - s, hi - lo)))
        return sorted(pieces, key=lambda p: p[0])

    def blocks(self, start: int, end: int) -> list[tuple[int, int, Optional[torch.Tensor]]]:
        """Ordered ``(s, e, dense or None)`` covering ``[start, end)``; None marks a zero gap.
        Sealed segments are decoded lazily by the caller, one at a time."""
        spans: list[tuple[int, int, Any]] = []
        for s, e, seg in self.segments:
            if max(s, start) < min(e, end):
                spans.append((s, e, seg))
        if self.open is not None and max(self.open[0], start) < min(self.open[1], end):
            spans.append(self.open)
        spans.sort(key=lambda p: p[0])
        out: list[tuple[int, int, Any]] = []
        pos = start
        for s, e, item in spans:
            lo, hi = max(s, start), min(e, end)
            if lo > pos:
                out.append((pos, lo, None))
            out.append((lo, hi, (s, item)))
            pos = hi
        if pos < end:
            out.append((pos, end, None))
        return out

    def seal_open(self) -> None:
        if self.open is None:
            return
        s, e, dense = self.open
        self.open = None
        self.segments.append((s, e, self._quantize(dense)))
        self.segments.sort(key=lambda p: p[0])
        stats.count("seals")
        stats.count("tokens_sealed", e - s)

    def _quantize(self, dense: torch.Tensor) -> QVGSegment:
        n = dense.shape[self.seq_dim]
        cfg = self.config
        if cfg.stages and cfg.centroids > n:
            cfg = cfg.replace(centroids=max(1, n))
        prev = self._last_segment()
        if prev is None or not cfg.stages or prev.centroids.shape[-2] != cfg.centroids \
                or prev.stages != cfg.stages:
            self.since_codebook = 0
            return encode_qvg(dense, cfg, seq_dim=self.seq_dim, role=self.role)
        if self.since_codebook + 1 < self.codebook_every:
            # Share the previous codebook (assign only): its bytes are paid once per
            # `codebook_every` segments, which is what makes 1-chunk segments reach ~7x.
            self.since_codebook += 1
            seg = encode_qvg(dense, cfg.replace(kmeans_iters=0), seq_dim=self.seq_dim,
                             role=self.role, init_centroids=prev.centroids)
            seg.centroids = prev.centroids
            return seg
        self.since_codebook = 0
        return encode_qvg(dense, cfg, seq_dim=self.seq_dim, role=self.role, init_centroids=prev.centroids)

    def _last_segment(self) -> Optional[QVGSegment]:
        return self.segments[-1][2] if self.segments else None

    def drop(self, start: int, end: int) -> None:
        """Forget tokens ``[start, end)`` (they read as zeros), keeping the rest of any segment."""
        kept = []
        for s, e, seg in self.segments:
            if e <= start or s >= end:
                kept.append((s, e, seg))
                continue
            stats.count("requantized_tokens", (e - s) - max(0, min(e, end) - max(s, start)))
            dense = seg.dequantize()
            if s < start:
                kept.append((s, start, self._quantize(dense.narrow(self.seq_dim, 0, start - s))))
            if e > end:
                kept.append((end, e, self._quantize(dense.narrow(self.seq_dim, end - s, e - end))))
        self.segments = sorted(kept, key=lambda p: p[0])
        if self.open is not None:
            s, e, dense = self.open
            if not (e <= start or s >= end):
                self.open = None
                for lo, hi in ((s, min(e, start)), (max(s, end), e)):
                    if lo < hi:
                        self.segments.append((lo, hi, self._quantize(dense.narrow(self.seq_dim, lo - s, hi - lo))))
                self.segments.sort(key=lambda p: p[0])

    def write(self, start: int, end: int, value: torch.Tensor) -> None:
        """Dense semantics of ``buf[.., start:end] = value`` (value in the storage layout)."""
        value = value.to(self.dtype)
        if self.open is not None and (start, end) == self.open[:2]:
            self.open = (start, end, value.clone())
            return
        if self.open is not None and start >= self.open[1]:
            self.seal_open()
        self.drop(start, end)
        if self.open is not None:
            self.seal_open()
        self.open = (start, end, value.clone())

    def nbytes(self) -> int:
        """Bytes held; a codebook shared by several segments is counted once."""
        seen: set[int] = set()
        total = 0
        for _, _, seg in self.segments:
            for tensor in seg.stored_tensors().values():
                key = tensor.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += tensor.numel() * tensor.element_size()
        if self.open is not None:
            total += self.open[2].numel() * self.open[2].element_size()
        return total


class QVGCache(torch.Tensor):
    """A KV cache tensor ``[B, S, H, D]`` / ``[B, H, S, D]`` (any layout with a sequence dim)
    that stores written tokens as 2-bit QVG segments. Construct with `QVGCache.from_dense` or
    `QVGCache.empty`."""

    _storage: _Storage
    _lo: int
    _perm: tuple[int, ...]

    @staticmethod
    def __new__(cls, storage: _Storage, lo: int = 0, hi: Optional[int] = None,
                perm: Optional[tuple[int, ...]] = None) -> "QVGCache":
        hi = storage.length if hi is None else hi
        perm = tuple(range(len(storage.shape))) if perm is None else perm
        base = list(storage.shape)
        base[storage.seq_dim] = hi - lo
        shape = [base[p] for p in perm]
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=storage.dtype, device=storage.device)
        self._storage, self._lo, self._perm = storage, lo, perm
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    @classmethod
    def empty(cls, shape: tuple[int, ...], seq_dim: int, config: Optional[QVGConfig] = None,
              role: str = "key", dtype: torch.dtype = torch.bfloat16,
              device: torch.device | str = "cpu", codebook_every: int = 4) -> "QVGCache":
        """An all-zero cache of ``shape`` whose sequence dim is ``seq_dim``.

        ``codebook_every``: a fresh k-means codebook every that many sealed segments; the
        segments between share it (assignment only), amortising its bytes."""
        if not isinstance(codebook_every, int) or codebook_every < 1:
            raise ValueError(f"codebook_every: expected a positive int, got {codebook_every!r}")
        if len(shape) < 3:
            raise ValueError(f"shape: expected rank >= 3, got {list(shape)}")
        seq_dim %= len(shape)
        if seq_dim == len(shape) - 1:
            raise ValueError("seq_dim: the last dim is the head dim, not the sequence")
        config = config or QVGConfig.preset("qvg")
        if not isinstance(config, QVGConfig):
            raise TypeError(f"config: expected a QVGConfig, got {type(config).__name__}")
        if config.method != "qvg":
            raise ValueError(f"config.method: QVGCache stores QVG/RTN segments, got {config.method!r}")
        if shape[-1] % config.group_size:
            raise ValueError(f"config.group_size: {config.group_size} does not divide head_dim {shape[-1]}")
        return cls(_Storage(tuple(shape), seq_dim, dtype, torch.device(device), config, role,
                            codebook_every=codebook_every))

    @classmethod
    def from_dense(cls, dense: torch.Tensor, seq_dim: int, config: Optional[QVGConfig] = None,
                   role: str = "key", codebook_every: int = 4) -> "QVGCache":
        """Compress a dense cache buffer. Tokens up to the last non-zero one count as written and
        are sealed as one segment (or kept dense when shorter than a codebook)."""
        if not isinstance(dense, torch.Tensor) or isinstance(dense, QVGCache):
            raise TypeError(f"dense: expected a dense torch.Tensor, got {type(dense).__name__}")
        if not dense.dtype.is_floating_point:
            raise TypeError(f"dense: expected a floating-point cache, got {dense.dtype}")
        cache = cls.empty(tuple(dense.shape), seq_dim, config, role, dense.dtype, dense.device,
                          codebook_every)
        st = cache._storage
        other = [d for d in range(dense.dim()) if d != st.seq_dim]
        written = dense.detach().ne(0).any(dim=other[0]) if other else dense.ne(0)
        for d in sorted(other[1:], reverse=True):
            written = written.any(dim=d - 1 if d > st.seq_dim else d)
        nz = torch.nonzero(written.reshape(-1)).flatten()
        if nz.numel():
            n = int(nz[-1]) + 1
            st.open = (0, n, dense.narrow(st.seq_dim, 0, n).detach().clone())
            st.seal_open()
        return cache

    # -- views -----------------------------------------------------------------------------
    @property
    def _hi(self) -> int:
        return self._lo + self.shape[self._perm.index(self._storage.seq_dim)]

    def _view_seq_dim(self) -> int:
        return self._perm.index(self._storage.seq_dim)

    def is_full_view(self) -> bool:
        return self._lo == 0 and self._hi == self._storage.length

    def nbytes(self) -> int:  # type: ignore[override]
        """Bytes actually held: sealed segments (with all their metadata) and the open slot."""
        return self._storage.nbytes()

    def compression_ratio(self) -> float:
        """Dense bytes of the full cache (in its dtype) over the bytes held."""
        dense = math.prod(self._storage.shape) * self._storage.dtype.itemsize
        return dense / max(1, self.nbytes())

    def dequantize(self) -> torch.Tensor:
        """The dense tensor this cache (view) stands for."""
        region = self._storage.region(self._lo, self._hi)
        return region.permute(self._perm).contiguous()

    def __repr__(self) -> str:  # noqa: D105 - must not materialize
        st = self._storage
        return (f"QVGCache(shape={list(self.shape)}, dtype={self.dtype}, seq_dim={st.seq_dim}, "
                f"view=[{self._lo}:{self._hi}], sealed={len(st.segments)}, "
                f"open={None if st.open is None else st.open[:2]}, bytes={self.nbytes()})")

    # -- dispatch --------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        return _torch_function(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        return _torch_dispatch(func, args, kwargs or {})


# Dynamo must not trace into the cache's Python: sealing is a run-time decision (positions,
# which slot is open) that a traced graph would freeze. Ops on a QVGCache therefore run eagerly,
# between compiled regions.
@torch._dynamo.disable
def _torch_function(func: Any, args: tuple, kwargs: dict) -> Any:
    if func in _SDPA:
        q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
        if isinstance(k, QVGCache) and isinstance(v, QVGCache) and not isinstance(q, QVGCache):
            out = _sdpa(q, k, v, *args[3:], **{n: a for n, a in kwargs.items()
                                               if n not in ("query", "key", "value")})
            if out is not None:
                return out
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


@torch._dynamo.disable
def _torch_dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    handler = _OPS.get(func)
    if handler is not None:
        result = handler(*args, **kwargs)
        if result is not NotImplemented:
            return result
    stats.fallback(str(func))
    dense = tree_map(lambda t: t.dequantize() if isinstance(t, QVGCache) else t, (args, kwargs))
    out = func(*dense[0], **dense[1])
    if func._schema.is_mutable and args and isinstance(args[0], QVGCache):
        _write_view(args[0], dense[0][0])
        return args[0]
    return out


def _write_view(view: QVGCache, value: torch.Tensor) -> None:
    """``view[...] = value`` with ``value`` in the view's layout (dense)."""
    inverse = [view._perm.index(i) for i in range(len(view._perm))]
    view._storage.write(view._lo, view._hi, value.permute(inverse))


def _slice(t: QVGCache, dim: int = 0, start: Optional[int] = None, end: Optional[int] = None,
           step: int = 1) -> Any:
    dim %= t.dim()
    size = t.shape[dim]
    start = 0 if start is None else max(0, min(size, start + size if start < 0 else start))
    end = size if end is None else max(start, min(size, end + size if end < 0 else end))
    if step != 1:
        return NotImplemented
    if start == 0 and end == size:
        return QVGCache(t._storage, t._lo, t._hi, t._perm)
    if dim != t._view_seq_dim():
        return NotImplemented
    return QVGCache(t._storage, t._lo + start, t._lo + end, t._perm)


def _transpose(t: QVGCache, a: int, b: int) -> QVGCache:
    perm = list(t._perm)
    a, b = a % t.dim(), b % t.dim()
    perm[a], perm[b] = perm[b], perm[a]
    return QVGCache(t._storage, t._lo, t._hi, tuple(perm))


def _permute(t: QVGCache, dims: list[int]) -> QVGCache:
    return QVGCache(t._storage, t._lo, t._hi, tuple(t._perm[d % t.dim()] for d in dims))


def _copy(dst: Any, src: Any, non_blocking: bool = False) -> Any:
    if not isinstance(dst, QVGCache):
        return NotImplemented
    if isinstance(src, QVGCache) and src._perm == dst._perm and src._storage.seq_dim == dst._storage.seq_dim \
            and _relabel(dst, src):
        return dst
    if isinstance(src, QVGCache):
        src = src.dequantize()
    if src.shape != dst.shape:
        src = src.expand(dst.shape)
    _write_view(dst, src)
    return dst


def _relabel(dst: QVGCache, src: QVGCache) -> bool:
    """Move whole sealed segments of ``src`` onto ``dst`` (rolling windows): no requantization.
    Returns False when ``src`` is not made only of whole segments."""
    s_st, d_st = src._storage, dst._storage
    pieces = [(s, e, seg) for s, e, seg in s_st.segments if s < src._hi and e > src._lo]
    if s_st.open is not None and s_st.open[0] < src._hi and s_st.open[1] > src._lo:
        return False
    if not pieces or any(s < src._lo or e > src._hi for s, e, _ in pieces):
        return False
    covered = sum(e - s for s, e, _ in pieces)
    if covered != src._hi - src._lo:
        return False
    shift = dst._lo - src._lo
    d_st.drop(dst._lo, dst._hi)
    d_st.segments = sorted(d_st.segments + [(s + shift, e + shift, seg) for s, e, seg in pieces],
                           key=lambda p: p[0])
    stats.count("relabelled_tokens", covered)
    return True


def _clone(t: QVGCache, memory_format: Any = None) -> QVGCache:
    st = t._storage
    shape = list(st.shape)
    shape[st.seq_dim] = t._hi - t._lo
    new = _Storage(tuple(shape), st.seq_dim, st.dtype, st.device, st.config, st.role,
                   codebook_every=st.codebook_every)
    new.segments = [(s - t._lo, e - t._lo, seg) for s, e, seg in st.segments
                     if s >= t._lo and e <= t._hi]
    partial = [(s, e) for s, e, _ in st.segments if s < t._hi and e > t._lo and (s < t._lo or e > t._hi)]
    if st.open is not None:
        s, e, dense = st.open
        lo, hi = max(s, t._lo), min(e, t._hi)
        if lo < hi:
            new.open = (lo - t._lo, hi - t._lo, dense.narrow(st.seq_dim, lo - s, hi - lo).clone())
    for s, e in partial:
        lo, hi = max(s, t._lo), min(e, t._hi)
        new.segments.append((lo - t._lo, hi - t._lo,
                             new._quantize(st.region(lo, hi))))
        stats.count("requantized_tokens", hi - lo)
    new.segments.sort(key=lambda p: p[0])
    return QVGCache(new, 0, None, t._perm)


def _detach(t: QVGCache) -> QVGCache:
    return QVGCache(t._storage, t._lo, t._hi, t._perm)


def _zero(t: QVGCache) -> Any:
    if not t.is_full_view():
        t._storage.drop(t._lo, t._hi)
        return t
    t._storage.segments = []
    t._storage.open = None
    return t


def _fill(t: QVGCache, value: Any) -> Any:
    if float(value) != 0.0:
        return NotImplemented
    return _zero(t)


def _to_copy(t: QVGCache, dtype: Any = None, layout: Any = None, device: Any = None,
             pin_memory: Any = None, non_blocking: bool = False, memory_format: Any = None) -> Any:
    if dtype not in (None, t.dtype):
        return NotImplemented
    device = torch.device(device) if device is not None else t.device
    new = copy.copy(t._storage)
    new.device = device
    new.segments = [(s, e, _move_segment(seg, device)) for s, e, seg in t._storage.segments]
    new.open = None if t._storage.open is None else (*t._storage.open[:2], t._storage.open[2].to(device))
    return QVGCache(new, t._lo, t._hi, t._perm)


def _move_segment(seg: QVGSegment, device: torch.device) -> QVGSegment:
    moved = copy.copy(seg)
    for name, tensor in seg.stored_tensors().items():
        setattr(moved, name, tensor.to(device))
    return moved


def _cat(tensors: list[Any], dim: int = 0) -> Any:
    """Functional append ``cat([cache, new...], seq)``: shares the sealed segments and keeps the
    appended tokens as the open slot of the result."""
    head = tensors[0]
    if not isinstance(head, QVGCache) or any(isinstance(t, QVGCache) for t in tensors[1:]):
        return NotImplemented
    dim %= head.dim()
    if dim != head._view_seq_dim() or not head.is_full_view():
        return NotImplemented
    st = head._storage
    inverse = [head._perm.index(i) for i in range(len(head._perm))]
    new_tokens = torch.cat([t.permute(inverse) for t in tensors[1:]], dim=st.seq_dim).to(st.dtype)
    shape = list(st.shape)
    shape[st.seq_dim] += new_tokens.shape[st.seq_dim]
    new = _Storage(tuple(shape), st.seq_dim, st.dtype, st.device, st.config, st.role,
                   list(st.segments), st.open, st.codebook_every, st.since_codebook)
    if new_tokens.shape[st.seq_dim]:
        new.seal_open()
        new.open = (st.length, shape[st.seq_dim], new_tokens)
    return QVGCache(new, 0, None, head._perm)


_OPS = {
    aten.cat.default: _cat,
    aten.slice.Tensor: _slice,
    aten.transpose.int: _transpose,
    aten.permute.default: _permute,
    aten.copy_.default: _copy,
    aten.clone.default: _clone,
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.zero_.default: _zero,
    aten.fill_.Scalar: _fill,
    aten._to_copy.default: _to_copy,
}


def _sdpa(q: torch.Tensor, k: QVGCache, v: QVGCache, attn_mask: Optional[torch.Tensor] = None,
          dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
          enable_gqa: bool = False) -> Optional[torch.Tensor]:
    """Fused read: attention over the compressed views; None when the views are not plain
    ``[B, H, N, D]`` sequence views of two caches with aligned ranges (dense fallback then)."""
    if dropout_p or is_causal or k.dim() != 4 or q.dim() != 4:
        return None
    if k._view_seq_dim() != 2 or v._view_seq_dim() != 2 or (k._hi - k._lo) != (v._hi - v._lo):
        return None
    if q.shape[1] % k.shape[1] or (q.shape[1] != k.shape[1] and not enable_gqa):
        return None
    stats.count("reads")

    def dense_blocks(view: QVGCache) -> list[tuple[int, int, Any]]:
        return view._storage.blocks(view._lo, view._hi)

    def materialise(view: QVGCache, s: int, e: int, item: Any) -> torch.Tensor:
        st = view._storage
        if item is None:
            shape = list(st.shape)
            shape[st.seq_dim] = e - s
            dense = torch.zeros(shape, dtype=st.dtype, device=st.device)
        else:
            start, payload = item
            if isinstance(payload, QVGSegment):
                stats.count("decoded_tokens", e - s)
                payload = payload.dequantize()
            dense = payload.narrow(st.seq_dim, s - start, e - s)
        return dense.permute(view._perm)

    k_blocks, v_blocks = dense_blocks(k), dense_blocks(v)
    # Keys and values are split at the union of their block boundaries.
    cuts = sorted({k._lo, k._hi} | {b[0] for b in k_blocks} | {b[1] for b in k_blocks}
                  | {b[0] - v._lo + k._lo for b in v_blocks} | {b[1] - v._lo + k._lo for b in v_blocks})

    def gen():
        for a, b in zip(cuts, cuts[1:]):
            kb = next(x for x in k_blocks if x[0] <= a and b <= x[1])
            vb = next(x for x in v_blocks if x[0] <= a - k._lo + v._lo and b - k._lo + v._lo <= x[1])
            kd = materialise(k, kb[0], kb[1], kb[2]).narrow(2, a - kb[0], b - a)
            off = v._lo - k._lo
            vd = materialise(v, vb[0], vb[1], vb[2]).narrow(2, a + off - vb[0], b - a)
            yield kd, vd, a - k._lo

    if attn_mask is not None:
        attn_mask = attn_mask.expand(*q.shape[:-1], k.shape[2])
    return blockwise_attention(q, gen(), attn_mask, scale)
