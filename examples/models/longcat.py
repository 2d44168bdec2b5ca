"""LongCat-Video style AR video model: a functional cache of pre-RoPE K/V, re-encoded each chunk.

How the family keeps its cache, and what this file reproduces (docs/design.md §5 ids):

* **D** - video continuation runs a *cache pass* first: one forward over the conditioning
  (already generated) latent frames at t=0, without cross-attention, that returns per layer the
  keys and values of those frames, ``(k, v)`` each ``[B, H, N, D]`` (cloned out of the forward).
  Every denoising forward of the new chunk receives that list and concatenates the cached K/V in
  front of its own along the sequence, ``torch.cat([k_cache, k], dim=2)``.
* **E** - the cache holds K *before* RoPE; RoPE (real cos/sin form, fp32) is applied to the whole
  concatenated sequence at every read, with the history at positions ``0..F_hist-1`` and the new
  frames after it.
* Classifier-free guidance runs the denoising forwards at batch ``2B`` (conditional and
  unconditional text) while the cache pass ran at batch ``B``: the attention ``repeat``s the cache
  along batch to match.
* Optional CPU offload: the cache pass moves its K/V to the host (``.cpu()``) and the attention
  brings them back with ``.to(device)`` at read time.

Loop: chunk 0 is generated without a cache; every later chunk first re-encodes the history (all
generated frames, or the last ``cond_frames`` of them), then denoises the new chunk with
``num_steps`` Euler flow-matching steps, each a batch-2 CFG forward.

Real dimensions (``real_config``): 48 layers, dim 4096, 32 heads x 128, SwiGLU FFN, umT5 text
(512 x 4096), 480p latents ``60 x 104`` (1,560 tokens per latent frame). Weights are random; the
model is a faithful cache workload, not a video generator.
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
    PatchEmbed3d,
    RMSNorm,
    SwiGLUFFN,
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

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
"""One ``(k, v)`` per layer, each ``[B, H, N, D]`` pre-RoPE K and V of the conditioning frames,
in the model dtype (on the host when offloaded)."""


@dataclass(frozen=True)
class LongCatConfig(LatentGeometry):
    """Architecture, sample geometry and sampler. ``cond_frames=None`` conditions every chunk on
    the whole history; an int keeps only the last ``cond_frames`` latent frames."""

    num_layers: int
    dim: int
    num_heads: int
    ffn_dim: int
    text_dim: int
    text_len: int
    latent_height: int
    latent_width: int
    in_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    chunk_frames: int = 4
    cond_frames: int | None = None
    num_steps: int = 4
    guidance_scale: float = 4.0
    shift: float = 3.0
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("num_layers", "dim", "num_heads", "ffn_dim", "text_dim", "text_len",
                     "latent_height", "latent_width", "in_channels", "freq_dim", "chunk_frames",
                     "num_steps"):
            check_int(name, getattr(self, name))
        if self.cond_frames is not None:
            check_int("cond_frames", self.cond_frames)
        self.check_geometry()


def tiny_config(**overrides: object) -> LongCatConfig:
    """A 2-layer model, 2 heads x 64, on ``[B, 16, F, 4, 4]`` latents (4 tokens per frame), chunks of
    2 frames and 2 sampling steps: seconds on CPU."""
    cfg = LongCatConfig(
        num_layers=2, dim=128, num_heads=2, ffn_dim=256, text_dim=24, text_len=8,
        latent_height=4, latent_width=4, freq_dim=32, chunk_frames=2, num_steps=2,
    )
    return dataclasses.replace(cfg, **overrides)


def real_config(**overrides: object) -> LongCatConfig:
    """LongCat-Video at its real width: 48 layers, 32 heads x 128, 480p latents (60 x 104)."""
    cfg = LongCatConfig(
        num_layers=48, dim=4096, num_heads=32, ffn_dim=11008, text_dim=4096, text_len=512,
        latent_height=60, latent_width=104,
    )
    return dataclasses.replace(cfg, **overrides)


class SelfAttention(nn.Module):
    """Self-attention over ``[cached history ; new tokens]`` with RoPE applied at read (idioms D, E)."""

    def __init__(self, cfg: LongCatConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.head_dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.head_dim, cfg.eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        return_kv: bool,
        offload_kv: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``x [B, n, dim]``; ``cos``/``sin [N_hist + n, D]`` fp32 for the whole sequence.

        Returns the output ``[B, n, dim]`` and, with ``return_kv``, this chunk's pre-RoPE
        ``(k, v)`` ``[B, H, n, D]`` (on the host with ``offload_kv``)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.norm_q(q), self.norm_k(k)
        new_kv = None
        if return_kv:
            new_kv = (k.cpu(), v.cpu()) if offload_kv else (k.clone(), v.clone())
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_cache = k_cache.to(x.device, non_blocking=True)
            v_cache = v_cache.to(x.device, non_blocking=True)
            if k_cache.shape[0] != b:
                # CFG: the cache pass ran once for the shared conditioning frames.
                k_cache = k_cache.repeat(b // k_cache.shape[0], 1, 1, 1)
                v_cache = v_cache.repeat(b // v_cache.shape[0], 1, 1, 1)
            k = torch.cat([k_cache, k], dim=2)
            v = torch.cat([v_cache, v], dim=2)
        q = apply_rope_real(q, cos[-n:], sin[-n:])
        k = apply_rope_real(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2)), new_kv


class CrossAttention(nn.Module):
    """Cross-attention to the text tokens (recomputed every forward, skipped by the cache pass)."""

    def __init__(self, cfg: LongCatConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x [B, n, dim]``, ``context [B, L, dim]`` -> ``[B, n, dim]``."""
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))


