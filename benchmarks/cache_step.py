"""One Self-Forcing layer step on `QVGCache` vs dense BF16: write a chunk, attend over the prefix.

K/V caches ``[1, N, 12, 128]`` bf16 with chunks of 4,680 tokens (3 latent frames of Wan 1.3B);
each chunk is written 5 times (4 denoising steps + 1 clean pass) and every write is followed by
SDPA of the chunk's 4,680 queries over the prefix. The first write of a chunk seals the chunk
before it (K and V each), the four after it rewrite the open rows. Prints, at the last chunk, the
median time of the four rewriting steps and the time of the sealing step for eager and compiled
(`torch.compile(fullgraph=True)`) code next to the same step on dense tensors; then, from
`torch.profiler` over the compiled steps of one whole chunk, the host time of each cache op kind
(read, non-sealing write, sealing write: the op's CPU time) and the device launches each issues,
and whether a rewriting step passes under ``torch.cuda.set_sync_debug_mode("error")``. With
``--profile``, the host time of 10 compiled QVG steps by Python function (cProfile); with
``--plan-cost``, a rewriting step with its read plan cached against one that builds it; with
``--guard-ab N``, the compiled sealing step with the codebook-fit guard (the default
``share_fit``) against the same step without it, interleaved, N repeats; with ``--seal-kernels``,
the device time of every kernel a sealing step launches (where a seal's encode time goes); with
``--seal-host``, the host time of each step of a compiled sealing write (wall clock); with
``--read-host``, the same for the steps of a compiled replayed read, next to the host time of the
compiled dense step and of bare cuDNN / flash SDPA calls at the read's shapes; with
``--write-host``, the host time of a compiled step that only rewrites K and V: QVG through the ``qvg``
backend (caches passed as their inner tensors), QVG through plain Inductor (AOTAutograd unwraps
them), and dense; with
``--trace DIR``, a torch.profiler table and Chrome trace of one compiled chunk in DIR.

    python benchmarks/cache_step.py --frames 21        # GPU
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from tabulate import tabulate

import qvg_compile
from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache.policy import CachePolicy
from qvg_compile.cache import encode as cache_encode
from qvg_compile.cache import ops as cache_ops
from qvg_compile.cache import read as cache_read
from qvg_compile.cache import read_fast
from qvg_compile.cache import read_plan
from qvg_compile.cache.read_fast import BoundRead
from qvg_compile.cache.read_plan import clear_plans
from qvg_compile.cache.seal_flags import SealFlags
from qvg_compile.cache.store import Store
from qvg_compile.kernels.launch import Prebound

H, D, CHUNK = 12, 128, 4680


def step(kb, vb, q, k, v, s: int, e: int):
    kb[:, s:e] = k
    vb[:, s:e] = v
    return F.scaled_dot_product_attention(q, kb[:, :e].transpose(1, 2), vb[:, :e].transpose(1, 2))


def timed_steps(fn, kb, vb, chunks: int, device: str, seed: int = 0, steps: int = 5) -> list[list[float]]:
    """Seconds of each of ``steps`` steps per chunk, for every chunk; the first step of a chunk
    seals the chunk before."""
    gen = torch.Generator(device=device).manual_seed(seed)
    times = []
    for c in range(chunks):
        times.append([])
        for _ in range(steps):
            q = torch.randn(1, H, CHUNK, D, device=device, dtype=torch.bfloat16, generator=gen)
            k = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16, generator=gen)
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn(kb, vb, q, k, k, c * CHUNK, (c + 1) * CHUNK)
            torch.cuda.synchronize()
            times[-1].append(time.perf_counter() - t)
    return times


def run(fn, make, chunks: int, device: str) -> list[float]:
    """Seconds of each of the 5 steps of the last chunk (earlier chunks only fill the cache); the
    first of them seals the chunk before."""
    return timed_steps(fn, make("key"), make("value"), chunks, device)[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-seal", action="store_true",
                        help="cProfile the sealing steps of 6 compiled chunks (where a seal's host time goes)")
    parser.add_argument("--plan-cost", action="store_true",
                        help="host time of a rewriting step whose read builds its plan vs one that reuses it")
    parser.add_argument("--guard-ab", type=int, default=0, metavar="N",
                        help="sealing step with and without the codebook-fit guard, interleaved, N repeats")
    parser.add_argument("--trace", metavar="DIR", help="write a torch.profiler trace of 5 compiled QVG steps here")
    parser.add_argument("--seal-host", action="store_true",
                        help="host microseconds of each step of a compiled sealing write, wall clock (no profiler)")
    parser.add_argument("--read-host", action="store_true",
                        help="host microseconds of each step of a compiled replayed read, wall clock (no profiler)")
    parser.add_argument("--write-host", action="store_true",
                        help="host microseconds of a compiled step that only rewrites K and V, QVG against dense")
    parser.add_argument("--seal-kernels", action="store_true",
                        help="device time of the kernels the sealing steps of the last 4 chunks launch (torch.profiler)")
    args = parser.parse_args(argv)
    device = "cuda"
    n = args.frames * 1560
    chunks = n // CHUNK

    def qvg(role):
        return QVGCache.empty((1, n, H, D), 1, QVGConfig.preset("qvg"), role=role, dtype=torch.bfloat16,
                              device=device, chunk_tokens=CHUNK)

    def dense(role):
        return torch.zeros(1, n, H, D, dtype=torch.bfloat16, device=device)

    rows = []
    compiled = torch.compile(step, fullgraph=True)
    for name, fn, make in (("dense eager", step, dense), ("QVG eager", step, qvg), ("QVG compiled", compiled, qvg)):
        t = run(fn, make, chunks, device)
        rows.append([name, f"{statistics.median(t[1:]) * 1e3:.2f}", f"{t[0] * 1e3:.2f}"])
    print(tabulate(rows, headers=["cache", "rewriting step ms (median of 4)", "sealing step ms"], tablefmt="github"))
    print()
    print(host_table(compiled, qvg, chunks, device))
    print()
    print(f"rewriting step under set_sync_debug_mode('error'): {sync_free(compiled, qvg, chunks, device)}")
    if args.profile:
        # Host time of the compiled QVG step by Python function: the cache's bookkeeping runs on
        # the host, so this is where the time over the dense step goes.
        kb, vb = qvg("key"), qvg("value")
        run(compiled, lambda r: kb if r == "key" else vb, chunks, device)
        q = torch.randn(1, H, CHUNK, D, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16)
        s = (chunks - 1) * CHUNK
        compiled(kb, vb, q, k, k, s, s + CHUNK)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(10):
            compiled(kb, vb, q, k, k, s, s + CHUNK)
        torch.cuda.synchronize()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    if args.trace:
        trace(compiled, qvg, chunks, device, args.trace)
    if args.profile_seal:
        profile_seals(compiled, qvg, chunks, device)
    if args.seal_host:
        step_host(compiled, qvg, chunks, device, SEAL_STEPS, sealing=True)
    if args.read_host:
        step_host(compiled, qvg, chunks, device, READ_STEPS, sealing=False)
        print()
        print(rewrite_host(compiled, qvg, dense, chunks, device))
        print()
        print(sdpa_host(n, device))
    if args.write_host:
        print(write_host(qvg, dense, chunks, device))
    if args.seal_kernels:
        seal_kernels(compiled, qvg, chunks, device)
    if args.plan_cost:
        plan_cost(compiled, qvg, chunks, device)
    if args.guard_ab:
        guard_ab(compiled, n, chunks, device, args.guard_ab)
    return 0


LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaMemcpyAsync",
            "cudaMemsetAsync")


def chunk_events(compiled, make, chunks: int, device: str):
    """Profiler events of the 5 compiled steps of one chunk (after ``chunks - 1`` filled ones)."""

    kb, vb = make("key"), make("value")
    run(compiled, lambda r: kb if r == "key" else vb, chunks - 1, device)
    gen = torch.Generator(device=device).manual_seed(1)
    s = (chunks - 1) * CHUNK
    inputs = [(torch.randn(1, H, CHUNK, D, device=device, dtype=torch.bfloat16, generator=gen),
               torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16, generator=gen)) for _ in range(5)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for q, k in inputs:
            compiled(kb, vb, q, k, k, s, s + CHUNK)
        torch.cuda.synchronize()
    return prof


def host_table(compiled, make, chunks: int, device: str) -> str:
    """Host microseconds and launches per cache op kind over one compiled chunk (profiler)."""
    events = list(chunk_events(compiled, make, chunks, device).events())
    launches = sorted(e.time_range.start for e in events if e.name in LAUNCHES)
    ops = sorted((e for e in events if e.name in ("qvg::cache_attention", "qvg::cache_write")),
                 key=lambda e: e.time_range.start)
    kinds: dict[str, list[tuple[float, int]]] = {"read": [], "sealing write": [], "non-sealing write": []}
    writes = 0
    for e in ops:
        inside = sum(1 for t in launches if e.time_range.start <= t <= e.time_range.end)
        if e.name == "qvg::cache_attention":
            kind = "read"
        else:
            kind = "sealing write" if writes < 2 else "non-sealing write"  # the chunk's first K and V writes
            writes += 1
        kinds[kind].append((e.cpu_time_total, inside))
    rows = [[kind, len(v), f"{statistics.median(t for t, _ in v):.0f}", f"{min(t for t, _ in v):.0f}-{max(t for t, _ in v):.0f}",
             f"{statistics.median(n for _, n in v):.0f}"] for kind, v in kinds.items() if v]
    return tabulate(rows, headers=["cache op (compiled, one chunk)", "calls", "host us (median)", "host us (range)",
                                   "launches (median)"], tablefmt="github")


def profile_seals(compiled, make, chunks: int, device: str) -> None:
    """cProfile of the sealing step (first write of a chunk) of the last 6 chunks, compiled."""
    kb, vb = make("key"), make("value")
    gen = torch.Generator(device=device).manual_seed(2)
    profiler = cProfile.Profile()
    for c in range(chunks):
        q = torch.randn(1, H, CHUNK, D, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16, generator=gen)
        torch.cuda.synchronize()
        if c >= chunks - 6:
            profiler.enable()
        compiled(kb, vb, q, k, k, c * CHUNK, (c + 1) * CHUNK)
        torch.cuda.synchronize()
        profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumtime").print_stats(45)


SEAL_STEPS = (
    (Store, "write"), (Store, "_write_rows"), (Store, "_take_slot"), (Store, "_seal_slots"), (Store, "_rows"),
    (Store, "_store_segment"), (Store, "_choose_codebook"), (Store, "_encode_parts"), (Store, "release"),
    (cache_encode, "encode_replayed"), (torch.cuda.CUDAGraph, "replay"), (SealFlags, "check"), (SealFlags, "add"),
    (cache_ops, "attend"), (cache_read, "plan_for"), (read_plan, "build_plan"), (BoundRead, "__init__"),
    (Prebound, "__call__"), (read_fast, "sdpa_with_lse"), (read_fast, "sdpa_fused"),
)


READ_STEPS = (
    (cache_ops, "args_key"), (cache_ops, "replay"), (read_fast, "cached_plan"), (BoundRead, "valid"),
    (BoundRead, "__call__"), (Prebound, "__call__"), (read_fast, "sdpa_with_lse"), (read_fast, "sdpa_fused"),
)


def step_host(compiled, make, chunks: int, device: str, steps, sealing: bool) -> None:
    """Wall-clock host microseconds per call of the ``steps`` (``(owner, name)`` pairs, inclusive)
    over the compiled sealing steps (``sealing``) or the rewriting steps of every chunk after the
    second, without a profiler: each step is wrapped by a timer (~1 us of its own per call)."""
    spent: dict[str, list[float]] = {}
    counting = [False]

    def timed(owner, name):
        fn = getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}"

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if counting[0]:
                    spent.setdefault(label, []).append(time.perf_counter() - t)
        return fn, wrapper

    originals = []
    for owner, name in steps:
        fn, wrapper = timed(owner, name)
        originals.append((owner, name, fn))
        setattr(owner, name, wrapper)
    kb, vb = make("key"), make("value")
    gen = torch.Generator(device=device).manual_seed(4)
    total = []
    try:
        for c in range(chunks):
            for i in range(5):
                q = torch.randn(1, H, CHUNK, D, device=device, dtype=torch.bfloat16, generator=gen)
                k = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16, generator=gen)
                torch.cuda.synchronize()
                counting[0] = c >= 2 and (i == 0) == sealing
                t = time.perf_counter()
                compiled(kb, vb, q, k, k, c * CHUNK, (c + 1) * CHUNK)
                if counting[0]:
                    total.append(time.perf_counter() - t)
                torch.cuda.synchronize()
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    n = len(total)
    kind = "sealing" if sealing else "rewriting"
    rows = [[label, f"{len(t) / n:.1f}", f"{statistics.median(t) * 1e6:.0f}", f"{sum(t) / n * 1e6:.0f}"]
            for label, t in spent.items() if t]
    print(f"{n} compiled {kind} steps, host to return {statistics.median(total) * 1e3:.2f} ms (median):")
    print(tabulate(rows, headers=["step (inclusive)", f"calls per {kind} step", "us per call (median)",
                                  f"us per {kind} step"], tablefmt="github"))


def rewrite_host(compiled, make_qvg, make_dense, chunks: int, device: str, reps: int = 20) -> str:
    """Host microseconds from call to return of the compiled rewriting step (the last chunk's
    rows rewritten, then the read), on QVG caches and on dense tensors, interleaved."""
    caches = {name: (make("key"), make("value")) for name, make in (("QVG", make_qvg), ("dense", make_dense))}
    for kb, vb in caches.values():
        run(compiled, lambda r, kb=kb, vb=vb: kb if r == "key" else vb, chunks, device)
    q = torch.randn(1, H, CHUNK, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16)
    s = (chunks - 1) * CHUNK
    return call_table("compiled rewriting step", interleaved_host(
        {name: functools.partial(compiled, kb, vb, q, k, k, s, s + CHUNK) for name, (kb, vb) in caches.items()},
        reps))


def interleaved_host(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds from call to return of each entry of ``calls``, ``reps`` rounds with the entries
    interleaved, the device drained before each call."""
    spent: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            call()
            spent[name].append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return spent


