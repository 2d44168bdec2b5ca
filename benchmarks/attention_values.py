"""Does cuDNN's attention run at a speed that depends on the K/V values? One read at Wan-1.3B size (GPU).

The end-to-end benchmark found the same cuDNN kernel, at the same shapes, faster over K/V decoded
from FP8 centroids than over K/V decoded from BF16 centroids or over the BF16 model's own K/V.
This times SDPA of 4,680 queries over ``--frames`` x 1,560 keys (12 x 128 heads, BF16, the
read's shapes) with the same queries and K/V of different values:

- ``randn``: Gaussian K/V, what the random-weight model writes;
- ``randn in FP8``: the same values rounded to E4M3 and back (3 mantissa bits);
- ``QVG, FP8 centroids`` / ``QVG, BF16 centroids``: the Gaussian K/V quantized chunk by chunk
  (4,680 tokens) with the ``qvg`` preset and its published BF16-centroid configuration, and
  decoded (what a fast read's workspace holds);
- ``zeros``: no bit toggles at all (the low end).

Variants run round robin (``--reps`` rounds of ``--calls`` back-to-back calls each, timed by
CUDA events). While a variant's calls run, ``nvidia-smi`` is sampled once for the SM clock and the
board power (when it is there), so a speed difference can be told apart as the clock moving under
the power cap or as something else. Prints each variant's K and V rel-MSE against ``randn``, ms
per call (median and range over the rounds), the clock and power samples, and its time against
``randn``.

    python benchmarks/attention_values.py --frames 60
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tabulate import tabulate

from qvg_compile.quant import QVGConfig, quantize, rel_mse

H, D, FRAME, CHUNK = 12, 128, 1560, 4680


def decoded(x: torch.Tensor, config: QVGConfig, role: str) -> torch.Tensor:
    """``x`` ``[1, H, N, D]`` quantized in chunks of ``CHUNK`` tokens with ``config`` and decoded
    (BF16, same shape)."""
    parts = [quantize(x[:, :, a:a + CHUNK], config, role=role).dequantize().to(x.dtype)
             for a in range(0, x.shape[2], CHUNK)]
    return torch.cat(parts, dim=2)


def variants(k: torch.Tensor, v: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The K/V pairs the benchmark attends over, from Gaussian ``k``, ``v`` ``[1, H, N, D]`` bf16."""
    fp8 = QVGConfig.preset("qvg")
    bf16 = fp8.replace(centroid_dtype="bf16")
    return {
        "randn": (k, v),
        "randn in FP8": (k.to(torch.float8_e4m3fn).to(k.dtype), v.to(torch.float8_e4m3fn).to(v.dtype)),
        "QVG, FP8 centroids": (decoded(k, fp8, "key"), decoded(v, fp8, "value")),
        "QVG, BF16 centroids": (decoded(k, bf16, "key"), decoded(v, bf16, "value")),
        "zeros": (torch.zeros_like(k), torch.zeros_like(v)),
    }


def gpu_sample() -> Optional[tuple[float, float]]:
    """(SM clock MHz, board power W) from ``nvidia-smi``, or None where it is missing."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10)
    try:
        clock, power = (float(f) for f in out.stdout.splitlines()[0].split(","))
    except (IndexError, ValueError):
        return None
    return clock, power


def timed_calls(fn: Callable[[], torch.Tensor], calls: int, cuda: bool) -> tuple[float, Optional[tuple[float, float]]]:
    """Milliseconds per call over ``calls`` back-to-back calls, and a clock/power sample taken
    while they run (on the GPU)."""
    if not cuda:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) * 1e3 / calls, None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    sample = gpu_sample()
    end.synchronize()
    return start.elapsed_time(end) / calls, sample


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60, help="latent frames of keys (1,560 tokens each)")
    parser.add_argument("--queries", type=int, default=CHUNK)
    parser.add_argument("--calls", type=int, default=100, help="back-to-back SDPA calls per variant and round")
    parser.add_argument("--reps", type=int, default=5, help="rounds; every variant runs once per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in ("frames", "queries", "calls", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    n = args.frames * FRAME
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, H, args.queries, D, generator=gen, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, H, n, D, generator=gen, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, H, n, D, generator=gen, device=dev, dtype=torch.bfloat16)
    pairs = variants(k, v)
    ms: dict[str, list[float]] = {name: [] for name in pairs}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pairs}
    # One untimed call each: cuDNN builds its plan for these shapes at the first.
    for kk, vv in pairs.values():
        F.scaled_dot_product_attention(q, kk, vv)
    for _ in range(args.reps):
        for name, (kk, vv) in pairs.items():
            t, sample = timed_calls(lambda: F.scaled_dot_product_attention(q, kk, vv), args.calls, cuda)
            ms[name].append(t)
            if sample is not None:
                samples[name].append(sample)
    base = statistics.median(ms["randn"])
    rows = []
    for name in pairs:
        med = statistics.median(ms[name])
        clock = "/".join(f"{c:.0f}" for c, _ in samples[name]) or "-"
        power = "/".join(f"{p:.0f}" for _, p in samples[name]) or "-"
        kk, vv = pairs[name]
        err = f"{rel_mse(k, kk):.4f} / {rel_mse(v, vv):.4f}"
        rows.append([name, err, f"{med:.3f}", f"{min(ms[name]):.3f}-{max(ms[name]):.3f}",
                     f"{(med / base - 1) * 100:+.1f}", clock, power])
    print(f"SDPA {args.queries} queries x {n} keys, {H} x {D} heads, bf16, {dev}; "
          f"{args.reps} rounds of {args.calls} calls per variant")
    headers = ["K/V values", "K / V rel-MSE to randn", "ms per call (median)", "range", "against randn %",
               "SM clock MHz (per round)", "power W (per round)"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
