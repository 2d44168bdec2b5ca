"""A tiny Self-Forcing-style AR video transformer: the model the demo and the backend tests run.

Frames ``[B, C, H, W]`` are patchified into tokens; chunks of frames are denoised with a few
flow-matching Euler steps, each step rewriting the chunk's slot of a pipeline-allocated KV
cache, then one clean pass at t=0 writes the final K/V (DESIGN.md §5 idiom A):

    cache[i]["k"][:, start:end] = k          # [B, S, H, D]
    k_all = cache[i]["k"][:, :end]            # prefix read, then SDPA on [B, H, N, D]

Weights are random (seeded): the model is a faithful workload for the cache, not a video model
worth watching. Nothing here knows about QVG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TinyVideoConfig:
    channels: int = 3
    size: int = 16
    patch: int = 2
    dim: int = 128
    heads: int = 2
    layers: int = 2
    frames_per_chunk: int = 2
    steps: int = 3

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def tokens_per_frame(self) -> int:
        return (self.size // self.patch) ** 2


class Block(nn.Module):
    def __init__(self, cfg: TinyVideoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))
        self.ada = nn.Linear(cfg.dim, 4 * cfg.dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cache: dict, start: int) -> torch.Tensor:
        """x ``[B, N, dim]``; cache ``{"k", "v": [B, S, H, Dh]}``; writes tokens [start, start+N)."""
        b, n, _ = x.shape
        shift1, scale1, shift2, scale2 = self.ada(temb).unsqueeze(1).chunk(4, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(b, n, 3, self.cfg.heads, self.cfg.head_dim).unbind(2)
        end = start + n
        cache["k"][:, start:end] = k
        cache["v"][:, start:end] = v
        keys = cache["k"][:, :end]
        values = cache["v"][:, :end]
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, -1))
        return x + self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class TinyVideoModel(nn.Module):
    """Predicts the flow-matching velocity of a chunk of frames given the cached history."""

    def __init__(self, cfg: TinyVideoConfig = TinyVideoConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        patch_dim = cfg.channels * cfg.patch ** 2
        self.embed = nn.Linear(patch_dim, cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.tokens_per_frame, cfg.dim) * 0.02)
        self.time = nn.Sequential(nn.Linear(64, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.out = nn.Linear(cfg.dim, patch_dim)

    def forward(self, frames: torch.Tensor, t: torch.Tensor, cache: list[dict], start: int) -> torch.Tensor:
        """frames ``[B, F, C, H, W]`` of the current chunk, t ``[B]`` in [0, 1]; returns the velocity."""
        b, f, c, hh, ww = frames.shape
        p = self.cfg.patch
        tokens = frames.reshape(b, f, c, hh // p, p, ww // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        tokens = tokens.reshape(b, f * (hh // p) * (ww // p), c * p * p)
        x = self.embed(tokens) + self.pos.repeat(f, 1)
        freqs = torch.exp(-math.log(1000.0) * torch.arange(32, device=t.device) / 32)
        temb = self.time(torch.cat([torch.sin(t[:, None] * 1000 * freqs), torch.cos(t[:, None] * 1000 * freqs)], -1))
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, temb, layer_cache, start)
        out = self.out(x).reshape(b, f, hh // p, ww // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, f, c, hh, ww)


def allocate_cache(model: TinyVideoModel, num_frames: int, batch: int = 1,
                   dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> list[dict]:
    """The pipeline's dense KV cache: per layer ``{"k", "v": zeros[B, S, H, Dh]}``."""
    cfg = model.cfg
    dtype = dtype or next(model.parameters()).dtype
    device = device or next(model.parameters()).device
    shape = (batch, num_frames * cfg.tokens_per_frame, cfg.heads, cfg.head_dim)
    return [{"k": torch.zeros(shape, dtype=dtype, device=device),
             "v": torch.zeros(shape, dtype=dtype, device=device)} for _ in range(cfg.layers)]


@torch.no_grad()
def generate(model: torch.nn.Module, num_chunks: int, seed: int = 0, cache: Optional[list[dict]] = None,
             progress: bool = True) -> torch.Tensor:
    """Auto-regressive generation: per chunk, ``steps`` Euler denoising forwards (each rewriting the
    chunk's cache slot) and one clean forward at t=0. Returns frames ``[B, F, C, H, W]``.

    ``model`` may be the compiled module; ``cache`` defaults to a fresh `allocate_cache`."""
    from tqdm.auto import tqdm

    base = getattr(model, "_orig_mod", model)
    cfg = base.cfg
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks: expected a positive int, got {num_chunks!r}")
    cache = allocate_cache(base, num_chunks * cfg.frames_per_chunk) if cache is None else cache
    param = next(base.parameters())
    gen = torch.Generator().manual_seed(seed)
    chunk_tokens = cfg.frames_per_chunk * cfg.tokens_per_frame
    frames = []
    for c in tqdm(range(num_chunks), desc="generating", unit="chunk", disable=not progress):
        x = torch.randn(1, cfg.frames_per_chunk, cfg.channels, cfg.size, cfg.size, generator=gen)
        x = x.to(param.device, param.dtype)
        ts = torch.linspace(1.0, 0.0, cfg.steps + 1)
        for i in range(cfg.steps):
            t = torch.full((1,), float(ts[i]), device=param.device, dtype=param.dtype)
            velocity = model(x, t, cache, c * chunk_tokens)
            x = x + (ts[i + 1] - ts[i]) * velocity
        model(x, torch.zeros(1, device=param.device, dtype=param.dtype), cache, c * chunk_tokens)
        frames.append(x)
    return torch.cat(frames, dim=1)
