"""``qvg-compile demo``: the shipped tiny video model continues a clip with a 2-bit QVG KV cache.

The checkpoint (`qvg_compile.tiny`, trained by ``examples/train_tiny.py``) continues one of its
held-out prompt clips twice with the same noise seed: eagerly with the pipeline's dense cache, and
through ``torch.compile(model, backend=qvg_compile.backend(...))``, which finds the caches and
swaps them for `QVGCache`. Reported: the backend's explain summary, KV memory with and without QVG
(while generating, and once `seal` has quantized the last chunk at the end of the video), PSNR/SSIM
of the QVG video against the dense-cache one, and a side-by-side GIF.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from .backend import backend
from .cache import memory_report, seal
from .quant.config import QVGConfig
from .tiny.checkpoint import load_checkpoint
from .tiny.data import from_uint8
from .tiny.metrics import psnr_per_frame, ssim_per_frame
from .tiny.model import allocate_cache, generate


def psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR in dB of ``test`` against ``reference`` (values in [-1, 1]: peak-to-peak 2)."""
    mse = float((reference.float() - test.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def run_demo(chunks: int = 12, seed: int = 0, out: str = "qvg_demo.gif", progress: bool = True,
             prompt_index: int = 0, checkpoint: Optional[str] = None) -> dict:
    """Continue prompt ``prompt_index`` to ``chunks`` chunks, dense cache vs QVG backend."""
    if not isinstance(chunks, int) or chunks < 2:
        raise ValueError(f"chunks: expected an int >= 2 (the prompt chunk and a generated one), got {chunks!r}")
    ckpt = load_checkpoint(checkpoint)
    if not 0 <= prompt_index < len(ckpt.prompts):
        raise ValueError(f"prompt_index: expected 0..{len(ckpt.prompts) - 1}, got {prompt_index}")
    model = ckpt.model
    prompt = from_uint8(ckpt.prompts[prompt_index:prompt_index + 1])
    frames = chunks * model.cfg.frames_per_chunk

    start = time.perf_counter()
    dense_cache = allocate_cache(model, frames)
    reference = generate(model, chunks, seed=seed, cache=dense_cache, prompt=prompt, progress=False)
    dense_seconds = time.perf_counter() - start
    dense_mem = memory_report(dense_cache)

    qvg = backend(QVGConfig.preset("qvg"), chunk_tokens=model.cfg.chunk_tokens)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qvg)
    cache = allocate_cache(model, frames)
    start = time.perf_counter()
    video = generate(compiled, chunks, seed=seed, cache=cache, prompt=prompt, progress=progress)
    qvg_seconds = time.perf_counter() - start
    qvg_mem = memory_report(cache)
    seal(cache)
    sealed_mem = memory_report(cache)

    first = prompt.shape[1]
    path = _save(reference, video, Path(out))
    return {
        "report": qvg.report,
        "psnr_db": psnr(reference[:, first:], video[:, first:]),
        "ssim": float(ssim_per_frame(reference[:, first:], video[:, first:]).mean()),
        "psnr_per_frame_db": [float(x) for x in psnr_per_frame(reference[:, first:], video[:, first:])],
        "dense_bytes": dense_mem["held_bytes"],
        "qvg_bytes": qvg_mem["held_bytes"],
        "sealed_bytes": sealed_mem["held_bytes"],
        "memory_table": qvg_mem["table"],
        "dense_seconds": dense_seconds,
        "qvg_seconds": qvg_seconds,
        "frames": frames - first,
        "video": str(path),
    }


def _save(reference: torch.Tensor, video: torch.Tensor, path: Path) -> Path:
    from .tiny.media import save_strip

    return Path(save_strip([reference[0].float(), video[0].float()], ["dense cache", "QVG 2-bit"], path))
