"""Read plans: what one attention read of two `QVGCache` views fetches, built once per cache state.

A read of a K and a V view is, for each side, a list of runs ``(kind, src, dst, n)`` (see
`kernels.gather`): sealed store positions decoded, or dense tail rows copied, into rows of a
dense workspace in the view's token order. The runs depend only on the stores' token state
(``pos_map``) and on the views (pieces, leading selections, parts), so a `ReadPlan` is built once
and kept, keyed by the stores' state stamps (`Store.stamp`, renewed by every change of a token
state): every layer's later reads and every denoising pass reuse it until a chunk is sealed, the
cache is reset or loaded, or the view changes. A plan can never serve a changed store.

Views the fast read does not take get a plan with ``reason`` set instead of runs (dense pieces
appended by ``cat``, keys and values repeated differently, holes in the view, a workspace cap
too small for one block); the general read serves them, and `stats` counts both kinds.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..kernels.gather import ROWS, SEALED, Gather, Run, block_table, gather_supported
from ..quant.packed import PackedStore
from .codec import PIECE_INTS, piece_tokens, run_pieces_only
from .spec import COUNTERS_AT, POS_MAP_AT, is_dense, is_sealed
from .store import Store, runs_of, stamp_of
from .view import Lead

# The workspace (K and V of one read, in the queries' dtype) is shared by every read on a
# device; reads of longer histories run in blocks of at most this many bytes. 1 GiB holds the
# whole 93,600-token K+V history of a Wan-1.3B layer (575 MB) in one block.
DEFAULT_WORKSPACE_BYTES = 1 << 30
PLAN_CACHE_SIZE = 4096
TABLE_CACHE_SIZE = 256


READ_PATHS = ("auto", "general")


def fast_reads_enabled() -> bool:
    """False when ``QVG_READ_PATH=general`` sends every read down the general path (to compare
    the two, or to rule the fast read out)."""
    path = os.environ.get("QVG_READ_PATH", "auto")
    if path not in READ_PATHS:
        raise ValueError(f"QVG_READ_PATH: expected one of {READ_PATHS}, got {path!r}")
    return path == "auto"


def workspace_limit() -> int:
    """The workspace cap in bytes (``QVG_READ_WORKSPACE_MB`` overrides the 1 GiB default). Read
    when a plan is built: plans cached before a change keep their blocks (`clear_plans`)."""
    text = os.environ.get("QVG_READ_WORKSPACE_MB")
    if text is None:
        return DEFAULT_WORKSPACE_BYTES
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"QVG_READ_WORKSPACE_MB: expected a positive int, got {text!r}")
    return int(text) << 20


@dataclass
class ReadSide:
    """One of K or V: its store, the view's pieces ``[kind, a, n] * pieces`` (kind 0: the store
    positions ``[a, a + n)``; 1: ``n`` tokens of a dense piece), the dense pieces concatenated
    ``[B*tile, H*interleave, m, D]`` (or None), the two leading dims and the part read."""

    store: Store
    pieces: Sequence[int]
    dense: Optional[torch.Tensor]
    lead: tuple[Lead, Lead]
    part: int

    def sel(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return tuple((ax.offset, ax.length) for ax in self.lead)  # type: ignore[return-value]

    def packed(self) -> PackedStore:
        return self.store.packed(self.part, self.sel())

    def rows(self) -> torch.Tensor:
        """The dense tail rows of the selection, ``[B, H, T, D]``."""
        return self.store.rows_view(self.part, self.sel())


@dataclass
class Block:
    """One workspace fill: the runs of each side (``dst`` relative to the block), their device
    table and grid (`kernels.gather.block_table`), and the block's token count."""

    k_runs: list[Run]
    v_runs: list[Run]
    table: tuple[torch.Tensor, int]
    tokens: int


@dataclass
class ReadPlan:
    """Either ``blocks`` (the fast read) or the ``reason`` the general read serves the views.
    ``gather`` is the gather bound to the arrays it was built from (``sources``), kept while the
    same arrays come back (`read_fast.bound_gather`)."""

    blocks: list[Block]
    tokens: int
    sealed: int
    use_triton: bool
    reason: Optional[str] = None
    gather: Optional[Gather] = None
    sources: tuple = ()
    replay: Any = None


