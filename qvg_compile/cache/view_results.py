"""The `QVGCache` results of view ops: a new view of a cache's store, with the dense pieces that
view still uses, and the aliasing metadata torch expects of a view op's result.

Shared by the op table (`dispatch`) and the writes (`cache_writes`), which build their results
the same way.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

from .tensor import QVGCache
from .view import DENSE, Unsupported, View


def make_view(like: QVGCache, view: View, dense: Optional[Sequence[torch.Tensor]] = None) -> QVGCache:
    """A cache of ``like``'s store seen through ``view``, keeping only the dense pieces (``like``'s,
    or ``dense``) that ``view`` refers to, renumbered in order. A view rotated by RoPE keeps its
    rotation: the callers (layout views, `QVGCache.implements` with ``keeps_rope``) leave the
    sequence, so the tables' rows, as they are."""
    dense = like._dense if dense is None else dense
    used = sorted({a for k, a, _ in view.pieces if k == DENSE})
    if used != list(range(len(dense))):
        remap = {old: new for new, old in enumerate(used)}
        view = View(view.dims, view.lead, tuple((k, remap[a], n) if k == DENSE else (k, a, n)
                                                for k, a, n in view.pieces), view.parts, view.bcast, view.mode)
        dense = [dense[i] for i in used]
    return QVGCache(like._handle, view, dense, like.rope)


def dense_concat(t: QVGCache) -> Optional[torch.Tensor]:
    """The view's dense pieces, in order, as one ``[*lead sizes, m, D]`` tensor (None if none)."""
    order = [a for k, a, _ in t._view.pieces if k == DENSE]
    if not order:
        return None
    parts = [t._dense[i] for i in order]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def no_dense(t: QVGCache, what: str) -> None:
    """Raise Unsupported (``what`` names the op) if ``t`` has tokens appended by ``cat``."""
    if t._dense:
        raise Unsupported(f"{what} of a cache with tokens appended by cat")


def spec_dims(t: QVGCache) -> tuple[int, ...]:
    """The channel dims of the parts of ``t``'s store."""
    return t._handle.spec.part_dims


def view_result(func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
    """``out`` marked as aliasing the input of the view op ``func``, as torch expects."""
    return return_and_correct_aliasing(func, args, kwargs, out)
