"""Time the QVG kernels on one GPU next to BF16 SDPA and the counted floors; one table last.

    python benchmarks/kernels.py --out $OUT            # the full matrix of the issue
    python benchmarks/kernels.py --smoke --out $OUT    # one shape per kernel

Every time is a `triton.testing.do_bench` median (ms). Floors: FLOPs over the measured BF16
matmul rate, bytes (each input read once, each output written once) over the measured
device-to-device copy rate (read + write counted). Each kernel is checked against the PyTorch
reference on the same GPU before it is timed. Logs (JSON lines) go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from qvg_compile import QVGConfig
from qvg_compile.kernels import _triton_encode as tk
from qvg_compile.kernels import attention as attn_mod
from qvg_compile.kernels._triton_attention import attend_fused
from qvg_compile.kernels._triton_decode import decode_into, decode_pair_into
from qvg_compile.kernels._triton_encode import quantize
from qvg_compile.kernels.encode import encode_qvg as encode_fast
from qvg_compile.kernels.encode import encode_qvg_pair, triton_encode_many
from qvg_compile.quant.group import group_quantize
from qvg_compile.quant.packed import PackedStore
from qvg_compile.quant.qvg import encode_qvg as encode_ref
from qvg_compile.quant.segment import gather_centroids

ROWS: list[dict] = []


def bench(fn, reps: int = 100) -> float:
    return do_bench(fn, warmup=25, rep=reps, return_mode="median")


def log(out_dir: str, rec: dict) -> None:
    ROWS.append(rec)
    print(json.dumps(rec), flush=True)
    with open(os.path.join(out_dir, "kernels.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def ceilings() -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s), measured."""
    a = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a)) * 1e-3
    bw = 2 * a.numel() / t
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: x @ y) * 1e-3
    return bw, 2 * 8192 ** 3 / t


