"""The fast read's gather kernel under each launch setting, at Wan-1.3B size (GPU).

One layer's K and V history at ``--frames`` latent frames (1,560 tokens each, 12 x 128 heads),
packed with the ``qvg`` preset's layout (2-bit codes, FP8 scales per 64 channels, one codebook of
256 centroids per 3-frame chunk, in BF16: the preset's centroids before they became FP8), decoded
into a BF16 workspace by `_gather_pair_kernel` with every combination of tokens per program and
warps, with plain or streaming (``.cs``) workspace stores (and the per-group scale loads at 64 /
2; the FP8 scales decoded by integer ops instead of the hardware's conversion at 32 / 1 and 64 /
2; one scale group of channels at a time); then the default tile with FP8 centroids, and without
its centroid lookup (not a decode: what the lookup costs). Prints
microseconds per launch (median of ``--reps`` CUDA-event timings), the HBM bandwidth that implies
(packed bytes read + workspace written), checks that every setting writes the same workspace, and
times ``zero_`` of the two workspaces: the write traffic alone, the floor of any gather. Settings run
round robin (each once per round, ``--reps`` rounds): drifts of a shared host fall on all of them.

    python benchmarks/gather_launch.py --frames 60
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import statistics
import time

import torch
from tabulate import tabulate

from qvg_compile.kernels._triton_gather import GatherLaunch
from qvg_compile.kernels.gather import SEALED, block_table
from qvg_compile.quant.packed import PackedStore

H, D, FRAME, CHUNK, C = 12, 128, 1560, 4680, 256


def random_store(n: int, gen: torch.Generator, mode: str, dev: str) -> PackedStore:
    """Random packed tokens of the preset's layout (decode time does not depend on the values)."""
    segments = -(-n // CHUNK)
    codes = torch.randint(0, 256, (1, H, n, D // 4), generator=gen, device=dev, dtype=torch.uint8)
    scales = (torch.rand(1, H, n, D // 64, generator=gen, device=dev) * 0.1).to(torch.float8_e4m3fn)
    assign = torch.randint(0, C, (1, 1, H, n), generator=gen, device=dev, dtype=torch.uint8)
    cents = torch.randn(segments, 1, 1, H, C, D, generator=gen, device=dev, dtype=torch.bfloat16)
    seg_ids = (torch.arange(n, device=dev) // CHUNK).to(torch.int32)
    return PackedStore(codes, scales, None, assign, cents, seg_ids, 2, 64, mode)


def timed(fn, dev: str) -> float:
    """Microseconds of one call: CUDA events on the GPU, the wall clock elsewhere."""
    if dev != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--device", default="cuda", help="cpu runs under TRITON_INTERPRET=1 (a smoke test)")
    args = parser.parse_args(argv)
    dev = args.device
    n = args.frames * FRAME
    gen = torch.Generator(device=dev).manual_seed(0)
    k, v = random_store(n, gen, "symmetric", dev), random_store(n, gen, "symmetric_full", dev)
    tail = torch.zeros(1, H, 1, D, device=dev, dtype=torch.bfloat16)
    runs = [(SEALED, 0, 0, n)]
    read = sum(t.numel() * t.element_size() for s in (k, v) for t in (s.codes, s.scales, s.assignments))
    written = 2 * H * n * D * 2
    rows = []
    # Each tile with the (tokens per program, warps) it is tried at.
    everywhere = list(itertools.product((32, 64, 128, 256), (1, 2, 4, 8)))
    tiles = {"2d, packed loads": (dict(), everywhere),
             "2d, a byte and a scale per channel": (dict(packed_loads=False), [(32, 1), (64, 2), (128, 4)]),
             "2d, streaming stores": (dict(stream=True), [(32, 1), (64, 2)]),
             "2d grouped": (dict(grouped=True, packed_loads=False), [(64, 2)]),
             "2d, integer FP8 decode": (dict(scale_decode=1), [(32, 1), (64, 2)]),
             "2d, one scale group at a time": (dict(by_group=True), [(32, 1), (32, 2), (64, 1), (64, 2), (64, 4),
                                                                      (128, 2), (128, 4)])}
    calls, outs = [], [torch.empty(1, H, n, D, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    ref = None
    for tile, (options, settings) in tiles.items():
        for block, warps in settings:
            launch = GatherLaunch(k, v, tail, tail, block, num_warps=warps, **options)
            table, blocks = block_table(runs, runs, torch.device(dev), block=block)
            for o in outs:
                o.fill_(float("nan"))
            launch(table, blocks, *outs)
            if ref is None:
                ref = [o.clone() for o in outs]
            same = all(torch.equal(a, b) for a, b in zip(outs, ref))
            calls.append(((tile, block, warps, same), functools.partial(launch, table, blocks, *outs)))
    # The default tile on the same tokens with FP8 centroids (`centroid_dtype="fp8_e4m3"`): half
    # the lookup's bytes; another decode, so not compared with the others.
    k8, v8 = (dataclasses.replace(s, centroids=s.centroids.to(torch.float8_e4m3fn)) for s in (k, v))
    fp8 = GatherLaunch(k8, v8, tail, tail, 64, num_warps=2)
    table, blocks = block_table(runs, runs, torch.device(dev), block=64)
    fp8(table, blocks, *outs)  # compiled here, not in the first round
    calls.append((("default, FP8 centroids", 64, 2, None), functools.partial(fp8, table, blocks, *outs)))
    # Not a gather: the default tile without the centroid lookup, i.e. what the lookup costs.
    bare = GatherLaunch(k, v, tail, tail, 64, num_warps=2)
    bare.meta["STAGES"] = 0
    bare(table, blocks, *outs)
    calls.append((("default without the centroid add (diagnostic)", 64, 2, None),
                  functools.partial(bare, table, blocks, *outs)))
    zero = (("zero_ of the workspaces", "-", "-", None), lambda: [o.zero_() for o in outs])
    calls.append(zero)
    # Round robin: every setting once per round, so the host's and the clock's drifts fall on all.
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(args.reps):
        for i, (_, call) in enumerate(calls):
            times[i].append(timed(call, dev))
    print(f"gather of K and V, {args.frames} frames ({n:,} tokens x {H} heads x {D}), "
          f"{(read + written) / 1e6:.0f} MB moved per launch, {args.reps} rounds of every setting")
    for ((tile, block, warps, same), _), t in zip(calls, times):
        us = statistics.median(t)
        moved = written if same is None else read + written
        rows.append([tile, block, warps, f"{us:.0f}", f"{min(t):.0f}-{max(t):.0f}", f"{moved / us / 1e3:.0f}",
                     "-" if same is None else ("yes" if same else "NO")])
    print(tabulate(rows, headers=["tile", "tokens/program", "warps", "us (median)", "range", "GB/s", "same output"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
