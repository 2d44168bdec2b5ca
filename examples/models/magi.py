"""MAGI-1 style AR video model: packed K/V in a lazily allocated buffer, GQA, staggered chunks.

How the family keeps its cache, and what this file reproduces (docs/design.md §5 ids):

* **F** - per layer, K and V are packed along the last dim, ``torch.cat([k, v], dim=-1)``, into
  one buffer ``[B, S, H_kv, 2D]`` that the attention allocates lazily the first time it runs, in
  the pipeline's :class:`InferenceParams` (``key_value_memory_dict[layer]``), and reads back with
  ``kv[..., :D]`` / ``kv[..., D:]``.
* **A** - writes are slice assignments of every token of the forward,
  ``buf[:, start:end] = kv``, and the read is the prefix ``buf[:, :end]``.
* GQA: 48 query heads share 8 K/V heads (``repeat_interleave`` before SDPA).
* Chunk-causal attention over several chunks at staggered noise levels: ``window`` chunks are in
  flight at once, each ``steps // window`` denoising steps behind the previous one; one forward
  advances all of them and a token of chunk ``c`` attends to every token of chunks ``<= c``
  (boolean SDPA mask). A chunk that finishes rides along once more at t=0, which rewrites its
  cache slot with clean K/V; only then does the window move past it.

Real dimensions (``real_config``): MAGI-1 24B width - 48 layers, dim 6144, 48 query heads and 8
K/V heads x 128, chunks of 6 latent frames (24 video frames), 4 chunks in flight, 480p latents
``60 x 104`` (1,560 tokens per latent frame). Weights are random; the model is a faithful cache
workload, not a video generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import (
    DiTConfig,
    RMSNorm,
    SwiGLUFFN,
    apply_rope_real,
    check_int,
    gate,
    model_device_dtype,
    modulate,
    new_generator,
    randn,
    rope_angles_3d,
    rope_cos_sin,
    sigma_schedule,
    wan_rope_axes,
)
from .dit import (ModulatedBlock, block_modulation, build_config, build_wan_dit, check_int_fields, config_of,
    head_out, prompt_states, time_modulations, tiny)


@dataclass(frozen=True, kw_only=True)
class MagiConfig(DiTConfig):
    """Architecture, sample geometry and the staggered sampler (``steps`` per chunk, ``window``
    chunks in flight; ``window`` must divide ``steps``)."""

    num_kv_heads: int
    chunk_frames: int = 6
    window: int = 4
    steps: int = 8
    shift: float = 3.0
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_int_fields(self, "num_kv_heads", "window", "steps")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.steps % self.window:
            raise ValueError(f"window={self.window} must divide steps={self.steps}")
        self.check_geometry()

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_frames * self.frame_tokens

    @property
    def stagger(self) -> int:
        """Denoising steps between the starts of consecutive chunks."""
        return self.steps // self.window


def tiny_config(**overrides: object) -> MagiConfig:
    """A 2-layer model, 6 query / 2 K/V heads x 64, on ``[B, 16, F, 4, 4]`` latents (4 tokens per
    frame), chunks of 2 frames, 2 steps with 2 chunks in flight: seconds on CPU."""
    return tiny(MagiConfig, overrides, dim=384, num_heads=6, num_kv_heads=2, latent_height=4, latent_width=4,
                chunk_frames=2, window=2, steps=2)


def real_config(**overrides: object) -> MagiConfig:
    """MAGI-1 at its real width: 48 layers, 48 query / 8 K/V heads x 128, 1,560 tokens per frame."""
    return build_config(MagiConfig, overrides, num_layers=48, dim=6144, num_heads=48, num_kv_heads=8,
                        ffn_dim=16384, text_dim=4096, text_len=800, latent_height=60, latent_width=104)


@dataclass
class InferenceParams:
    """What the pipeline hands every forward: the cache capacity and the per-layer packed K/V
    buffers (``[B, max_sequence_length, H_kv, 2D]``), allocated by the attention on first use."""

    max_sequence_length: int
    key_value_memory_dict: dict[int, torch.Tensor] = field(default_factory=dict)


class SelfAttention(nn.Module):
    """GQA self-attention writing packed K/V into the lazily allocated buffer (idioms A, F)."""

    def __init__(self, cfg: MagiConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.norm_q = RMSNorm(cfg.head_dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.head_dim, cfg.eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        params: InferenceParams,
        start: int,
    ) -> torch.Tensor:
        """``x [B, n, dim]`` holds tokens ``[start, start + n)`` of the video; ``cos``/``sin``
        ``[n, 1, D]`` fp32; ``mask [n, start + n]`` bool (True: attend). Returns ``[B, n, dim]``."""
        b, n, _ = x.shape
        d = self.head_dim
        q = apply_rope_real(self.norm_q(self.q(x).view(b, n, self.num_heads, d)), cos, sin)
        k, v = self.kv(x).view(b, n, 2, self.num_kv_heads, d).unbind(2)
        k = apply_rope_real(self.norm_k(k), cos, sin)
        memory = params.key_value_memory_dict
        if self.layer_idx not in memory:
            memory[self.layer_idx] = torch.zeros(
                b, params.max_sequence_length, self.num_kv_heads, 2 * d, dtype=x.dtype, device=x.device)
        buf = memory[self.layer_idx]
        end = start + n
        buf[:, start:end] = torch.cat([k, v], dim=-1)
        kv = buf[:, :end]
        groups = self.num_heads // self.num_kv_heads
        keys = kv[..., :d].transpose(1, 2).repeat_interleave(groups, dim=1)
        values = kv[..., d:].transpose(1, 2).repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        return self.o(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Cross-attention to the text tokens (recomputed every forward)."""

    def __init__(self, cfg: MagiConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class MagiBlock(ModulatedBlock):
    """AdaLN-modulated self-attention, cross-attention and SwiGLU FFN."""

    def __init__(self, cfg: MagiConfig, layer_idx: int) -> None:
        super().__init__()
        self.add_attention(cfg, SelfAttention(cfg, layer_idx), CrossAttention(cfg))
        self.add_ffn(cfg, SwiGLUFFN)
        self.modulation = block_modulation(cfg.dim)

    def forward(self, x, e, context, cos, sin, mask, params, start):
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(2)
        x = x + gate(self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin, mask, params, start), gate1)
        x = x + self.cross_attn(self.norm_cross(x), context)
        return self.ffn_residual(x, shift2, scale2, gate2)


