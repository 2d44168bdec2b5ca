"""Fill dense K and V workspaces from a compressed history in one launch: ``gather_pair``.

A read of a `QVGCache` view is a list of *runs*, each ``(kind, src, dst, n)``: ``n`` tokens
decoded from the packed store positions ``[src, src + n)`` (kind `SEALED`) or copied from the
dense rows ``[src, src + n)`` of the store's tail (kind `ROWS`), written to rows
``[dst, dst + n)`` of the workspace. `block_table` chops the runs of K and of V into blocks of
`BLOCK_TOKENS` tokens (each run's first block, in a small device table built once); the table
depends only on the cache's token state, so the read path builds it once per state and every
later read is one launch (`gather_pair`) that only passes pointers.

Reference: `gather_reference` (PyTorch, any device, `PackedStore.dequantize` and slicing).
On CUDA the Triton kernel runs for stores it supports (`_common.triton_supports`, a K/V pair of
one layout); it reproduces the reference's fp32 arithmetic (see `decode`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..quant.packed import PackedStore
from ._common import check_store, triton_supports

SEALED, ROWS = 0, 1
# Launch settings measured by benchmarks/gather_launch.py on an H200 at 93,600 tokens (60 frames of
# Wan-1.3B): 64 tokens and 2 warps per program 383 us per K+V launch, against 445 with 4 warps;
# 32 or 128 tokens and per-group scale loads were no faster.
BLOCK_TOKENS = 64
GATHER_WARPS = 2
Run = tuple[int, int, int, int]


def block_table(k_runs: Sequence[Run], v_runs: Sequence[Run], device: torch.device,
                block: int = BLOCK_TOKENS) -> tuple[torch.Tensor, int]:
    """The kernel's form of the runs: ``([2, R, 5] int32 on device, blocks)``. Row 0 holds K's
    runs, row 1 V's (the shorter padded with empty runs), each ``(kind, src, dst, n, first)``
    where ``first`` is the run's first block of ``block`` tokens; ``blocks`` is the larger side's
    block count, the launch's grid. The table grows with the number of runs, not with the tokens."""
    sides = []
    for name, runs in (("k_runs", k_runs), ("v_runs", v_runs)):
        rows, first = [], 0
        for run in runs:
            if len(run) != 4 or run[0] not in (SEALED, ROWS) or min(run[1:]) < 0:
                raise ValueError(f"{name}: expected (kind in {{0, 1}}, src >= 0, dst >= 0, n >= 0) runs, got {run!r}")
            rows.append((*run, first))
            first += -(-run[3] // block)
        sides.append((rows, first))
    width = max(1, max(len(rows) for rows, _ in sides))
    table = torch.zeros(2, width, 5, dtype=torch.int32)
    for i, (rows, first) in enumerate(sides):
        # Padding runs start past the side's last block, so no program ever selects them.
        table[i, :, 4] = first
        if rows:
            table[i, :len(rows)] = torch.tensor(rows, dtype=torch.int32)
    blocks = max(first for _, first in sides)
    if device.type == "cuda":
        # Pinned and non-blocking: building a plan never waits for the device (the caching
        # host allocator keeps the pinned buffer until the copy has run).
        return table.pin_memory().to(device, non_blocking=True), blocks
    return table.to(device), blocks


def gather_reference(store: PackedStore, tail: torch.Tensor, runs: Sequence[Run], out: torch.Tensor) -> None:
    """PyTorch reference of one side of `gather_pair`: fill ``out`` ``[B, H, >= n, D]``."""
    for kind, src, dst, n in runs:
        if n == 0:
            continue
        x = store.dequantize(src, src + n, torch.float32) if kind == SEALED else tail[:, :, src:src + n]
        out[:, :, dst:dst + n] = x.to(out.dtype)


class Gather:
    """`gather_pair` bound to one K/V pair of stores and their dense rows: what depends only on
    the stores (the kernel's arguments, or the reference's views) is prepared once, so that a
    read that reuses the binding only launches.

    Args:
        k_store, v_store: packed tokens ``[B, H, capacity, ...]``.
        k_tail, v_tail: dense rows ``[B, H, R, D]`` of each store.
        use_triton: launch the Triton kernel (``gather_supported``) instead of the reference.
    """

    def __init__(self, k_store: PackedStore, v_store: PackedStore, k_tail: torch.Tensor, v_tail: torch.Tensor,
                 use_triton: bool) -> None:
        self.k_store, self.v_store, self.k_tail, self.v_tail = k_store, v_store, k_tail, v_tail
        self.launch = None
        if use_triton:
            from ._triton_gather import GatherLaunch

            self.launch = GatherLaunch(k_store, v_store, k_tail, v_tail, BLOCK_TOKENS, GATHER_WARPS)

    def __call__(self, k_runs: Sequence[Run], v_runs: Sequence[Run], table: tuple[torch.Tensor, int],
                 k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """Fill ``k_out``/``v_out`` ``[B, H, T, D]`` (any strides) from the runs of each side
        (``(kind, src, dst, n)``, `SEALED` or `ROWS`); ``table`` is ``block_table(k_runs, v_runs,
        device)``, the kernel's form of the runs and its grid."""
        if self.launch is not None:
            self.launch(table[0], table[1], k_out, v_out)
            return
        gather_reference(self.k_store, self.k_tail, k_runs, k_out)
        gather_reference(self.v_store, self.v_tail, v_runs, v_out)

    def prebind(self, k_runs: Sequence[Run], v_runs: Sequence[Run], table: tuple[torch.Tensor, int],
                k_out: torch.Tensor, v_out: torch.Tensor) -> Callable[[], None]:
        """This call with these arguments, as a function of no arguments: the Triton launch with
        every argument bound once (`launch.Prebound`), or the reference."""
        if self.launch is not None:
            return self.launch.prebind(table[0], table[1], k_out, v_out)
        return lambda: self(k_runs, v_runs, table, k_out, v_out)


def gather_pair(k_store: PackedStore, v_store: PackedStore, k_tail: torch.Tensor, v_tail: torch.Tensor,
                k_runs: Sequence[Run], v_runs: Sequence[Run], table: tuple[torch.Tensor, int],
                k_out: torch.Tensor, v_out: torch.Tensor, use_triton: bool) -> None:
    """One unbound `Gather`: fill ``k_out``/``v_out`` from the runs of each side."""
    Gather(k_store, v_store, k_tail, v_tail, use_triton)(k_runs, v_runs, table, k_out, v_out)


def gather_supported(k_store: PackedStore, v_store: PackedStore, k_tail: torch.Tensor, v_tail: torch.Tensor,
                     interpret: bool = False) -> bool:
    """Whether the Triton kernel takes these stores: CUDA (or ``interpret`` for the Triton
    interpreter on CPU tensors), one layout and scale format for K and V (bits and code modes may
    differ), supported bits and head dim, dense rows of the head dim."""
    kb, kh, _, d = check_store(k_store, "k_store")
    vb, vh, _, vd = check_store(v_store, "v_store")
    return ((k_store.codes.is_cuda or interpret) and triton_supports(k_store) and triton_supports(v_store)
            and (kb, kh, d) == (vb, vh, vd) and k_store.group_size == v_store.group_size
            and k_store.stages == v_store.stages
            and k_store.scales.dtype == v_store.scales.dtype
            and k_tail.shape[-1] == v_tail.shape[-1] == d)