def call_table(label: str, spent: dict[str, list[float]]) -> str:
    """`interleaved_host`'s times as a table of microseconds (median, range) per entry."""
    rows = [[f"{label}, {name}", f"{statistics.median(t) * 1e6:.1f}", f"{min(t) * 1e6:.0f}-{max(t) * 1e6:.0f}"]
            for name, t in spent.items()]
    return tabulate(rows, headers=["host to return", "us (median)", "range"], tablefmt="github")


def write_step(kb, vb, k, v, s: int, e: int) -> None:
    kb[:, s:e] = k
    vb[:, s:e] = v


def write_host(make_qvg, make_dense, chunks: int, device: str, reps: int = 200) -> str:
    """Host microseconds from call to return of a compiled step that only rewrites the last
    chunk's K and V rows (no read), interleaved: on QVG caches compiled by the ``qvg`` backend
    (which hands Inductor the caches' inner tensors, `passes.flat_inputs`), on QVG caches compiled
    by plain Inductor (AOTAutograd unwraps each cache at every call), and on dense tensors. What a
    compiled call with two cache inputs costs over the same call on dense tensors: Dynamo's
    guards, the unwrapping, Inductor's input checks, the two ``qvg::cache_write`` calls."""
    variants = {"QVG, qvg backend (inner tensors)": (qvg_compile.backend(), make_qvg),
                "QVG, Inductor (AOTAutograd unwraps)": ("inductor", make_qvg),
                "dense": ("inductor", make_dense)}
    k = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16)
    s = (chunks - 1) * CHUNK
    calls, inner = {}, 0
    for name, (backend, make) in variants.items():
        compiled = torch.compile(write_step, fullgraph=True, backend=backend)
        kb, vb = make("key"), make("value")
        for c in range(chunks):
            for _ in range(2):  # the second write of a chunk is a rewrite, as in the denoising passes
                compiled(kb, vb, k, k, c * CHUNK, (c + 1) * CHUNK)
        calls[name] = functools.partial(compiled, kb, vb, k, k, s, s + CHUNK)
        if isinstance(kb, QVGCache):
            inner = len(kb.__tensor_flatten__()[0])
    return (call_table("compiled K+V rewrite", interleaved_host(calls, reps))
            + f"\n(each QVG cache flattens into {inner} inner tensors)")