class MagiModel(nn.Module):
    """DiT predicting the flow ``noise - x0`` of several consecutive chunks at their own noise levels."""

    def __init__(self, config: MagiConfig) -> None:
        super().__init__()
        build_wan_dit(self, config, MagiConfig, lambda i: MagiBlock(config, i))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        inference_params: InferenceParams,
        start_chunk: int,
    ) -> torch.Tensor:
        """Advance the chunks in flight by one step.

        Args:
            x: latents ``[B, C, F, H, W]`` of consecutive whole chunks, the first being chunk
                ``start_chunk`` of the video, in the model dtype.
            t: timesteps ``[B, F]`` fp32 in [0, 1000], one per frame (constant within a chunk).
            context: text encoder states ``[B, L, text_dim]``.
            inference_params: the pipeline's cache (buffers allocated here on first use).
            start_chunk: index of the first chunk of ``x`` in the video.

        Returns:
            The flow ``[B, C, F, H, W]``.
        """
        cfg = self.config
        tokens, (f, h, w) = self.patch_embedding(x)
        if f % cfg.chunk_frames:
            raise ValueError(f"x holds {f} frames, not whole chunks of {cfg.chunk_frames}")
        n = tokens.shape[1]
        chunk_tokens = cfg.chunk_frames * h * w
        start = start_chunk * chunk_tokens
        if start + n > inference_params.max_sequence_length:
            raise ValueError(f"tokens [{start}, {start + n}) exceed the cache capacity "
                             f"{inference_params.max_sequence_length}")
        first_frame = start_chunk * cfg.chunk_frames
        frame_pos = torch.arange(first_frame, first_frame + f, device=x.device)
        cos, sin = rope_cos_sin(rope_angles_3d(frame_pos, h, w, wan_rope_axes(cfg.head_dim), cfg.rope_theta))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        # Chunk-causal: a query of chunk c sees every key of chunks <= c (history included).
        q_chunk = torch.arange(n, device=x.device) // chunk_tokens + start_chunk
        k_chunk = torch.arange(start + n, device=x.device) // chunk_tokens
        mask = k_chunk[None, :] <= q_chunk[:, None]
        e, e0 = time_modulations(self, t)
        ctx = self.text_embedding(context)
        for block in self.blocks:
            tokens = block(tokens, e0, ctx, cos, sin, mask, inference_params, start)
        return head_out(self, tokens, e, (f, h, w))