def flag_runs(flags: "np.ndarray | torch.Tensor") -> list[tuple[int, int, bool]]:
    """Maximal runs ``(lo, hi, value)`` of a host bool vector. The usual read (a sealed history,
    then the open slot) is recognised from two reductions; other patterns find their edges."""
    f = flags.numpy() if isinstance(flags, torch.Tensor) else flags
    n = f.size
    count = int(np.count_nonzero(f))
    if count in (0, n):
        return [(0, n, count == n)]
    if f[:count].all():
        return [(0, count, True), (count, n, False)]
    edges = (np.flatnonzero(f[1:] != f[:-1]) + 1).tolist()
    bounds = [0, *edges, n]
    return [(lo, hi, bool(f[lo])) for lo, hi in zip(bounds, bounds[1:])]


_plans: "OrderedDict[tuple, tuple[weakref.ref, weakref.ref, ReadPlan]]" = OrderedDict()


def args_key(q: torch.Tensor, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], k_pieces: Sequence[int],
             v_pieces: Sequence[int], k_lead: Sequence[int], v_lead: Sequence[int], k_part: int, v_part: int) -> tuple:
    """The key of a read's plan, from the arguments of ``qvg::cache_attention`` alone: the two
    token maps and their state stamps (unique in the process: a changed or new store never
    matches an old key), the views and the queries' layout."""
    return (id(k[POS_MAP_AT]), stamp_of(k[COUNTERS_AT]), id(v[POS_MAP_AT]), stamp_of(v[COUNTERS_AT]),
            tuple(k_pieces), tuple(v_pieces), tuple(k_lead), tuple(v_lead), k_part, v_part, q.dtype, q.shape,
            q.device)


def cached_plan(key: tuple, k_pos: torch.Tensor, v_pos: torch.Tensor) -> Optional[ReadPlan]:
    """The plan cached under ``key`` (`args_key`) for these token maps, if any."""
    hit = _plans.get(key)
    if hit is not None and hit[0]() is k_pos and hit[1]() is v_pos:
        return hit[2]
    return None


def drop_replays() -> None:
    """Forget every plan's replay (they hold views of a workspace that is being replaced)."""
    for _, _, plan in _plans.values():
        plan.replay = None


def plan_for(k: ReadSide, v: ReadSide, q: torch.Tensor, key: tuple) -> ReadPlan:
    """The plan of reading ``k`` and ``v`` (from the cache when their stores are unchanged);
    ``key`` is `args_key` of the op's arguments."""
    kp, vp = k.store.pos_map, v.store.pos_map
    hit = cached_plan(key, kp, vp)
    if hit is not None:
        return hit
    plan = build_plan(k, v, q)
    pair = (id(kp), id(vp), k.part, v.part, k.lead, v.lead)
    previous = _latest.get(pair)
    if previous is not None and previous.gather is not None:
        # The same stores in a new state: their arrays, so the bound gather, usually carry over
        # (`read_fast.bound_gather` checks that they do).
        plan.gather, plan.sources = previous.gather, previous.sources
    _latest[pair] = plan
    _plans[key] = (weakref.ref(kp), weakref.ref(vp), plan)
    for pos_map in (kp, vp):
        if id(pos_map) not in _watched:
            # A plan's bound gather holds views of the store's arrays: drop the store's plans
            # when the store goes, so that cached plans never keep a dropped cache alive.
            _watched.add(id(pos_map))
            weakref.finalize(pos_map, _forget, id(pos_map))
    if len(_plans) > PLAN_CACHE_SIZE:
        _plans.popitem(last=False)
    return plan


_watched: set[int] = set()


# The newest plan of each pair of stores and views, whatever its state: a new state's plan
# takes its bound gather from it.
_latest: dict[tuple, ReadPlan] = {}


def _forget(pos_map_id: int) -> None:
    _watched.discard(pos_map_id)
    for key in [key for key in _plans if pos_map_id in (key[0], key[2])]:
        del _plans[key]
    for pair in [pair for pair in _latest if pos_map_id in pair[:2]]:
        del _latest[pair]


def clear_plans() -> None:
    """Forget every cached plan (they are rebuilt on the next read)."""
    _plans.clear()
    _latest.clear()
    _tables.clear()