def sdpa_host(n: int, device: str, reps: int = 20) -> str:
    """Host microseconds per bare ATen SDPA call (cuDNN, flash) at a read's shapes: the chunk's
    queries ``[1, H, CHUNK, D]`` over ``[1, H, n, D]`` keys and values, launches not waited for."""
    q = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16).transpose(1, 2)
    kv = torch.randn(2, 1, H, n, D, device=device, dtype=torch.bfloat16)
    calls = {
        "cuDNN": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, kv[0], kv[1], None, True, 0.0, False,
                                                                            False, scale=None),
        "cuDNN, no lse, overload": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention.default(
            q, kv[0], kv[1], None, False, 0.0, False, False, scale=None),
        "flash": lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, kv[0], kv[1], 0.0, False, False),
    }
    rows = []
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        rows.append([f"bare {name} SDPA", f"{statistics.median(times) * 1e6:.0f}",
                     f"{min(times) * 1e6:.0f}-{max(times) * 1e6:.0f}"])
    return tabulate(rows, headers=["host per call", "us (median)", "range"], tablefmt="github")


def seal_kernels(compiled, make, chunks: int, device: str, last: int = 4) -> None:
    """Device time by kernel of the compiled sealing steps (first write of a chunk: the K and V
    encodes replayed from their CUDA graphs, the copies out, the read) of the last ``last``
    chunks, then of ``last`` rewriting steps of the final chunk, from torch.profiler."""

    kb, vb = make("key"), make("value")
    gen = torch.Generator(device=device).manual_seed(3)
    run(compiled, lambda r: kb if r == "key" else vb, chunks - last, device)
    q = torch.randn(1, H, CHUNK, D, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16, generator=gen)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as sealing:
        for c in range(chunks - last, chunks):
            compiled(kb, vb, q, k, k, c * CHUNK, (c + 1) * CHUNK)
        torch.cuda.synchronize()
    s = (chunks - 1) * CHUNK
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as rewriting:
        for _ in range(last):
            compiled(kb, vb, q, k, k, s, s + CHUNK)
        torch.cuda.synchronize()
    for name, prof in (("sealing", sealing), ("rewriting", rewriting)):
        print(f"{last} {name} steps, by device time:")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25))


