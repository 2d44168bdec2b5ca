"""Segment length, codebook size and codebook sharing of `QVGCache`: compression against error.

Fills a cache chunk by chunk (the way an AR pipeline does) with video-like K and V
(`qvg_compile.bench.synthetic.video_like_kv`: spatially and temporally redundant tokens), then
reports, per `CachePolicy` variant, the bits per element once the video ends and `QVGCache.seal`
has quantized the last chunk and freed its rows (packed codes, scales, assignments, codebooks and
token state, from the real allocated arrays) and the relative MSE of the sealed K and V.
The `CachePolicy` defaults come from this table (see README, "Choosing the cache defaults").

    python benchmarks/cache_tradeoff.py            # CPU, about a minute
    python benchmarks/cache_tradeoff.py --scene-change --per-chunk   # a cut half way, error per chunk
    python benchmarks/cache_tradeoff.py --heads 12 --frames 21 --frame-shape 30x52 --scene-change --per-chunk  # Wan size
    python benchmarks/cache_tradeoff.py --device cuda --frames 48 --json
"""

from __future__ import annotations

import argparse
import json

import torch
from tabulate import tabulate

from qvg_compile import QVGCache, QVGConfig, quantize
from qvg_compile.quant.metrics import rel_mse
from qvg_compile.bench.synthetic import scene_cut_kv, video_like_kv

VARIANTS = [
    # (name, CachePolicy overrides); every row states codebook_chunks (its default is 2)
    ("C=256 per chunk", dict(codebook_bits=4.0, codebook_chunks=1)),
    ("budget 0.5 bit", dict(codebook_bits=0.5, codebook_chunks=1)),
    ("budget 0.25 bit", dict(codebook_bits=0.25, codebook_chunks=1)),
    ("budget 0.25, share x2 (default)", dict(codebook_bits=0.25, codebook_chunks=2)),
    ("budget 0.25, share x2, 1 spare slot", dict(codebook_bits=0.25, codebook_chunks=2, spare_segments=1)),
    ("budget 0.25, share x3", dict(codebook_bits=0.25, codebook_chunks=3)),
    ("budget 0.25, share x4", dict(codebook_bits=0.25, codebook_chunks=4)),
    ("budget 0.125 bit", dict(codebook_bits=0.125, codebook_chunks=1)),
    ("seal 2 chunks, 0.25", dict(codebook_bits=0.25, codebook_chunks=1, dense_chunks=2, seal_chunks=2)),
    ("share x2, no fit guard", dict(codebook_bits=0.25, codebook_chunks=2, share_fit=None)),
    ("share x2, warm start", dict(codebook_bits=0.25, codebook_chunks=2, warm_start=True)),
]


def filled(x: torch.Tensor, role: str, chunk: int, overrides: dict) -> QVGCache:
    """A cache ``[B, H, N, D]`` filled chunk by chunk with ``x`` and sealed (which frees the open
    chunk's rows: what is left is the sealed tokens' bytes)."""
    cache = QVGCache.empty(tuple(x.shape), 2, QVGConfig.preset("qvg"), role=role, dtype=x.dtype, device=x.device,
                           chunk_tokens=chunk, **overrides)
    for s in range(0, x.shape[2] // chunk * chunk, chunk):
        cache[:, :, s:s + chunk] = x[:, :, s:s + chunk]
    cache.seal()
    return cache


def measure(k: torch.Tensor, v: torch.Tensor, chunk: int, overrides: dict) -> dict:
    """Fill K and V caches ``[B, H, N, D]`` chunk by chunk, seal, and measure."""
    out: dict = {}
    bits = []
    for name, x in (("k", k), ("v", v)):
        cache = filled(x, "key" if name == "k" else "value", chunk, overrides)
        n = x.shape[2] // chunk * chunk
        bits.append(cache.nbytes() * 8 / x[:, :, :n].numel())
        out[f"{name}_rel_mse"] = rel_mse(x[:, :, :n], cache.dequantize()[:, :, :n])
        out["segments"] = cache.token_counts()["segments"]
    out["bits_per_element"] = sum(bits) / 2
    return out


def per_chunk(k: torch.Tensor, v: torch.Tensor, chunk: int, span: int) -> list[list[str]]:
    """Rel-MSE of every chunk of K and V: the cache with its defaults; the published
    configuration (symmetric codes, C=256 BF16 centroids, one codebook per span of ``span`` chunks,
    encoded at once); per-token RTN (the ``rtn`` preset). Rows: chunk, then K and V of each."""
    n = k.shape[2] // chunk * chunk
    published = QVGConfig.preset("qvg", code_mode="symmetric", value_code_mode="symmetric", centroids=256,
                                 centroid_dtype="bf16")
    errors = {}
    for name, x, role in (("k", k, "key"), ("v", v, "value")):
        cache = filled(x, role, chunk, {}).dequantize()
        pub = torch.cat([quantize(x[:, :, a:min(n, a + span * chunk)], published, role=role).dequantize()
                         for a in range(0, n, span * chunk)], dim=2)
        rtn = quantize(x[:, :, :n], QVGConfig.preset("rtn"), role=role).dequantize()
        errors[name] = [[rel_mse(x[:, :, a:a + chunk], got[:, :, a:a + chunk]) for got in (cache, pub, rtn)]
                        for a in range(0, n, chunk)]
    return [[i, *(f"{e:.4f}" for e in errors["k"][i]), *(f"{e:.4f}" for e in errors["v"][i])]
            for i in range(n // chunk)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=24, help="latent frames of video-like K/V")
    parser.add_argument("--frame-tokens", type=int, default=24, help="h = w of a frame's token grid")
    parser.add_argument("--frame-shape", default=None, metavar="HxW",
                        help="a frame's token grid when not square (Wan-1.3B at 480x832: 30x52, 1,560 tokens)")
    parser.add_argument("--chunk-frames", type=int, default=3)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scene-change", action="store_true",
                        help="the second half of the frames is another video (another seed): a cut")
    parser.add_argument("--per-chunk", action="store_true",
                        help="also each chunk's K and V error: the cache's defaults, the published "
                             "configuration (8-chunk spans, C=256, symmetric codes) and per-token RTN")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    height = width = args.frame_tokens
    if args.frame_shape:
        height, width = (int(n) for n in args.frame_shape.lower().split("x"))
    make = scene_cut_kv if args.scene_change else video_like_kv
    data = make(heads=args.heads, frames=args.frames, height=height, width=width, seed=args.seed)
    k, v = data["k"].to(args.device), data["v"].to(args.device)
    chunk = args.chunk_frames * height * width
    records = []
    for name, overrides in VARIANTS:
        rec = {"variant": name, **overrides, **measure(k, v, chunk, overrides)}
        records.append(rec)
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    print(f"K/V {list(k.shape)}, chunks of {chunk} tokens, {k.shape[2] // chunk} chunks, sealed tokens only")
    print(tabulate([[r["variant"], f"{r['bits_per_element']:.3f}", f"{16 / r['bits_per_element']:.2f}x",
                     f"{r['k_rel_mse']:.4f}", f"{r['v_rel_mse']:.4f}", r["segments"]] for r in records],
                   headers=["policy", "bits/elem", "vs BF16", "K rel-MSE", "V rel-MSE", "segments"],
                   tablefmt="github"))
    if args.per_chunk:
        print()
        print(tabulate(per_chunk(k, v, chunk, span=8),
                       headers=["chunk", "K cache", "K published", "K RTN", "V cache", "V published", "V RTN"],
                       tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