def _config_of(model: nn.Module) -> MagiConfig:
    return config_of(model, MagiConfig, "MagiModel")


def schedule(num_chunks: int, config: MagiConfig) -> list[list[tuple[int, int]]]:
    """The staggered pipeline: per forward, ``(chunk, step)`` of every chunk in it, in order.

    Chunk ``c`` takes its denoising steps ``0..steps-1`` at forwards ``c * stagger + k`` and rides
    once more at step ``steps`` (t=0, clean K/V) in forward ``c * stagger + steps``.
    """
    check_int("num_chunks", num_chunks)
    s, steps = config.stagger, config.steps
    forwards = (num_chunks - 1) * s + steps + 1
    return [[(c, g - c * s) for c in range(num_chunks) if 0 <= g - c * s <= steps] for g in range(forwards)]


@torch.no_grad()
def generate(
    model: nn.Module,
    num_chunks: int,
    seed: int,
    *,
    batch_size: int = 1,
    context: torch.Tensor | None = None,
    inference_params: InferenceParams | None = None,
    progress: bool = True,
    cache_hook: Callable[[InferenceParams], None] | None = None,
) -> torch.Tensor:
    """Generate ``num_chunks`` chunks with MAGI-1's staggered chunk pipeline (:func:`schedule`).

    Args:
        model: a :class:`MagiModel`, eager or ``torch.compile``d.
        num_chunks: chunks of ``config.chunk_frames`` latent frames.
        seed: seeds all noise (and the stand-in text embedding when ``context`` is None).
        batch_size: videos generated together.
        context: text encoder states ``[B, text_len, text_dim]``; random when None.
        inference_params: the cache to use (default: a fresh one sized for the whole video).
        progress: show a tqdm bar over forwards.
        cache_hook: called with the cache before every forward (e.g. to convert the buffers
            allocated so far with ``qvg_compile.compress(params.key_value_memory_dict, ...)``).

    Returns:
        Latents ``[B, C, num_chunks * chunk_frames, H, W]`` in the model dtype.
    """
    cfg = _config_of(model)
    check_int("batch_size", batch_size)
    plan = schedule(num_chunks, cfg)
    device, dtype = model_device_dtype(model)
    gen = new_generator(device, seed)
    context = prompt_states(context, cfg, batch_size, gen, device, dtype)
    if inference_params is None:
        inference_params = InferenceParams(num_chunks * cfg.chunk_tokens)
    sigmas = sigma_schedule(cfg.steps, cfg.shift)
    f = cfg.chunk_frames
    shape = cfg.latent_shape(batch_size, f)
    latents: dict[int, torch.Tensor] = {}
    for active in tqdm(plan, desc="magi", unit="forward", disable=not progress):
        for c, k in active:
            if k == 0:
                latents[c] = randn(shape, gen, dtype)
        x = torch.cat([latents[c] for c, _ in active], dim=2)
        t = torch.cat([torch.full((batch_size, f), 1000.0 * sigmas[k], device=device) for _, k in active], dim=1)
        if cache_hook is not None:
            cache_hook(inference_params)
        flow = model(x, t, context, inference_params, active[0][0]).float()
        for i, (c, k) in enumerate(active):
            if k < cfg.steps:
                step = flow[:, :, i * f:(i + 1) * f]
                latents[c] = (latents[c].float() + (sigmas[k + 1] - sigmas[k]) * step).to(dtype)
    return torch.cat([latents[c] for c in range(num_chunks)], dim=2)