def plan_cost(compiled, make, chunks: int, device: str, reps: int = 20) -> None:
    """Wall time of a compiled rewriting step with its read plan cached and with the plan cache
    cleared first (the cost the first read after a seal pays), then cProfile of the latter."""
    kb, vb = make("key"), make("value")
    run(compiled, lambda r: kb if r == "key" else vb, chunks, device)
    q = torch.randn(1, H, CHUNK, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16)
    s = (chunks - 1) * CHUNK

    def timed(clear: bool) -> float:
        if clear:
            clear_plans()
        torch.cuda.synchronize()
        t = time.perf_counter()
        compiled(kb, vb, q, k, k, s, s + CHUNK)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    cached = [timed(False) for _ in range(reps)]
    built = [timed(True) for _ in range(reps)]
    print(f"rewriting step ms, plan cached: {statistics.median(cached):.2f} ({min(cached):.2f}-{max(cached):.2f}); "
          f"plan built: {statistics.median(built):.2f} ({min(built):.2f}-{max(built):.2f})")
    profiler = cProfile.Profile()
    for _ in range(reps):
        clear_plans()
        torch.cuda.synchronize()
        profiler.enable()
        compiled(kb, vb, q, k, k, s, s + CHUNK)
        torch.cuda.synchronize()
        profiler.disable()
    pstats.Stats(profiler).sort_stats("cumtime").print_stats(40)


