"""The fast read: a planned attention over two `QVGCache` views that only launches.

With a `read_plan.ReadPlan` (built once per cache state), a read is, per workspace block (one
block unless the history passes the workspace cap): one `kernels.gather.Gather` launch
that decodes the sealed K and V of the view and copies its dense rows into a workspace shared
by every read on the device, then one fused SDPA (cuDNN or flash on CUDA, the CPU flash kernel
elsewhere) over it. Several blocks are merged by log-sum-exp. Nothing here reads the token
state or plans: the host cost is the launches.

The workspace holds ``2 * B * H * tokens * D`` elements in the queries' dtype; it lives until
`release_workspace` and is reused by the next read on the same device (reads are ordered on the
current stream, so a read never sees another's workspace half-written).
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence

import torch

from ..kernels.attention import merge_partial, sdpa_fused, sdpa_with_lse
from ..kernels.gather import Gather
from ..kernels.launch import Prebound
from . import ahead, tally
from .read_plan import ReadPlan, ReadSide, cached_plan, drop_replays, fast_reads_enabled
from .rope import RopeSpec, rotate_rows_
from .spec import POS_MAP_AT

Tensor = torch.Tensor
# RoPE applied to the gathered keys (`rope`): tables ``[tokens, D]`` over the read's tokens, in
# view order, and how to rotate.
Rotation = tuple[Tensor, Tensor, RopeSpec]

_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements (grown, never shrunk, until released)."""
    key = (device, dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            # Replays hold views of the old buffer: let it go now, not when they are next used.
            drop_replays()
        _workspaces.pop(key, None)
        buf = torch.empty(numel, dtype=dtype, device=device)
        _workspaces[key] = buf
    return buf


def workspace_bytes() -> int:
    """Bytes held by the read workspaces of every device."""
    return sum(b.numel() * b.element_size() for b in _workspaces.values())


def release_workspace() -> None:
    """Free the read workspaces (the next read allocates what it needs)."""
    drop_replays()
    _workspaces.clear()


def fold_queries(q: torch.Tensor, tile: int, groups: int) -> torch.Tensor:
    """``[tile*B, Hkv*groups, M, D]`` -> ``[B, Hkv, tile*groups*M, D]``: the queries of every
    batch copy (``repeat`` for CFG) and of every head of a GQA group read one stored K/V row."""
    tb, hq, m, d = q.shape
    b, hkv = tb // tile, hq // groups
    return q.reshape(tile, b, hkv, groups, m, d).permute(1, 2, 0, 3, 4, 5).reshape(b, hkv, tile * groups * m, d)


def unfold_output(out: torch.Tensor, tile: int, groups: int, m: int) -> torch.Tensor:
    """Inverse of `fold_queries` for the attention output."""
    b, hkv, _, d = out.shape
    return out.reshape(b, hkv, tile, groups, m, d).permute(2, 0, 1, 3, 4, 5).reshape(tile * b, hkv * groups, m, d)


def bound_gather(k: ReadSide, v: ReadSide, plan: ReadPlan) -> Gather:
    """The plan's gather, bound once to the arrays of the two stores (rebound if other array
    objects come back, e.g. after the store was regrown)."""
    sources = k.store.part_arrays(k.part) + v.store.part_arrays(v.part)
    if plan.gather is None or len(sources) != len(plan.sources) or not all(map(operator.is_, sources, plan.sources)):
        plan.gather = Gather(k.packed(), v.packed(), k.rows(), v.rows(), plan.use_triton)
        plan.sources = sources
    return plan.gather


class BoundRead:
    """A fast read with everything but the queries fixed: per workspace block, the gather's launch
    with its arguments bound (`Gather.prebind`) and the workspace views it fills; the query fold.
    Built on the first read of a plan, kept on the plan (`ReadPlan.replay`); valid while the stores
    hold the arrays it was bound to and the workspace is the one it fills. Blocks after the first
    are merged by log-sum-exp (stream order keeps a block's gather behind the previous SDPA).

    Args:
        k, v: the two sides of the read (``plan`` is theirs, with at least one block).
        q: queries ``[B*tile, Hq, M, D]`` of the layout every replay will pass.
    """

    def __init__(self, k: ReadSide, v: ReadSide, plan: ReadPlan, q: torch.Tensor) -> None:
        if not plan.blocks:
            raise ValueError("plan: a bound read needs at least one workspace block")
        gather = bound_gather(k, v, plan)
        self.sources = plan.sources
        names = k.store.spec.names()
        self.k_at = [names.index(n) for n in k.store.spec.part_names(k.part)] + [names.index("seg_ids")]
        names = v.store.spec.names()
        self.v_at = [names.index(n) for n in v.store.spec.part_names(v.part)] + [names.index("seg_ids")]
        self.tile, self.groups = k.lead[0].tile, k.lead[1].interleave
        self.plain = self.tile == 1 and self.groups == 1
        b, hkv, d = q.shape[0] // self.tile, q.shape[1] // self.groups, q.shape[3]
        self.buf = workspace(2 * b * hkv * max(block.tokens for block in plan.blocks) * d, q.dtype, q.device)
        self.blocks = []
        for block in plan.blocks:
            n = block.tokens
            wk = self.buf[:b * hkv * n * d].view(b, hkv, n, d)
            wv = self.buf[b * hkv * n * d:2 * b * hkv * n * d].view(b, hkv, n, d)
            self.blocks.append((gather.prebind(block.k_runs, block.v_runs, block.table, wk, wv), wk, wv))
        self.sealed, self.rows = plan.sealed, plan.tokens - plan.sealed

    def prepare(self) -> None:
        """Resolve the gathers' compiled kernels now (`Prebound.prepare`), not at the first call."""
        for launch, _, _ in self.blocks:
            if isinstance(launch, Prebound):
                launch.prepare()

    def valid(self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> bool:
        """Whether the op's array lists ``k``/``v`` are the arrays this read was bound to and its
        workspace is still the current one."""
        sources = self.sources
        nk = len(self.k_at)
        return (all(k[i] is sources[j] for j, i in enumerate(self.k_at))
                and all(v[i] is sources[nk + j] for j, i in enumerate(self.v_at))
                and _workspaces.get((self.buf.device, self.buf.dtype)) is self.buf)

    def __call__(self, q: Tensor, scale: Optional[float], rotate: Optional[Rotation] = None,
                 return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The attention output ``[B*tile, Hq, M, D]``; with ``rotate``, the gathered keys are
        rotated by RoPE in the workspace first; with ``return_lse``, also the fp32 log-sum-exp
        ``[B*tile, Hq, M]``."""
        m, d = q.shape[2], q.shape[3]
        qf = q if self.plain else fold_queries(q, self.tile, self.groups)
        sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
        acc: Optional[Tensor] = None
        lse: Optional[Tensor] = None
        first = 0
        for launch, wk, wv in self.blocks:
            launch()
            if rotate is not None:
                n = wk.shape[2]
                rotate_rows_(wk, rotate[0][first:first + n], rotate[1][first:first + n], rotate[2])
                first += n
            if len(self.blocks) == 1 and not return_lse:
                out = sdpa_fused(qf, wk, wv, sc)
                continue
            o, l = sdpa_with_lse(qf, wk, wv, sc)
            if len(self.blocks) == 1:
                out, out_lse = o, l
            elif acc is None or lse is None:
                acc, lse = o.float().contiguous(), l.float().contiguous()
            else:
                merge_partial(acc, lse, o, l)
        if acc is not None and lse is not None:
            out, out_lse = acc.to(q.dtype), lse
        if not self.plain:
            out = unfold_output(out, self.tile, self.groups, m)
            if return_lse:
                out_lse = unfold_output(out_lse.unsqueeze(-1), self.tile, self.groups, m).squeeze(-1)
        return (out, out_lse.float()) if return_lse else out


def replay(key: tuple, q: Tensor, k: Sequence[Tensor], v: Sequence[Tensor], scale: Optional[float],
           rotate: Optional[Rotation] = None, return_lse: bool = False) -> Optional[Tensor | tuple[Tensor, Tensor]]:
    """The read of ``qvg::cache_attention``'s arguments by its plan's `BoundRead`, when the plan
    cached under ``key`` (`read_plan.args_key`) has one that is valid; else None (the op then
    runs in full). No `Store` is built and the token state is not read: the host cost is the
    gather's launch and the SDPA call. ``rotate``, ``return_lse``: as `BoundRead.__call__`."""
    k_pos, v_pos = k[POS_MAP_AT], v[POS_MAP_AT]
    if ahead.pending(id(k_pos)) or ahead.pending(id(v_pos)):
        # A write opened ahead has not come: the full read builds a `Store`, which undoes it.
        return None
    plan = cached_plan(key, k_pos, v_pos)
    bound = None if plan is None else plan.replay
    if bound is None or not bound.valid(k, v) or not fast_reads_enabled():
        return None
    tally.fast_read(bound.sealed, bound.rows, replayed=True)
    return bound(q, scale, rotate, return_lse)


def attend_planned(q: Tensor, k: ReadSide, v: ReadSide, plan: ReadPlan, scale: Optional[float],
                   rotate: Optional[Rotation] = None, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``softmax(q k^T * scale) v`` for q ``[B*tile, Hq, M, D]`` over the views of ``plan``, by
    the plan's `BoundRead` (bound here on the plan's first read, or again when it went stale).
    ``rotate``, ``return_lse``: as `BoundRead.__call__`."""
    return bind(k, v, plan, q)(q, scale, rotate, return_lse)


def bind(k: ReadSide, v: ReadSide, plan: ReadPlan, q: Tensor) -> BoundRead:
    """The plan's `BoundRead` for queries laid out as ``q``, bound now unless a valid one is kept."""
    bound = plan.replay
    if bound is None or not bound.valid(*_array_lists(k, v)):
        bound = plan.replay = BoundRead(k, v, plan, q)
    return bound


def _array_lists(k: ReadSide, v: ReadSide) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return list(k.store.arrays.values()), list(v.store.arrays.values())
