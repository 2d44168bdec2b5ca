"""Can a read's gather hide under its own attention? One fast read at Wan-1.3B size (GPU).

A fast read decodes the sealed K/V history into a BF16 workspace (the gather, memory-bound) and
runs cuDNN attention over it (compute-bound); today one after the other on one stream. This
times, per read (CUDA events around the whole read, ``--reps`` rounds, every variant once per
round):

- ``1 block``: the read as it is: one gather of the whole history, one SDPA.
- ``N blocks, one stream``: the history in N blocks, each gathered then attended, the partial
  outputs merged by log-sum-exp (what a capped workspace does today).
- ``N blocks, two streams``: the same, with block i+1's gather launched on a side stream while
  block i's attention runs (two workspaces of 1/N of the history, used in turn; events order a
  gather after the attention that last read its buffer, and an attention after its gather).
- ``SDPA alone`` and ``gather alone``: the parts, for the floor.

Every variant's output is compared with ``1 block`` (max abs difference). The workspace each
variant holds is printed: two blocks of 1/N of the history against one of all of it.

    python benchmarks/read_overlap.py --frames 60
"""

from __future__ import annotations

import argparse
import statistics

import torch
from tabulate import tabulate

from qvg_compile.kernels._triton_gather import GatherLaunch
from qvg_compile.kernels.attention import merge_partial, sdpa_with_lse
from qvg_compile.kernels.gather import BLOCK_TOKENS, GATHER_WARPS, SEALED, block_table

from gather_launch import CHUNK, D, FRAME, H, random_store, timed


def blocks_of(n: int, count: int) -> list[tuple[int, int]]:
    """``count`` consecutive token ranges covering ``[0, n)``, multiples of a chunk but the last."""
    step = -(-n // count // CHUNK) * CHUNK
    return [(a, min(n, a + step)) for a in range(0, n, step)]


class SplitRead:
    """One read of ``n`` sealed tokens in the given blocks, on one stream or with the gathers on a
    side stream (two workspaces in turn)."""

    def __init__(self, k, v, tail, q, n: int, blocks: list[tuple[int, int]], overlap: bool) -> None:
        self.q, self.overlap = q, overlap
        size = max(b - a for a, b in blocks)
        bufs = 2 if overlap and len(blocks) > 1 else 1
        self.work = [torch.empty(2, 1, H, size, D, device=q.device, dtype=torch.bfloat16) for _ in range(bufs)]
        launch = GatherLaunch(k, v, tail, tail, BLOCK_TOKENS, GATHER_WARPS)
        self.steps = []
        for i, (a, b) in enumerate(blocks):
            runs = [(SEALED, a, 0, b - a)]
            table = block_table(runs, runs, q.device)
            w = self.work[i % bufs]
            self.steps.append((launch.prebind(*table, w[0], w[1]), w[0][:, :, :b - a], w[1][:, :, :b - a]))
        self.side = torch.cuda.Stream(q.device)
        self.freed = [None] * bufs

    def workspace_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.work)

    def __call__(self) -> torch.Tensor:
        main = torch.cuda.current_stream()
        acc = lse = out = None
        gathered = []
        if self.overlap:
            # Gathers run ahead on the side stream, at most one block ahead of the attention.
            self._gather(0, main, gathered)
        for i, (launch, wk, wv) in enumerate(self.steps):
            if self.overlap:
                if i + 1 < len(self.steps):
                    self._gather(i + 1, main, gathered)
                main.wait_event(gathered[i])
            else:
                launch()
            o, l = sdpa_with_lse(self.q, wk, wv, D ** -0.5)
            if self.overlap:
                done = torch.cuda.Event()
                done.record(main)
                self.freed[i % len(self.work)] = done
            if len(self.steps) == 1:
                out = o
            elif acc is None:
                acc, lse = o.float().contiguous(), l.float().contiguous()
            else:
                merge_partial(acc, lse, o, l)
        return out if out is not None else acc.to(self.q.dtype)

    def _gather(self, i: int, main: torch.cuda.Stream, gathered: list) -> None:
        buf = i % len(self.work)
        with torch.cuda.stream(self.side):
            self.side.wait_stream(main) if self.freed[buf] is None else self.side.wait_event(self.freed[buf])
            self.steps[i][0]()
            ev = torch.cuda.Event()
            ev.record(self.side)
        gathered.append(ev)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--splits", default="2,4,8")
    args = parser.parse_args(argv)
    dev = "cuda"
    n = args.frames * FRAME
    gen = torch.Generator(device=dev).manual_seed(0)
    k, v = random_store(n, gen, "symmetric", dev), random_store(n, gen, "symmetric_full", dev)
    tail = torch.zeros(1, H, 1, D, device=dev, dtype=torch.bfloat16)
    q = torch.randn(1, H, CHUNK, D, device=dev, dtype=torch.bfloat16, generator=gen)
    variants = {"1 block": SplitRead(k, v, tail, q, n, [(0, n)], False)}
    for s in (int(x) for x in args.splits.split(",")):
        blocks = blocks_of(n, s)
        variants[f"{len(blocks)} blocks, one stream"] = SplitRead(k, v, tail, q, n, blocks, False)
        variants[f"{len(blocks)} blocks, two streams"] = SplitRead(k, v, tail, q, n, blocks, True)
    whole = variants["1 block"]
    launch, wk, wv = whole.steps[0]
    parts = {"gather alone": launch, "SDPA alone": lambda: sdpa_with_lse(q, wk, wv, D ** -0.5)}
    ref = whole().float()
    diffs = {name: float((fn().float() - ref).abs().max()) for name, fn in variants.items()}
    calls = {**variants, **parts}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.reps):
        for name, fn in calls.items():
            times[name].append(timed(fn, dev))
    rows = []
    for name, t in times.items():
        held = variants[name].workspace_bytes() / 1e9 if name in variants else float("nan")
        rows.append([name, f"{statistics.median(t):.0f}", f"{min(t):.0f}-{max(t):.0f}",
                     f"{held:.3f}" if name in variants else "-", f"{diffs[name]:.1e}" if name in diffs else "-"])
    print(f"one read: {CHUNK} queries over {n:,} sealed tokens x {H} heads x {D} (K and V), "
          f"{args.reps} rounds of every variant")
    print(tabulate(rows, headers=["variant", "us per read (median)", "range", "workspace GB", "max |diff|"],
                   tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
