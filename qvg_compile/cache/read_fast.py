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
from typing import Optional

import torch

from ..kernels.attention import merge_partial, sdpa_with_lse
from ..kernels.gather import Gather
from .read_plan import ReadPlan, ReadSide

_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements (grown, never shrunk, until released)."""
    key = (device, dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        _workspaces.pop(key, None)
        buf = torch.empty(numel, dtype=dtype, device=device)
        _workspaces[key] = buf
    return buf


def workspace_bytes() -> int:
    """Bytes held by the read workspaces of every device."""
    return sum(b.numel() * b.element_size() for b in _workspaces.values())


def release_workspace() -> None:
    """Free the read workspaces (the next read allocates what it needs)."""
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


def attend_planned(q: torch.Tensor, k: ReadSide, v: ReadSide, plan: ReadPlan, scale: Optional[float]) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` for q ``[B*tile, Hq, M, D]`` over the views of ``plan``."""
    gather = bound_gather(k, v, plan)
    tile, groups = k.lead[0].tile, k.lead[1].interleave
    m, d = q.shape[2], q.shape[3]
    qf = fold_queries(q, tile, groups)
    b, hkv = qf.shape[:2]
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    acc: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    for block in plan.blocks:
        n = block.tokens
        buf = workspace(2 * b * hkv * n * d, qf.dtype, qf.device)
        wk = buf[:b * hkv * n * d].view(b, hkv, n, d)
        wv = buf[b * hkv * n * d:2 * b * hkv * n * d].view(b, hkv, n, d)
        gather(block.k_runs, block.v_runs, block.table, wk, wv)
        o, l = sdpa_with_lse(qf, wk, wv, sc)
        if len(plan.blocks) == 1:
            return unfold_output(o, tile, groups, m)
        if acc is None or lse is None:
            acc, lse = o.float().contiguous(), l.float().contiguous()
        else:
            merge_partial(acc, lse, o, l)
    if acc is None:
        raise RuntimeError("attend_planned: a fast read plan without blocks")
    return unfold_output(acc.to(q.dtype), tile, groups, m)