def random_store(b: int, h: int, n: int, d: int, seg_tokens: int, bits: int = 2, c: int = 256,
                 gen: torch.Generator = None) -> PackedStore:
    """A store with valid random contents: codes, FP8 scales ~ real residual scales, one codebook
    of ``c`` BF16 centroids per ``seg_tokens`` tokens."""
    dev = "cuda"
    k = math.ceil(n / seg_tokens)
    codes = torch.randint(0, 256, (b, h, n, d * bits // 8), dtype=torch.uint8, device=dev)
    scales = (torch.rand(b, h, n, d // 64, device=dev) * 0.5 + 0.1).to(torch.float8_e4m3fn)
    assign = torch.randint(0, c, (1, b, h, n), dtype=torch.uint8, device=dev)
    cents = torch.randn(k, 1, b, h, c, d, device=dev).to(torch.bfloat16)
    ids = (torch.arange(n, device=dev) // seg_tokens).to(torch.int32)
    return PackedStore(codes, scales, None, assign, cents, ids, bits, 64, "symmetric_full")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_attention(out_dir: str, keys: int, bw: float, flops: float, impls: list[str], queries: int = 4680,
                    heads: int = 12, d: int = 128, check: bool = True, fused_cfgs=None) -> None:
    torch.manual_seed(0)
    ks = random_store(1, heads, keys, d, 4680)
    vs = random_store(1, heads, keys, d, 4680)
    q = torch.randn(1, heads, queries, d, device="cuda", dtype=torch.bfloat16)
    tk = torch.empty(1, heads, 0, d, device="cuda", dtype=torch.bfloat16)
    ranges = [(0, keys)]
    scale = 1 / math.sqrt(d)
    kd = ks.dequantize(0, keys, torch.bfloat16)
    vd = vs.dequantize(0, keys, torch.bfloat16)

    ref = None
    if check:
        ref = F.scaled_dot_product_attention(q.float(), kd.float(), vd.float())
    sdpa = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                F.scaled_dot_product_attention(q, kd, vd)
                sdpa[name] = bench(lambda kd=kd, vd=vd: F.scaled_dot_product_attention(q, kd, vd))
        except RuntimeError as e:
            sdpa[name] = float("nan")
            print(f"sdpa {name}: {e}", file=sys.stderr)
    best_sdpa = min(v for v in sdpa.values() if v == v)
    fl = 4 * queries * keys * d * heads
    hist_bytes = 2 * keys * heads * d * 2
    packed = ks.nbytes + vs.nbytes
    floor = max(fl / flops, (packed + 2 * q.numel() * 2) / bw) * 1e3
    for name, t in sdpa.items():
        log(out_dir, dict(kernel=f"sdpa_bf16[{name}]", shape=f"q{queries} k{keys} h{heads} d{d}", ms=t,
                          vs_sdpa=t / best_sdpa, floor_ms=fl / flops * 1e3, tflops=fl / t / 1e9))
    del kd, vd
    torch.cuda.empty_cache()
    variants = []
    for impl in impls:
        if impl == "fused":
            for cfg in fused_cfgs or [None]:
                variants.append((f"fused{'' if cfg is None else list(cfg)}",
                                 lambda cfg=cfg: attend_fused(q, ks, vs, ranges, tk, tk, None, scale, cfg)))
        elif impl.startswith("streamed"):
            # streamed[:block_tokens][:q] (q: keep the running output in bf16 instead of fp32)
            opts = impl.split(":")[1:]
            blk = int(opts[0]) if opts and opts[0] else None
            acc = torch.bfloat16 if "q" in opts else torch.float32
            variants.append((impl, lambda blk=blk, acc=acc: attn_mod.streamed_attention(
                q, ks, vs, ranges, tk, tk, None, scale, blk, acc)))
    for name, fn in variants:
        try:
            out, lse = fn()
            torch.cuda.synchronize()
            err = rel(out, ref) if ref is not None else float("nan")
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size() - lse.numel() * 4
            t = bench(fn)
        except Exception as e:  # a config that fails to compile is reported, not fatal
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        log(out_dir, dict(kernel=f"attn_{name}", shape=f"q{queries} k{keys} h{heads} d{d}", ms=t,
                          vs_sdpa=t / best_sdpa, floor_ms=floor, tflops=fl / t / 1e9, rel_err=err,
                          extra_mem_pct=100 * extra / hist_bytes))


def bench_decode(out_dir: str, shape: tuple, bw: float) -> None:
    b, h, n, d = shape
    ks = random_store(b, h, n, d, n)
    vs = random_store(b, h, n, d, n)
    ok = torch.empty(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    ov = torch.empty_like(ok)
    decode_into(ks, 0, n, ok)
    err = rel(ok, ks.dequantize(0, n, torch.float32))
    t = bench(lambda: (decode_into(ks, 0, n, ok), decode_into(vs, 0, n, ov)))
    t_gather = bench(lambda: (decode_into(ks, 0, n, ok, False), decode_into(vs, 0, n, ov, False)))
    ref = bench(lambda: (ks.dequantize(0, n, torch.bfloat16), vs.dequantize(0, n, torch.bfloat16)), reps=20)
    byts = 2 * (ok.numel() * 2) + ks.nbytes + vs.nbytes
    floor = byts / bw * 1e3
    log(out_dir, dict(kernel="decode K+V [per-element scales]", shape=str(list(shape)), ms=t_gather,
                      floor_ms=floor, pct_of_floor=100 * floor / t_gather))
    log(out_dir, dict(kernel="decode K+V", shape=str(list(shape)), ms=t, torch_ref_ms=ref, floor_ms=floor,
                      pct_of_floor=100 * floor / t, rel_err=err))
    ov.zero_()
    decode_pair_into(ks, vs, 0, n, ok, ov)
    err_pair = max(rel(ok, ks.dequantize(0, n, torch.float32)), rel(ov, vs.dequantize(0, n, torch.float32)))
    t_pair = bench(lambda: decode_pair_into(ks, vs, 0, n, ok, ov))
    log(out_dir, dict(kernel="decode K+V, one launch", shape=str(list(shape)), ms=t_pair, floor_ms=floor,
                      pct_of_floor=100 * floor / t_pair, rel_err=err_pair))


def bench_encode(out_dir: str, shape: tuple, bw: float, flops: float, iters: int = 2) -> None:

    b, h, n, d = shape
    torch.manual_seed(0)
    x = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    cfg = QVGConfig.preset("qvg", kmeans_iters=iters, kmeans_tol=0.0, init="given", check_finite=False)
    gen = torch.Generator().manual_seed(0)
    picks = torch.randperm(n, generator=gen)[:256].cuda()
    init_x = x[:, :, picks].unsqueeze(0).float()
    init_y = y[:, :, picks].unsqueeze(0).float()
    seg, _ = encode_qvg_pair(x, y, cfg, -2, init_x, init_y)
    ref = encode_ref(x, cfg, -2, "key", init_x)
    xf = x.float()
    err_fast = rel(seg.dequantize(), xf)
    err_ref = rel(ref.dequantize(), xf)
    agree = float((seg.assignments == ref.assignments).float().mean())
    # Same centroids and assignments as the reference -> the fused quantizer must be bit-exact.

    g = b * h
    codes, scales, _, _ = quantize(x, ref.centroids.view(1, g, 256, d), ref.assignments.view(1, g, n), 2, 64,
                                   cfg.code_mode, cfg.torch_scale_dtype)
    resid = x.view(g, n, d).float() - gather_centroids(ref.centroids.view(g, 256, d), ref.assignments.view(g, n))
    gq = group_quantize(resid, 2, 64, cfg.code_mode, cfg.torch_scale_dtype)
    exact = float((codes == gq.codes).float().mean()) * float(
        (scales.view(torch.uint8) == gq.scales.view(torch.uint8)).float().mean())
    del resid, gq, codes, scales
    t = bench(lambda: encode_qvg_pair(x, y, cfg, -2, init_x, init_y))
    t_sep = bench(lambda: triton_encode_many([x, y], cfg, -2, ["key", "value"], [init_x, init_y], fused=False))
    t_two = bench(lambda: (encode_fast(x, cfg, -2, "key", init_x), encode_fast(y, cfg, -2, "value", init_y)))
    tol_cfg = cfg.replace(kmeans_iters=4, kmeans_tol=1e-4)
    t_tol = bench(lambda: encode_qvg_pair(x, y, tol_cfg, -2, init_x, init_y))
    tr = bench(lambda: (encode_ref(x, cfg, -2, "key", init_x), encode_ref(y, cfg, -2, "value", init_y)), reps=20)
    # GPU busy time of one pair encode (kernels only) vs its wall time: the rest is host work
    # (Python, launches) that the final flag check's sync exposes.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        encode_qvg_pair(x, y, cfg, -2, init_x, init_y)
        torch.cuda.synchronize()
    busy = sum(e.device_time_total for e in prof.key_averages()) / 1e3
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        encode_qvg_pair(x, y, cfg, -2, init_x, init_y)
    wall = (time.perf_counter() - t0) / 20 * 1e3
    c = 256
    fl = 2 * (iters + 1) * 2 * b * h * n * c * d + 2 * iters * 2 * b * h * n * c * d
    # Fused: each Lloyd step reads x once, the final assignment and the quantizer once each.
    byts = 2 * (x.numel() * 2 * (iters + 2) + seg.nbytes)
    floor = max(fl / flops, byts / bw) * 1e3
    log(out_dir, dict(kernel=f"encode K+V ({iters} it, pair)", shape=str(list(shape)), ms=t, torch_ref_ms=tr,
                      floor_ms=floor, pct_of_floor=100 * floor / t, rel_err=err_fast, ref_rel_err=err_ref,
                      assign_agree=agree, quantize_bit_exact=exact, gpu_busy_ms=busy, host_wall_ms=wall))
    log(out_dir, dict(kernel=f"encode K+V ({iters} it, pair, unfused step)", shape=str(list(shape)), ms=t_sep))
    log(out_dir, dict(kernel=f"encode K+V ({iters} it, two calls)", shape=str(list(shape)), ms=t_two))
    log(out_dir, dict(kernel="encode K+V (4 it, tol 1e-4, pair)", shape=str(list(shape)), ms=t_tol))


def bench_encode_parts(out_dir: str, shape: tuple) -> None:
    """Where the encode time goes (K+V in one grid, bf16): each kernel alone, and variants."""

    b, h, n, d = shape
    x = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    g = 2 * b * h
    c = torch.cat([x[:, :, :256].reshape(b * h, 256, d), y[:, :, :256].reshape(b * h, 256, d)]).float()
    book, cnorm = tk.codebook_buffers(g, 256, d, x.dtype, x.device)
    tk.finish(None, None, c, book, cnorm)
    xs = [x, y]
    a = tk.assign_book(xs, book, cnorm)
    cents = c[: b * h].to(torch.bfloat16).unsqueeze(0)
    ax = a[: b * h].unsqueeze(0)
    sums, counts = tk._update_sums(xs, a, 256)
    parts = {
        "finish (reduce + codebook)": lambda: tk.finish(sums, counts, c, book, cnorm),
        "lloyd fused [bn64,w16]": lambda: tk.lloyd_step(xs, c, book, cnorm, fused=True),
        "lloyd fused [bn64,w8]": lambda: tk.lloyd_step(xs, c, book, cnorm, fused=True, warps=8),
        "lloyd unfused": lambda: tk.lloyd_step(xs, c, book, cnorm, fused=False),
        "assign [bn64,w8]": lambda: tk.assign_book(xs, book, cnorm),
        "assign [bn64,w4]": lambda: tk.assign_book(xs, book, cnorm, 64, 4),
        "assign [bn128,w8]": lambda: tk.assign_book(xs, book, cnorm, 128, 8),
        "update sums [bc128,w8]": lambda: tk._update_sums(xs, a, 256),
        "quantize x1 [bn32,w4]": lambda: tk.quantize(x, cents, ax, 2, 64, "symmetric_full", torch.float8_e4m3fn),
        "quantize x1 [bn64,w4]": lambda: tk.quantize(x, cents, ax, 2, 64, "symmetric_full", torch.float8_e4m3fn, 64, 4),
        "quantize x1 [bn16,w2]": lambda: tk.quantize(x, cents, ax, 2, 64, "symmetric_full", torch.float8_e4m3fn, 16, 2),
        "quantize x1 [bn64,w8]": lambda: tk.quantize(x, cents, ax, 2, 64, "symmetric_full", torch.float8_e4m3fn, 64, 8),
    }
    for name, fn in parts.items():
        try:
            ms = bench(fn)
        except Exception as e:  # a variant that fails to compile is reported, not fatal
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        log(out_dir, dict(kernel=f"encode part {name}", shape=f"K+V {list(shape)}", ms=ms))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--parts", default="attention,decode,encode")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    parts = a.parts.split(",")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    bw, flops = ceilings()
    log(a.out, dict(kernel="ceilings", copy_TBps=bw / 1e12, bf16_matmul_TFLOPs=flops / 1e12))
    if "decode" in parts:
        shapes = [(1, 12, 37440, 128)] if a.smoke else [(1, 12, 37440, 128), (1, 32, 29640, 128)]
        for s in shapes:
            bench_decode(a.out, s, bw)
    if "encode" in parts:
        shapes = [(1, 12, 37440, 128)] if a.smoke else [(1, 12, 37440, 128), (1, 32, 29640, 128)]
        for s in shapes:
            bench_encode(a.out, s, bw, flops)
    if "encode_parts" in parts:
        bench_encode_parts(a.out, (1, 12, 37440, 128))
    if "stream_blocks" in parts:
        for keys in (32760, 93600):
            bench_attention(a.out, keys, bw, flops, ["streamed:4096", "streamed:8192", "fused"], check=False)
    if "attention" in parts:
        if a.smoke:
            bench_attention(a.out, 93600, bw, flops, ["fused", "streamed"],
                            fused_cfgs=[None, (128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 4, 3)])
        else:
            for keys in (32760, 93600, 280800):
                impls = ["streamed", "streamed::q", "streamed:16384"] + (["fused"] if keys == 93600 else [])
                bench_attention(a.out, keys, bw, flops, impls,
                                fused_cfgs=[None, (128, 64, 8, 2, False), (128, 32, 4, 1), (64, 32, 4, 1)])
    cols = ["kernel", "shape", "ms", "vs_sdpa", "torch_ref_ms", "floor_ms", "pct_of_floor", "tflops", "rel_err",
            "extra_mem_pct", "assign_agree", "quantize_bit_exact", "gpu_busy_ms", "host_wall_ms"]
    table = [[r.get(c, "") for c in cols] for r in ROWS if r["kernel"] != "ceilings"]
    print(f"\nceilings: copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    print(tabulate(table, headers=cols, floatfmt=".4g"))


if __name__ == "__main__":
    main()
