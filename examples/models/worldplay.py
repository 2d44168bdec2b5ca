"""HY-WorldPlay style AR world model: two positional variants per key, a growing functional cache.

How the family keeps its cache, and what this file reproduces (docs/design.md §5 ids):

* **D** - after a chunk is denoised, a *cache pass* runs it once more at t=0 (attending to the
  history) and returns per layer its K/V ``[B, H, n, D]``; the pipeline appends them to the
  running cache with ``torch.cat(..., dim=2)`` outside the model, and every forward of the next
  chunk concatenates ``[text ; cache ; new]`` along the sequence before SDPA.
* **F** - every key exists in two positional variants: 3D RoPE over (frame, row, column), and a
  camera-conditioned variant (the temporal channels rotate by the camera's yaw, the spatial ones
  by its translation, in the spirit of ProPE). They are stored side by side, along batch
  (``pos_layout="batch"``: K cache ``[2B, H, N, D]``, rows ``[RoPE ; camera]``; the two
  attention outputs are averaged) or along the head dim (``pos_layout="head_dim"``: K cache
  ``[B, H, N, 2D]``, so one SDPA sums both variants' scores). V is stored once, ``[B, H, N, D]``.
* The text K/V of every layer are computed once per video (:meth:`WorldPlayModel.encode_text`)
  and concatenated in front at every read: a cross-attention constant, not a cache that grows.

Loop: per chunk, ``config.num_steps`` Euler flow-matching forwards of the new chunk (no CFG),
then the cache pass that extends the cache; ``memory_frames`` bounds the history kept.

Real dimensions (``real_config``): HunyuanVideo-1.5 width - 54 layers, dim 2048, 16 heads x 128,
text 256 x 3584 (Qwen2.5-VL states), 32-channel 480p latents ``30 x 52`` with patch 1 (1,560 tokens per
latent frame), chunks of 4 latent frames. Weights are random; the model is a faithful cache
workload, not a world model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import (
    LatentGeometry,
    GeluFFN,
    PatchEmbed3d,
    RMSNorm,
    TimestepEmbedding,
    apply_rope_real,
    check_int,
    check_tensor,
    gate,
    model_device_dtype,
    modulate,
    new_generator,
    randn,
    rope_angles_3d,
    rope_cos_sin,
    sigma_schedule,
    timesteps_for,
    unpatchify,
    wan_rope_axes,
)

KVCache = list[dict[str, torch.Tensor]]
"""One dict per layer: ``k`` (``[2B, H, N, D]`` for ``pos_layout="batch"``, ``[B, H, N, 2D]``
for ``"head_dim"``), ``v`` ``[B, H, N, D]``; both in the model dtype, positional encodings
already applied to ``k``."""

TextKV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer ``(k, v)`` of the text tokens, ``[B, H, L, D]`` each, without positions."""

POS_LAYOUTS = ("batch", "head_dim")


@dataclass(frozen=True)
class WorldPlayConfig(LatentGeometry):
    """Architecture, sample geometry and sampler. ``memory_frames=None`` keeps the whole history."""

    num_layers: int
    dim: int
    num_heads: int
    ffn_dim: int
    text_dim: int
    text_len: int
    latent_height: int
    latent_width: int
    in_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 1, 1)
    freq_dim: int = 256
    chunk_frames: int = 4
    memory_frames: int | None = None
    num_steps: int = 4
    shift: float = 5.0
    pos_layout: str = "batch"
    rope_theta: float = 256.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("num_layers", "dim", "num_heads", "ffn_dim", "text_dim", "text_len",
                     "latent_height", "latent_width", "in_channels", "freq_dim", "chunk_frames",
                     "num_steps"):
            check_int(name, getattr(self, name))
        if self.memory_frames is not None:
            check_int("memory_frames", self.memory_frames)
        if self.pos_layout not in POS_LAYOUTS:
            raise ValueError(f"pos_layout must be one of {POS_LAYOUTS}, got {self.pos_layout!r}")
        self.check_geometry()


def tiny_config(**overrides: object) -> WorldPlayConfig:
    """A 2-layer model, 2 heads x 64, on ``[B, 16, F, 2, 2]`` latents (4 tokens per frame), chunks of
    2 frames and 2 sampling steps: seconds on CPU."""
    cfg = WorldPlayConfig(
        num_layers=2, dim=128, num_heads=2, ffn_dim=256, text_dim=24, text_len=8,
        latent_height=2, latent_width=2, freq_dim=32, chunk_frames=2, num_steps=2,
    )
    return dataclasses.replace(cfg, **overrides)