class LongCatBlock(nn.Module):
    """AdaLN-modulated self-attention, cross-attention, AdaLN-modulated SwiGLU FFN."""

    def __init__(self, cfg: LongCatConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.attn = SelfAttention(cfg)
        self.norm_cross = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = SwiGLUFFN(cfg.dim, cfg.ffn_dim)
        # Per-block offsets on the shared time projection (Wan-style): a 6 x dim x dim Linear per
        # block would add ~100M parameters per layer at the real width.
        self.modulation = nn.Parameter(torch.randn(1, 1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, context, cos, sin, kv_cache, return_kv, offload_kv, skip_cross_attn):
        """``x [B, n, dim]``, ``e [B, F, 6, dim]`` per-frame modulation -> (``[B, n, dim]``, new K/V)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(2)
        y, new_kv = self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin, kv_cache, return_kv, offload_kv)
        x = x + gate(y, gate1)
        if not skip_cross_attn:
            x = x + self.cross_attn(self.norm_cross(x), context)
        x = x + gate(self.ffn(modulate(self.norm2(x), shift2, scale2)), gate2)
        return x, new_kv


class LongCatModel(nn.Module):
    """DiT predicting the flow ``noise - x0`` of new latent frames, conditioned on cached history."""

    def __init__(self, config: LongCatConfig) -> None:
        super().__init__()
        if not isinstance(config, LongCatConfig):
            raise TypeError(f"config must be a LongCatConfig, got {type(config).__name__}")
        self.config = config
        dim = config.dim
        self.patch_embedding = PatchEmbed3d(config.in_channels, dim, config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU("tanh"), nn.Linear(dim, dim))
        self.time_embedding = TimestepEmbedding(config.freq_dim, dim)
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(LongCatBlock(config) for _ in range(config.num_layers))
        self.head_norm = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.head_ada = nn.Linear(dim, 2 * dim)
        pt, ph, pw = config.patch_size
        self.head = nn.Linear(dim, config.in_channels * pt * ph * pw)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        offload_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Denoise new frames, or (``return_kv=True``) encode conditioning frames into a cache.

        Args:
            x: latents ``[B, C, F, H, W]`` in the model dtype.
            t: timesteps ``[B, F]`` fp32 in [0, 1000] (0 for the cache pass).
            context: text encoder states ``[B, L, text_dim]``; ``None`` skips cross-attention
                (the cache pass).
            kv_cache: the cache pass's output for the history, at batch ``B`` or a divisor of it
                (repeated for CFG); ``None`` for the first chunk and for the cache pass.
            return_kv: also return this forward's pre-RoPE K/V per layer (:data:`KVCache`).
            offload_kv: return those K/V on the host.

        Returns:
            The flow ``[B, C, F, H, W]``; with ``return_kv``, ``(flow, kv)``.
        """
        cfg = self.config
        if kv_cache is not None and len(kv_cache) != cfg.num_layers:
            raise ValueError(f"kv_cache must hold {cfg.num_layers} layers, got {len(kv_cache)}")
        tokens, (f, h, w) = self.patch_embedding(x)
        hist_frames = 0 if kv_cache is None else kv_cache[0][0].shape[2] // (h * w)
        frame_pos = torch.arange(hist_frames + f, device=x.device)
        cos, sin = rope_cos_sin(rope_angles_3d(frame_pos, h, w, wan_rope_axes(cfg.head_dim), cfg.rope_theta))
        e = self.time_embedding(t)
        e0 = self.time_projection(e).unflatten(2, (6, cfg.dim))
        ctx = None if context is None else self.text_embedding(context)
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if kv_cache is None else kv_cache[i]
            tokens, new_kv = block(tokens, e0, ctx, cos, sin, layer_cache, return_kv, offload_kv, ctx is None)
            if return_kv:
                new_cache.append(new_kv)
        shift, scale = self.head_ada(F.silu(e)).chunk(2, dim=-1)
        out = unpatchify(self.head(modulate(self.head_norm(tokens), shift, scale)), (f, h, w),
                         cfg.patch_size, cfg.in_channels)
        return (out, new_cache) if return_kv else out


def _config_of(model: nn.Module) -> LongCatConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(cfg, LongCatConfig):
        raise TypeError("model must be a LongCatModel (optionally wrapped by torch.compile)")
    return cfg


@torch.no_grad()
def generate(
    model: nn.Module,
    num_chunks: int,
    seed: int,
    *,
    batch_size: int = 1,
    context: torch.Tensor | None = None,
    offload_kv: bool = False,
    progress: bool = True,
    cache_hook: Callable[[KVCache], KVCache] | None = None,
    on_chunk: Callable[[int, KVCache | None], None] | None = None,
) -> torch.Tensor:
    """Generate ``num_chunks`` chunks the way LongCat-Video's continuation pipeline does.

    Per chunk after the first: a cache pass over the history frames (batch ``B``, t=0, no text),
    then ``config.num_steps`` Euler steps, each one CFG forward at batch ``2B`` reading the cache.

    Args:
        model: a :class:`LongCatModel`, eager or ``torch.compile``d.
        num_chunks: chunks of ``config.chunk_frames`` latent frames.
        seed: seeds all noise (and the stand-in text embeddings when ``context`` is None).
        batch_size: videos generated together.
        context: text encoder states ``[B, text_len, text_dim]``; random when None. The
            unconditional branch uses zeros (an empty prompt's stand-in).
        offload_kv: keep the cache on the host between forwards.
        progress: show a tqdm bar over chunks.
        cache_hook: applied to each new cache before the denoising forwards read it (e.g.
            ``lambda kv: qvg_compile.compress(kv, config, seq_dim=2)`` runs eagerly on QVG caches).
        on_chunk: called after each chunk with ``(chunk_index, kv_cache or None)``.

    Returns:
        Latents ``[B, C, num_chunks * chunk_frames, H, W]`` in the model dtype.
    """
    cfg = _config_of(model)
    check_int("num_chunks", num_chunks)
    check_int("batch_size", batch_size)
    device, dtype = model_device_dtype(model)
    gen = new_generator(device, seed)
    if context is None:
        context = randn((batch_size, cfg.text_len, cfg.text_dim), gen, dtype)
    check_tensor("context", context, (batch_size, None, cfg.text_dim))
    context = context.to(device=device, dtype=dtype)
    cfg_context = torch.cat([context, torch.zeros_like(context)])
    sigmas = sigma_schedule(cfg.num_steps, cfg.shift)
    f = cfg.chunk_frames
    shape = (batch_size, cfg.in_channels, f, cfg.latent_height, cfg.latent_width)
    output = torch.zeros(shape[:2] + (num_chunks * f,) + shape[3:], dtype=dtype, device=device)
    for chunk in tqdm(range(num_chunks), desc="longcat", unit="chunk", disable=not progress):
        kv_cache = None
        if chunk:
            first = 0 if cfg.cond_frames is None else max(0, chunk * f - cfg.cond_frames)
            history = output[:, :, first:chunk * f]
            _, kv_cache = model(history, timesteps_for(0.0, (batch_size, history.shape[2]), device),
                                None, None, True, offload_kv)
            if cache_hook is not None:
                kv_cache = cache_hook(kv_cache)
        noisy = randn(shape, gen, dtype)
        for i in range(cfg.num_steps):
            sigma, nxt = sigmas[i], sigmas[i + 1]
            flow = model(torch.cat([noisy, noisy]), timesteps_for(sigma, (2 * batch_size, f), device),
                         cfg_context, kv_cache).float()
            cond, uncond = flow.chunk(2)
            flow = uncond + cfg.guidance_scale * (cond - uncond)
            noisy = (noisy.float() + (nxt - sigma) * flow).to(dtype)
        output[:, :, chunk * f:(chunk + 1) * f] = noisy
        if on_chunk is not None:
            on_chunk(chunk, kv_cache)
    return output
