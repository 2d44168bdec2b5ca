"""One Self-Forcing layer step on `QVGCache` vs dense BF16: write a chunk, attend over the prefix.

K/V caches ``[1, N, 12, 128]`` bf16 with chunks of 4,680 tokens (3 latent frames of Wan 1.3B);
each chunk is written 5 times (4 denoising steps + 1 clean pass) and every write is followed by
SDPA of the chunk's 4,680 queries over the prefix. Prints per-step medians at the last chunk for
eager and compiled (`torch.compile(fullgraph=True)`) code, next to the same step on dense
tensors; with ``--profile``, the host time of 10 compiled QVG steps by Python function (cProfile);
with ``--trace DIR``, a torch.profiler table of 5 compiled QVG steps (host ops, device kernels,
synchronisations) and its Chrome trace in DIR.

    python benchmarks/cache_step.py --frames 21        # GPU
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from qvg_compile import QVGCache, QVGConfig

H, D, CHUNK = 12, 128, 4680


def step(kb, vb, q, k, v, s: int, e: int):
    kb[:, s:e] = k
    vb[:, s:e] = v
    return F.scaled_dot_product_attention(q, kb[:, :e].transpose(1, 2), vb[:, :e].transpose(1, 2))


def run(fn, make, chunks: int, device: str) -> list[float]:
    """Seconds of each of the 5 steps of the last chunk (earlier chunks only fill the cache)."""
    kb, vb = make("key"), make("value")
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for c in range(chunks):
        for _ in range(5):
            q = torch.randn(1, H, CHUNK, D, device=device, dtype=torch.bfloat16, generator=gen)
            k = torch.randn(1, CHUNK, H, D, device=device, dtype=torch.bfloat16, generator=gen)
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn(kb, vb, q, k, k, c * CHUNK, (c + 1) * CHUNK)
            torch.cuda.synchronize()
            if c == chunks - 1:
                times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--trace", metavar="DIR", help="write a torch.profiler trace of 5 compiled QVG steps here")
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
        rows.append([name, f"{statistics.median(t[:4]) * 1e3:.2f}", f"{t[4] * 1e3:.2f}"])
    print(tabulate(rows, headers=["cache", "denoise step ms (median)", "step that seals ms"], tablefmt="github"))
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
    return 0


def trace(compiled, make, chunks: int, device: str, out_dir: str) -> None:
    """Profile 5 compiled steps of the last chunk: where the host waits for the device shows up as
    cudaStreamSynchronize / cudaMemcpy rows, host-only bookkeeping as CPU time with no kernel."""
    from torch.profiler import ProfilerActivity, profile

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