def real_config(**overrides: object) -> WorldPlayConfig:
    """HY-WorldPlay at its real width: 54 layers, 16 heads x 128, 1,560 tokens per latent frame."""
    cfg = WorldPlayConfig(
        num_layers=54, dim=2048, num_heads=16, ffn_dim=8192, text_dim=3584, text_len=256,
        latent_height=30, latent_width=52, in_channels=32,
    )
    return dataclasses.replace(cfg, **overrides)


def camera_trajectory(frames: int, gen: torch.Generator) -> torch.Tensor:
    """A smooth random camera path ``[frames, 3]`` fp32: cumulative yaw (radians) and x/z travel."""
    steps = torch.randn((frames, 3), generator=gen, device=gen.device, dtype=torch.float32)
    return torch.cumsum(steps * torch.tensor([0.1, 0.5, 0.5], device=gen.device), dim=0)


def camera_angles(poses: torch.Tensor, h: int, w: int, axes: tuple[int, int, int], theta: float) -> torch.Tensor:
    """Angles ``[F*h*w, D/2]`` fp64 of the camera variant: the temporal channels rotate with the yaw
    (scaled to frame-like magnitudes), rows and columns shift with the z/x travel."""
    f = poses.shape[0]
    p = poses.to(torch.float64)
    device = poses.device

    def axis(pos: torch.Tensor, size: int) -> torch.Tensor:
        inv = torch.pow(theta, -torch.arange(0, size, 2, device=device, dtype=torch.float64) / size)
        return pos.unsqueeze(-1) * inv

    rows = torch.arange(h, device=device, dtype=torch.float64)
    cols = torch.arange(w, device=device, dtype=torch.float64)
    t_ang = axis(10.0 * p[:, 0], axes[0])[:, None, None, :].expand(f, h, w, -1)
    h_ang = axis(rows[None, :] + p[:, 2:3], axes[1])[:, :, None, :].expand(f, h, w, -1)
    w_ang = axis(cols[None, :] + p[:, 1:2], axes[2])[:, None, :, :].expand(f, h, w, -1)
    return torch.cat([t_ang, h_ang, w_ang], dim=-1).reshape(f * h * w, -1)


