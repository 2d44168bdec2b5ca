"""The tiny model's training-time forward against its cached chunk-by-chunk generation (shared
by the tiny-model tests): both must give the same flow."""

from __future__ import annotations

import torch

from qvg_compile.tiny.model import TinyVideoModel, allocate_cache


def teacher_forced_and_chunkwise(m: TinyVideoModel, shape: tuple[int, ...], chunks: int,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Weights of ``m`` redrawn ``N(0, scale)``, random clean/noisy latents of ``shape``
    ``[B, F, C, H, W]`` and per-chunk timesteps: (``forward_train``'s flow, the flow of ``chunks``
    cached forwards, each followed by the clean pass that rewrites its slot, and the cache)."""
    for p in m.parameters():
        p.data.normal_(0, scale)
    clean, noisy, t = torch.randn(shape), torch.randn(shape), torch.rand(shape[0], chunks)
    frames = shape[1] // chunks
    with torch.no_grad():
        expected = m.forward_train(clean, noisy, t)
        cache = allocate_cache(m, shape[1])
        got = []
        for c in range(chunks):
            start = c * m.cfg.chunk_tokens
            got.append(m(noisy[:, frames * c:frames * (c + 1)], t[:, c], cache, start))
            m(clean[:, frames * c:frames * (c + 1)], torch.zeros(1), cache, start)
    return expected, torch.cat(got, 1), cache