def guard_ab(compiled, n: int, chunks: int, device: str, reps: int) -> None:
    """Median compiled sealing step over the last half of the chunks, with the default codebook-fit
    guard and with ``share_fit=None``, the two runs interleaved ``reps`` times."""
    rows = []
    for rep in range(reps):
        for name, fit in (("guard (default)", CachePolicy().share_fit), ("no guard", None)):
            kb, vb = (QVGCache.empty((1, n, H, D), 1, QVGConfig.preset("qvg"), role=role, dtype=torch.bfloat16,
                                     device=device, chunk_tokens=CHUNK, share_fit=fit) for role in ("key", "value"))
            times = timed_steps(compiled, kb, vb, chunks, device, seed=rep, steps=1)
            seals = [chunk[0] * 1e3 for chunk in times[chunks // 2:]]
            rows.append([rep, name, f"{statistics.median(seals):.2f}", f"{min(seals):.2f}-{max(seals):.2f}"])
    print(tabulate(rows, headers=["repeat", "cache", "sealing step ms (median)", "range"], tablefmt="github"))


def sync_free(compiled, make, chunks: int, device: str) -> str:
    """Whether a rewriting step (non-sealing write + read) runs without a host sync."""
    kb, vb = make("key"), make("value")
    run(compiled, lambda r: kb if r == "key" else vb, chunks, device)
    q = torch.randn(1, H, CHUNK, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16)
    s = (chunks - 1) * CHUNK
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compiled(kb, vb, q, k, k, s, s + CHUNK)
        return "no sync"
    except RuntimeError as err:
        return f"synchronizes ({str(err).splitlines()[0]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def trace(compiled, make, chunks: int, device: str, out_dir: str) -> None:
    """Profile 5 compiled steps of the last chunk: where the host waits for the device shows up as
    cudaStreamSynchronize / cudaMemcpy rows, host-only bookkeeping as CPU time with no kernel."""

    kb, vb = make("key"), make("value")
    run(compiled, lambda r: kb if r == "key" else vb, chunks, device)
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(1, H, CHUNK, D, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16, generator=gen)
    s = (chunks - 1) * CHUNK
    compiled(kb, vb, q, k, k, s, s + CHUNK)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            compiled(kb, vb, q, k, k, s, s + CHUNK)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=30))
    print(averages.table(sort_by="self_device_time_total", row_limit=15))
    prof.export_chrome_trace(f"{out_dir}/cache_step_trace.json")


if __name__ == "__main__":
    raise SystemExit(main())