class SelfAttention(nn.Module):
    """Joint attention of new tokens over ``[text ; cached history ; new]`` (idioms D, F)."""

    def __init__(self, cfg: WorldPlayConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.pos_layout = cfg.pos_layout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.head_dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.head_dim, cfg.eps)

    def positions(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Both positional variants of ``x [B, H, n, D]`` side by side (``[2B, H, n, D]`` or
        ``[B, H, n, 2D]``)."""
        cos, sin, cam_cos, cam_sin = rope
        dim = 0 if self.pos_layout == "batch" else -1
        return torch.cat([apply_rope_real(x, cos, sin), apply_rope_real(x, cam_cos, cam_sin)], dim=dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        text_kv: tuple[torch.Tensor, torch.Tensor],
        kv_cache: dict[str, torch.Tensor] | None,
        return_kv: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """``x [B, n, dim]``; ``rope`` = (cos, sin, cam_cos, cam_sin) ``[n, D]`` fp32 of the new
        tokens. Returns ``[B, n, dim]`` and, with ``return_kv``, this chunk's cache entries."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = self.positions(self.norm_q(q), rope)
        k = self.positions(self.norm_k(k), rope)
        out, new_kv = self.attend(q, k, v, text_kv, kv_cache, return_kv)
        return self.o(out.transpose(1, 2).flatten(2)), new_kv

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        kv_cache: dict[str, torch.Tensor] | None,
        return_kv: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The new tokens' ``q``, ``k`` (both positional variants) and ``v`` ``[B, H, n, D]``
        attend over ``[text ; cached history ; new]``. Returns ``[B, H, n, D]`` and, with
        ``return_kv``, this chunk's cache entries."""
        new_kv = {"k": k.clone(), "v": v.clone()} if return_kv else None
        text_k, text_v = text_kv
        if self.pos_layout == "batch":
            text_k = text_k.repeat(2, 1, 1, 1)
        else:
            text_k = torch.cat([text_k, text_k], dim=-1)
        if kv_cache is not None:
            k = torch.cat([text_k, kv_cache["k"], k], dim=2)
            v = torch.cat([text_v, kv_cache["v"], v], dim=2)
        else:
            k = torch.cat([text_k, k], dim=2)
            v = torch.cat([text_v, v], dim=2)
        if self.pos_layout == "batch":
            out = F.scaled_dot_product_attention(q, k, v.repeat(2, 1, 1, 1))
            return out.unflatten(0, (2, v.shape[0])).mean(0), new_kv
        return F.scaled_dot_product_attention(q, k, v), new_kv


class WorldPlayBlock(nn.Module):
    """AdaLN-modulated joint attention and GELU FFN."""

    def __init__(self, cfg: WorldPlayConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = GeluFFN(cfg.dim, cfg.ffn_dim)
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.text_norm_k = RMSNorm(cfg.head_dim, cfg.eps)

    def forward(self, x, e, rope, text_kv, kv_cache, return_kv):
        """``x [B, n, dim]``, ``e [B, F, dim]`` -> (``[B, n, dim]``, new cache entries)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(e)).chunk(6, dim=-1)
        y, new_kv = self.attn(modulate(self.norm1(x), shift1, scale1), rope, text_kv, kv_cache, return_kv)
        x = x + gate(y, gate1)
        return x + gate(self.ffn(modulate(self.norm2(x), shift2, scale2)), gate2), new_kv


class WorldPlayModel(nn.Module):
    """Camera-conditioned DiT predicting the flow ``noise - x0`` of one chunk."""

    def __init__(self, config: WorldPlayConfig) -> None:
        super().__init__()
        if not isinstance(config, WorldPlayConfig):
            raise TypeError(f"config must be a WorldPlayConfig, got {type(config).__name__}")
        self.config = config
        dim = config.dim
        self.patch_embedding = PatchEmbed3d(config.in_channels, dim, config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU("tanh"), nn.Linear(dim, dim))
        self.time_embedding = TimestepEmbedding(config.freq_dim, dim)
        self.pose_embedding = nn.Linear(3, dim)
        self.blocks = nn.ModuleList(WorldPlayBlock(config) for _ in range(config.num_layers))
        self.head_norm = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.head_ada = nn.Linear(dim, 2 * dim)
        pt, ph, pw = config.patch_size
        self.head = nn.Linear(dim, config.in_channels * pt * ph * pw)

    def encode_text(self, context: torch.Tensor) -> TextKV:
        """Per-layer text K/V ``[B, H, L, D]`` of ``context [B, L, text_dim]`` (once per video)."""
        cfg = self.config
        ctx = self.text_embedding(context)
        b = ctx.shape[0]
        out: TextKV = []
        for block in self.blocks:
            k, v = block.text_kv(ctx).view(b, -1, 2, cfg.num_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
            out.append((block.text_norm_k(k), v))
        return out

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        poses: torch.Tensor,
        text_kv: TextKV,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Denoise one chunk, or (``return_kv=True``) also return its cache entries.

        Args:
            x: latents ``[B, C, F, H, W]`` in the model dtype.
            t: timesteps ``[B, F]`` fp32 in [0, 1000].
            poses: camera poses ``[F, 3]`` fp32 of these frames (yaw, x, z).
            text_kv: :meth:`encode_text`'s output.
            kv_cache: the history (:data:`KVCache`), or ``None`` for the first chunk.
            return_kv: also return this chunk's K/V per layer, in the cache's layout.

        Returns:
            The flow ``[B, C, F, H, W]``; with ``return_kv``, ``(flow, new_entries)``.
        """
        cfg = self.config
        for name, cache in (("text_kv", text_kv), ("kv_cache", kv_cache)):
            if cache is not None and len(cache) != cfg.num_layers:
                raise ValueError(f"{name} must hold {cfg.num_layers} layers, got {len(cache)}")
        tokens, (f, h, w) = self.patch_embedding(x)
        check_tensor("poses", poses, (f, 3))
        hist_frames = 0 if kv_cache is None else kv_cache[0]["v"].shape[2] // (h * w)
        axes = wan_rope_axes(cfg.head_dim)
        frame_pos = torch.arange(hist_frames, hist_frames + f, device=x.device)
        cos, sin = rope_cos_sin(rope_angles_3d(frame_pos, h, w, axes, cfg.rope_theta))
        cam_cos, cam_sin = rope_cos_sin(camera_angles(poses, h, w, axes, cfg.rope_theta))
        rope = (cos, sin, cam_cos, cam_sin)
        e = self.time_embedding(t) + self.pose_embedding(poses.to(tokens.dtype))
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            tokens, new_kv = block(tokens, e, rope, text_kv[i], None if kv_cache is None else kv_cache[i], return_kv)
            if return_kv:
                new_cache.append(new_kv)
        shift, scale = self.head_ada(F.silu(e)).chunk(2, dim=-1)
        out = unpatchify(self.head(modulate(self.head_norm(tokens), shift, scale)), (f, h, w),
                         cfg.patch_size, cfg.in_channels)
        return (out, new_cache) if return_kv else out


def _config_of(model: nn.Module) -> WorldPlayConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(cfg, WorldPlayConfig):
        raise TypeError("model must be a WorldPlayModel (optionally wrapped by torch.compile)")
    return cfg


def append_cache(cache: KVCache | None, new: KVCache, memory_tokens: int | None) -> KVCache:
    """The pipeline's cache update: ``cat`` the new entries after the history along the sequence,
    keeping at most the last ``memory_tokens`` tokens."""
    if cache is None:
        out = [dict(entry) for entry in new]
    else:
        out = [{name: torch.cat([old[name], entry[name]], dim=2) for name in ("k", "v")}
               for old, entry in zip(cache, new)]
    if memory_tokens is not None and out[0]["v"].shape[2] > memory_tokens:
        out = [{name: entry[name][:, :, -memory_tokens:] for name in ("k", "v")} for entry in out]
    return out


@torch.no_grad()
def generate(
    model: nn.Module,
    num_chunks: int,
    seed: int,
    *,
    batch_size: int = 1,
    context: torch.Tensor | None = None,
    poses: torch.Tensor | None = None,
    progress: bool = True,
    cache_hook: Callable[[KVCache], KVCache] | None = None,
    on_chunk: Callable[[int, KVCache], None] | None = None,
) -> torch.Tensor:
    """Generate ``num_chunks`` chunks the way HY-WorldPlay's AR pipeline does.

    Per chunk: ``config.num_steps`` denoising forwards reading the cache, then a cache pass at t=0
    whose K/V the pipeline appends to the cache.

    Args:
        model: a :class:`WorldPlayModel`, eager or ``torch.compile``d.
        num_chunks: chunks of ``config.chunk_frames`` latent frames.
        seed: seeds all noise (and the stand-in text and camera path when not given).
        batch_size: videos generated together (sharing one camera path).
        context: text encoder states ``[B, text_len, text_dim]``; random when None.
        poses: camera poses ``[num_chunks * chunk_frames, 3]`` (yaw, x, z); random when None.
        progress: show a tqdm bar over chunks.
        cache_hook: applied to the cache each time it changes, before the model reads it (e.g.
            ``lambda kv: qvg_compile.compress(kv, config, seq_dim=2)``).
        on_chunk: called after each chunk with ``(chunk_index, kv_cache)``.

    Returns:
        Latents ``[B, C, num_chunks * chunk_frames, H, W]`` in the model dtype.
    """
    cfg = _config_of(model)
    check_int("num_chunks", num_chunks)
    check_int("batch_size", batch_size)
    device, dtype = model_device_dtype(model)
    gen = new_generator(device, seed)
    f = cfg.chunk_frames
    total = num_chunks * f
    if context is None:
        context = randn((batch_size, cfg.text_len, cfg.text_dim), gen, dtype)
    check_tensor("context", context, (batch_size, None, cfg.text_dim))
    if poses is None:
        poses = camera_trajectory(total, gen)
    check_tensor("poses", poses, (total, 3))
    poses = poses.to(device=device, dtype=torch.float32)
    text_kv = model.encode_text(context.to(device=device, dtype=dtype))
    memory_tokens = None if cfg.memory_frames is None else cfg.memory_frames * cfg.frame_tokens
    sigmas = sigma_schedule(cfg.num_steps, cfg.shift)
    shape = (batch_size, cfg.in_channels, f, cfg.latent_height, cfg.latent_width)
    output = torch.zeros(shape[:2] + (total,) + shape[3:], dtype=dtype, device=device)
    kv_cache: KVCache | None = None
    t_shape = (batch_size, f)
    for chunk in tqdm(range(num_chunks), desc="worldplay", unit="chunk", disable=not progress):
        chunk_poses = poses[chunk * f:(chunk + 1) * f]
        noisy = randn(shape, gen, dtype)
        for i in range(cfg.num_steps):
            sigma, nxt = sigmas[i], sigmas[i + 1]
            flow = model(noisy, timesteps_for(sigma, t_shape, device), chunk_poses, text_kv, kv_cache).float()
            noisy = (noisy.float() + (nxt - sigma) * flow).to(dtype)
        output[:, :, chunk * f:(chunk + 1) * f] = noisy
        _, new_kv = model(noisy, timesteps_for(0.0, t_shape, device), chunk_poses, text_kv, kv_cache, True)
        kv_cache = append_cache(kv_cache, new_kv, memory_tokens)
        if cache_hook is not None:
            kv_cache = cache_hook(kv_cache)
        if on_chunk is not None:
            on_chunk(chunk, kv_cache)
    return output
