"""Video-like synthetic K/V with the structure of real AR video caches.

Tokens sit on a ``frames x height x width`` grid. Each token's latent feature mixes a smooth
background (low-frequency Fourier features of its position, drifting with a camera pan) with
the embedding of the moving object that covers it, so tokens are spatially and temporally
redundant and fall into semantic groups, as in video DiT caches. Keys get per-channel offsets and
a few large outlier channels (as real keys do); values do not. Deterministic from ``seed``.
"""

from __future__ import annotations

import math

import torch


def video_like_kv(
    batch: int = 1,
    heads: int = 4,
    frames: int = 6,
    height: int = 16,
    width: int = 16,
    head_dim: int = 128,
    queries: int = 256,
    num_objects: int = 8,
    outlier_channels: int = 4,
    noise: float = 0.05,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Returns ``{"q": [B, H, M, D], "k": [B, H, N, D], "v": [B, H, N, D]}`` with N = F*h*w."""
    for name, value in dict(batch=batch, heads=heads, frames=frames, height=height, width=width,
                            head_dim=head_dim, queries=queries, num_objects=num_objects).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    latent = 48
    t = torch.arange(frames, dtype=torch.float32)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    pan = torch.randn(batch, 2, generator=gen) * 0.04
    pos_x = xx[None, None] + pan[:, 0, None, None, None] * t[None, :, None, None]
    pos_y = yy[None, None] + pan[:, 1, None, None, None] * t[None, :, None, None]
    freqs = torch.randn(latent // 2, 2, generator=gen) * 2.5
    phase = 2 * math.pi * (pos_x[..., None] * freqs[:, 0] + pos_y[..., None] * freqs[:, 1])
    background = torch.cat([phase.sin(), phase.cos()], dim=-1)

    centres = torch.rand(batch, num_objects, 2, generator=gen)
    velocity = torch.randn(batch, num_objects, 2, generator=gen) * 0.03
    radius = 0.08 + 0.12 * torch.rand(batch, num_objects, generator=gen)
    cx = centres[..., 0, None] + velocity[..., 0, None] * t
    cy = centres[..., 1, None] + velocity[..., 1, None] * t
    dist2 = ((xx[None, None, None] - cx[..., None, None]) ** 2
             + (yy[None, None, None] - cy[..., None, None]) ** 2)
    cover = torch.exp(-dist2 / (2 * radius[..., None, None, None] ** 2))
    owner = cover.argmax(1)
    covered = cover.amax(1) > 0.3
    object_emb = torch.randn(batch, num_objects, latent, generator=gen) * 1.5
    obj = torch.gather(object_emb, 1, owner.reshape(batch, -1, 1).expand(-1, -1, latent))
    obj = obj.view(batch, frames, height, width, latent) * covered[..., None]
    z = (background + obj).reshape(batch, -1, latent)

    def project(channel_offsets: bool) -> torch.Tensor:
        w = torch.randn(heads, latent, head_dim, generator=gen) / math.sqrt(latent)
        out = torch.einsum("bne,hed->bhnd", z, w)
        out = out + noise * torch.randn(out.shape, generator=gen)
        if channel_offsets:
            out = out + 0.5 * torch.randn(1, heads, 1, head_dim, generator=gen)
            idx = torch.randperm(head_dim, generator=gen)[:outlier_channels]
            out[..., idx] = out[..., idx] * 8 + 4
        return out

    k = project(True)
    v = project(False)
    q_idx = torch.randperm(z.shape[1], generator=gen)[:queries]
    wq = torch.randn(heads, latent, head_dim, generator=gen) / math.sqrt(latent)
    q = torch.einsum("bne,hed->bhnd", z[:, q_idx], wq)
    return {"q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype)}


def scene_cut_kv(frames: int = 6, height: int = 16, width: int = 16, seed: int = 0, **kwargs: object
                 ) -> dict[str, torch.Tensor]:
    """`video_like_kv` with a cut half way: frames ``[0, frames // 2)`` come from the video of
    ``seed``, the rest from another video (``seed + 1``: new projections, objects and pan), as a
    stream a cache seals chunk by chunk would see. ``q`` is the second video's. Other keyword
    arguments as `video_like_kv`."""
    first = video_like_kv(frames=frames, height=height, width=width, seed=seed, **kwargs)  # type: ignore[arg-type]
    second = video_like_kv(frames=frames, height=height, width=width, seed=seed + 1, **kwargs)  # type: ignore[arg-type]
    cut = (frames // 2) * height * width
    return {"q": second["q"], **{name: torch.cat([first[name][:, :, :cut], second[name][:, :, cut:]], dim=2)
                                 for name in ("k", "v")}}