def build_plan(k: ReadSide, v: ReadSide, q: torch.Tensor) -> ReadPlan:
    """Runs and device tables of a fast read of ``k`` and ``v``, or the reason there is none."""
    reason = _not_fast(k, v, q)
    if reason:
        return ReadPlan([], 0, 0, False, reason)
    sides = [_side_runs(side) for side in (k, v)]
    if any(runs is None for runs in sides):
        return ReadPlan([], 0, 0, False, "tokens never written (holes) in the view")
    tokens = int(piece_tokens(k.pieces))
    ks, vs = k.packed(), v.packed()
    b, h, d = ks.codes.shape[0], ks.codes.shape[1], ks.head_dim
    per_token = 2 * b * h * d * q.element_size()
    limit = workspace_limit() // per_token
    if limit < 1:
        return ReadPlan([], 0, 0, False, "the read workspace cap is below one token (QVG_READ_WORKSPACE_MB)")
    span = tokens if tokens <= limit else math.ceil(tokens / math.ceil(tokens / limit))
    blocks = []
    for lo in range(0, tokens, span):
        hi = min(tokens, lo + span)
        parts = [_clip(runs, lo, hi) for runs in sides]  # type: ignore[arg-type]
        blocks.append(Block(parts[0], parts[1], shared_table(parts[0], parts[1], ks.codes.device), hi - lo))
    use_triton = gather_supported(ks, vs, k.rows(), v.rows())
    sealed = sum(n for kind, _, _, n in sides[0] if kind == SEALED)  # type: ignore[union-attr]
    return ReadPlan(blocks, tokens, sealed, use_triton)


_tables: "OrderedDict[tuple, tuple[torch.Tensor, int]]" = OrderedDict()


def shared_table(k_runs: Sequence[Run], v_runs: Sequence[Run], device: torch.device) -> tuple[torch.Tensor, int]:
    """`block_table` of these runs, made once per distinct runs: every layer of a model reaches
    the same token state at the same step, so 29 of 30 layers find the device table of the first
    (the kernel only reads it) instead of copying their own from pinned memory."""
    key = (tuple(k_runs), tuple(v_runs), device)
    found = _tables.get(key)
    if found is None:
        found = _tables[key] = block_table(k_runs, v_runs, device)
        if len(_tables) > TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return found


def _not_fast(k: ReadSide, v: ReadSide, q: torch.Tensor) -> Optional[str]:
    fused = (torch.float16, torch.bfloat16) if q.is_cuda else (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in fused:
        return f"queries in {q.dtype} (the fused SDPA kernels take {', '.join(map(str, fused))})"
    if k.dense is not None or v.dense is not None:
        return "dense pieces appended by cat"
    if len(k.store.lead) != 2 or len(v.store.lead) != 2:
        return "a store whose leading dims are not [B, H]"
    if (k.lead[0].length, k.lead[0].tile, k.lead[1]) != (v.lead[0].length, v.lead[0].tile, v.lead[1]):
        return "keys and values repeated differently along the batch or heads"
    if not (run_pieces_only(k.pieces) and run_pieces_only(v.pieces)):
        return "dense pieces in the view"
    return None


def _side_runs(side: ReadSide) -> Optional[list[Run]]:
    """Runs of one side in view order, or None when the view holds a hole."""
    runs: list[Run] = []
    dst = 0
    p = side.pieces
    for i in range(0, len(p), PIECE_INTS):
        a, n = int(p[i + 1]), int(p[i + 2])
        if n == 0:
            continue
        # NumPy on the host token map: these passes run over the whole history (~94k tokens).
        vals = side.store.np_pos[a:a + n]
        for lo, hi, sealed in flag_runs(is_sealed(vals)):
            if sealed:
                runs.append((SEALED, a + lo, dst + lo, hi - lo))
                continue
            rows = vals[lo:hi]
            if not is_dense(rows).all():
                return None
            runs += [(ROWS, first, dst + lo + j, length) for j, first, length in runs_of(rows)]
        dst += n
    return runs


def _clip(runs: Sequence[Run], lo: int, hi: int) -> list[Run]:
    """The parts of ``runs`` whose destination falls in ``[lo, hi)``, rebased to ``lo``."""
    out = []
    for kind, src, dst, n in runs:
        a, b = max(dst, lo), min(dst + n, hi)
        if a < b:
            out.append((kind, src + a - dst, a - lo, b - a))
    return out
