"""``qvg-compile demo``: generate a video with the QVG backend and compare it with a dense cache."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .backend import backend
from .cache import memory_report
from .quant.config import QVGConfig
from .tinyvideo import TinyVideoModel, allocate_cache, generate


def psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR in dB of ``test`` against ``reference``, with the reference's peak-to-peak range."""
    mse = float((reference.float() - test.float()).pow(2).mean())
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def save_strip(reference: torch.Tensor, test: torch.Tensor, path: Path) -> Path:
    """Side-by-side GIF (dense cache | QVG cache) of frames ``[1, F, C, H, W]``."""
    from PIL import Image

    both = torch.cat([reference, test], dim=-1)[0]
    lo, hi = float(both.min()), float(both.max())
    frames = ((both - lo) / max(hi - lo, 1e-8) * 255).clamp(0, 255).to(torch.uint8)
    images = [Image.fromarray(f.permute(1, 2, 0).numpy()).resize((f.shape[-1] * 8, f.shape[-2] * 8),
                                                                   Image.NEAREST) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=150, loop=0)
    return path


def run_demo(chunks: int = 8, seed: int = 0, out: str = "qvg_demo.gif", progress: bool = True) -> dict:
    """Dense-cache rollout, then the same seed through ``torch.compile(backend=qvg_backend)``."""
    torch.manual_seed(seed)
    model = TinyVideoModel().eval()
    frames = chunks * model.cfg.frames_per_chunk
    config = QVGConfig.preset("qvg", centroids=64)

    start = time.perf_counter()
    dense_cache = allocate_cache(model, frames)
    reference = generate(model, chunks, seed=seed, cache=dense_cache, progress=False)
    dense_seconds = time.perf_counter() - start
    dense_mem = memory_report(dense_cache)

    qvg = backend(config)
    compiled = torch.compile(model, backend=qvg)
    cache = allocate_cache(model, frames)
    start = time.perf_counter()
    video = generate(compiled, chunks, seed=seed, cache=cache, progress=progress)
    qvg_seconds = time.perf_counter() - start
    qvg_mem = memory_report(cache)

    path = save_strip(reference, video, Path(out))
    return {
        "report": qvg.report,
        "psnr_db": psnr(reference, video),
        "dense_bytes": dense_mem["dense_bytes"],
        "qvg_bytes": qvg_mem["held_bytes"],
        "memory_table": qvg_mem["table"],
        "dense_seconds": dense_seconds,
        "qvg_seconds": qvg_seconds,
        "frames": frames,
        "video": str(path),
    }
