"""Self-Forcing / CausVid style AR video model: a causal Wan 2.1 DiT with a pipeline-owned KV cache.

How the family keeps its cache, and what this file reproduces (docs/design.md §5 ids):

* **A** - the pipeline allocates, per layer, ``{"k": [B, S, H, D], "v": [B, S, H, D],
  "global_end_index": tensor([0]), "local_end_index": tensor([0])}`` and passes the list into
  every forward. The self-attention writes the current chunk by slice assignment
  ``kv_cache["k"][:, local_start:local_end] = roped_k`` and reads the prefix back from the same
  buffer, ``kv_cache["k"][:, max(0, local_end - max_attention_size):local_end]``, then SDPA on
  ``[B, H, N, D]``. K is stored *after* RoPE (Wan's complex fp64 3D RoPE), so the cache holds
  position-bearing keys.
* **B** - with ``local_attn_size != -1`` the buffer is a rolling window of ``local_attn_size``
  frames whose first ``sink_size`` frames are never evicted: on overflow the kept tail is shifted
  left with ``buf[:, sink:sink+r] = buf[:, sink+ev:sink+ev+r].clone()`` and the chunk is written at
  the end.
* **G** - the write position comes from ``.item()`` on the index tensors and is committed with
  ``fill_``: a graph break, so under ``torch.compile`` the write and the read of one layer can
  land in different graphs.
* The cross-attention caches the text K/V once per video in ``{"k", "v", "is_init"}`` (the
  tensors are replaced on first use, ``is_init`` flips to ``True``).

Only the last write to a slot lasts: each chunk of 3 latent frames is denoised in 4 forwards
(timesteps 1000/750/500/250, x0 prediction then re-noising) that all write the same slot, then one
clean forward at t=0 rewrites it with the K/V the next chunks will read.

Real dimensions (``real_config``): Wan 2.1 1.3B - 30 layers, dim 1536, 12 heads x 128, FFN 8960,
text 512 tokens x 4096 (umT5), latents ``[B, 16, F, 60, 104]`` -> 1,560 tokens per latent frame.
Weights are random; the model is a faithful cache workload, not a video generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import (
    DiTConfig,
    GeluFFN,
    RMSNorm,
    apply_rope_complex,
    check_int,
    gate,
    model_device_dtype,
    modulate,
    new_generator,
    randn,
    rope_angles_3d,
    rope_complex,
    shifted_sigma,
    timesteps_for,
    unpatchify,
    wan_rope_axes,
)
from .dit import (ModulatedBlock, block_modulation, build_config, build_wan_dit, check_int_fields, config_of,
    prompt_states, time_modulations, tiny)

KVCache = list[dict[str, torch.Tensor]]
"""Self-attention cache: one dict per layer, ``k``/``v`` ``[B, S, H, D]`` in the model dtype,
``global_end_index``/``local_end_index`` ``[1]`` int64 (tokens)."""

CrossAttnCache = list[dict[str, torch.Tensor | bool]]
"""Cross-attention cache: one dict per layer, ``k``/``v`` ``[B, L, H, D]``, ``is_init`` bool."""


@dataclass(frozen=True)
class SelfForcingConfig(DiTConfig):
    """Architecture and sample geometry. ``local_attn_size``/``sink_size`` are in latent frames;
    ``local_attn_size=-1`` means global attention over a cache sized by ``generate(max_frames=)``."""

    chunk_frames: int = 3
    local_attn_size: int = -1
    sink_size: int = 0
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_int_fields(self)
        check_int("sink_size", self.sink_size, minimum=0)
        self.check_geometry("the causal cache")
        if self.local_attn_size != -1:
            # The rolled part must stay non-negative after evicting to fit a whole new chunk.
            if self.local_attn_size < self.sink_size + self.chunk_frames:
                raise ValueError(
                    f"local_attn_size={self.local_attn_size} must be -1 or >= sink_size + "
                    f"chunk_frames = {self.sink_size + self.chunk_frames}"
                )
        elif self.sink_size:
            raise ValueError("sink_size only applies to a rolling window (local_attn_size != -1)")


def tiny_config(**overrides: object) -> SelfForcingConfig:
    """A 2-layer model, 2 heads x 64, on ``[B, 16, F, 4, 4]`` latents (4 tokens per frame): seconds on CPU."""
    return tiny(SelfForcingConfig, overrides, latent_height=4, latent_width=4)


def real_config(**overrides: object) -> SelfForcingConfig:
    """Wan 2.1 1.3B at 480x832 (latents 60x104, 1,560 tokens per latent frame)."""
    return build_config(SelfForcingConfig, overrides, num_layers=30, dim=1536, num_heads=12, ffn_dim=8960,
                        text_dim=4096, text_len=512, latent_height=60, latent_width=104)


class WanAttention(nn.Module):
    """The layers of Wan's attention: q/k/v/o projections and RMS norms of q and k over all heads
    at once. Wan's cross-attention is its self-attention class with another forward, so both
    attentions here start from these."""

    def __init__(self, cfg: SelfForcingConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)


class CausalSelfAttention(WanAttention):
    """Self-attention of one block, reading and writing the pipeline's KV cache (idioms A, B, G)."""

    def __init__(self, cfg: SelfForcingConfig) -> None:
        super().__init__(cfg)
        self.local_attn_size = cfg.local_attn_size
        self.sink_size = cfg.sink_size

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        kv_cache: dict[str, torch.Tensor],
        current_start: int,
        frame_tokens: int,
    ) -> torch.Tensor:
        """``x [B, N, dim]``, ``freqs [N, D/2]`` complex128 (RoPE of this chunk's absolute
        positions); writes tokens ``[current_start, current_start + N)`` of the video into
        ``kv_cache`` and attends to the cached prefix. Returns ``[B, N, dim]``."""
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(x)).view(b, n, self.num_heads, self.head_dim)
        v = self.v(x).view(b, n, self.num_heads, self.head_dim)
        roped_q = apply_rope_complex(q, freqs)
        roped_k = apply_rope_complex(k, freqs)

        capacity = kv_cache["k"].shape[1]
        current_end = current_start + n
        global_end = kv_cache["global_end_index"].item()
        local_end_prev = kv_cache["local_end_index"].item()
        # A forward on a new chunk advances the global end; re-denoising the same chunk does not,
        # so it lands on the same slot and overwrites it.
        advance = current_end - global_end
        sink = self.sink_size * frame_tokens
        if self.local_attn_size != -1 and advance > 0 and local_end_prev + n > capacity:
            evicted = local_end_prev + n - capacity
            kept = local_end_prev - evicted - sink
            # clone(): source and destination overlap whenever kept > evicted.
            kv_cache["k"][:, sink:sink + kept] = kv_cache["k"][:, sink + evicted:sink + evicted + kept].clone()
            kv_cache["v"][:, sink:sink + kept] = kv_cache["v"][:, sink + evicted:sink + evicted + kept].clone()
            local_end = local_end_prev + advance - evicted
        else:
            local_end = local_end_prev + advance
        local_start = local_end - n
        if local_start < 0 or local_end > capacity:
            raise ValueError(
                f"KV cache of {capacity} tokens cannot hold tokens [{local_start}, {local_end}): "
                "allocate more frames (generate(max_frames=...)) or use a rolling window"
            )
        kv_cache["k"][:, local_start:local_end] = roped_k
        kv_cache["v"][:, local_start:local_end] = v

        max_attention_size = capacity if self.local_attn_size == -1 else self.local_attn_size * frame_tokens
        lo = max(0, local_end - max_attention_size)
        out = F.scaled_dot_product_attention(
            roped_q.transpose(1, 2),
            kv_cache["k"][:, lo:local_end].transpose(1, 2),
            kv_cache["v"][:, lo:local_end].transpose(1, 2),
        )
        kv_cache["global_end_index"].fill_(current_end)
        kv_cache["local_end_index"].fill_(local_end)
        return self.o(out.transpose(1, 2).flatten(2))


class CachedCrossAttention(WanAttention):
    """Cross-attention to the text tokens, whose K/V are computed once per video and cached."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, crossattn_cache: dict) -> torch.Tensor:
        """``x [B, N, dim]``, ``context [B, L, dim]`` (embedded text) -> ``[B, N, dim]``."""
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, self.head_dim)
        if not crossattn_cache["is_init"]:
            crossattn_cache["k"] = self.norm_k(self.k(context)).view(b, -1, self.num_heads, self.head_dim)
            crossattn_cache["v"] = self.v(context).view(b, -1, self.num_heads, self.head_dim)
            crossattn_cache["is_init"] = True
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), crossattn_cache["k"].transpose(1, 2), crossattn_cache["v"].transpose(1, 2)
        )
        return self.o(out.transpose(1, 2).flatten(2))


class CausalWanBlock(ModulatedBlock):
    """Wan block: AdaLN-modulated self-attention, cross-attention to text, AdaLN-modulated FFN."""

    def __init__(self, cfg: SelfForcingConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = CausalSelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.cross_attn = CachedCrossAttention(cfg)
        self.add_ffn(cfg, GeluFFN)
        self.modulation = block_modulation(cfg.dim)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor,
        freqs: torch.Tensor,
        kv_cache: dict[str, torch.Tensor],
        crossattn_cache: dict,
        current_start: int,
        frame_tokens: int,
    ) -> torch.Tensor:
        """``x [B, N, dim]``, ``e [B, F, 6, dim]`` per-frame modulation -> ``[B, N, dim]``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(2)
        y = self.self_attn(modulate(self.norm1(x), shift1, scale1), freqs, kv_cache, current_start, frame_tokens)
        x = x + gate(y, gate1)
        x = x + self.cross_attn(self.norm3(x), context, crossattn_cache)
        return self.ffn_residual(x, shift2, scale2, gate2)


class SelfForcingModel(nn.Module):
    """Causal Wan 2.1 DiT predicting the flow ``noise - x0`` for one chunk of latent frames."""

    def __init__(self, config: SelfForcingConfig) -> None:
        super().__init__()
        # Wan's head takes its shift and scale from learnt offsets on the time embedding, no Linear.
        build_wan_dit(self, config, SelfForcingConfig, lambda _: CausalWanBlock(config), ada_head=False)
        self.head_modulation = nn.Parameter(torch.randn(1, 1, 2, config.dim) / config.dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        kv_cache: KVCache,
        crossattn_cache: CrossAttnCache,
        current_start: int,
    ) -> torch.Tensor:
        """Denoise one chunk.

        Args:
            x: noisy latents ``[B, C, F, H, W]`` in the model dtype (F = frames of this chunk).
            t: timesteps ``[B, F]`` fp32 in [0, 1000], one per latent frame.
            context: text encoder states ``[B, L, text_dim]`` in the model dtype.
            kv_cache: per-layer self-attention cache (see :data:`KVCache`), mutated in place.
            crossattn_cache: per-layer text K/V cache (see :data:`CrossAttnCache`), filled on first use.
            current_start: index of the chunk's first token in the whole video
                (``first_frame * frame_tokens``).

        Returns:
            The predicted flow ``[B, C, F, H, W]`` in the model dtype.
        """
        cfg = self.config
        if len(kv_cache) != cfg.num_layers or len(crossattn_cache) != cfg.num_layers:
            raise ValueError(f"expected {cfg.num_layers} cache entries per cache, got "
                             f"{len(kv_cache)} and {len(crossattn_cache)}")
        tokens, grid = self.patch_embedding(x)
        f, h, w = grid
        frame_tokens = h * w
        if current_start % frame_tokens:
            raise ValueError(f"current_start={current_start} is not a multiple of {frame_tokens} tokens per frame")
        start_frame = current_start // frame_tokens
        frame_pos = torch.arange(start_frame, start_frame + f, device=x.device)
        freqs = rope_complex(rope_angles_3d(frame_pos, h, w, wan_rope_axes(cfg.head_dim), cfg.rope_theta))

        e, e0 = time_modulations(self, t)
        ctx = self.text_embedding(context)
        for block, kv, ca in zip(self.blocks, kv_cache, crossattn_cache):
            tokens = block(tokens, e0, ctx, freqs, kv, ca, current_start, frame_tokens)
        shift, scale = (self.head_modulation + e.unsqueeze(2)).unbind(2)
        out = self.head(modulate(self.head_norm(tokens), shift, scale))
        return unpatchify(out, grid, cfg.patch_size, cfg.in_channels)


def _config_of(model: nn.Module) -> SelfForcingConfig:
    """The config of a :class:`SelfForcingModel`, also through a ``torch.compile`` wrapper."""
    return config_of(model, SelfForcingConfig, "SelfForcingModel")


def init_kv_cache(model: nn.Module, batch_size: int, max_frames: int | None = None) -> KVCache:
    """Allocate the self-attention cache as the Self-Forcing pipeline does.

    Capacity is ``local_attn_size`` frames for a rolling window, else ``max_frames`` frames
    (required then). Buffers are zeros in the model's dtype and device: ``[B, S, H, D]`` with
    ``S = frames * frame_tokens`` (1,560 per frame for the real config).
    """
    cfg = _config_of(model)
    check_int("batch_size", batch_size)
    if cfg.local_attn_size != -1:
        if max_frames is not None:
            raise ValueError("a rolling-window model's cache holds local_attn_size frames: leave max_frames unset")
        frames = cfg.local_attn_size
    else:
        if max_frames is None:
            raise ValueError("max_frames is required for a global-attention cache")
        frames = check_int("max_frames", max_frames)
    return kv_buffers(model, (batch_size, frames * cfg.frame_tokens, cfg.num_heads, cfg.head_dim))


def kv_buffers(model: nn.Module, shape: tuple[int, int, int, int]) -> KVCache:
    """One fresh :data:`KVCache` entry per layer: zero ``k``/``v`` of ``shape`` ``[B, S, H, D]`` in
    the model's dtype and device, both end indices at 0."""
    device, dtype = model_device_dtype(model)
    return [
        {
            "k": torch.zeros(shape, dtype=dtype, device=device),
            "v": torch.zeros(shape, dtype=dtype, device=device),
            "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
            "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
        }
        for _ in range(model.config.num_layers)
    ]


def init_crossattn_cache(model: nn.Module, batch_size: int) -> CrossAttnCache:
    """Allocate the text K/V cache ``[B, text_len, H, D]`` per layer, not yet initialised."""
    cfg = _config_of(model)
    check_int("batch_size", batch_size)
    return crossattn_buffers(model, (batch_size, cfg.text_len, cfg.num_heads, cfg.head_dim))


def crossattn_buffers(model: nn.Module, shape: tuple[int, int, int, int]) -> CrossAttnCache:
    """One :data:`CrossAttnCache` entry per layer: zero ``k``/``v`` of ``shape`` ``[B, L, H, D]``,
    not yet initialised."""
    device, dtype = model_device_dtype(model)
    return [
        {"k": torch.zeros(shape, dtype=dtype, device=device),
         "v": torch.zeros(shape, dtype=dtype, device=device),
         "is_init": False}
        for _ in range(model.config.num_layers)
    ]


@torch.no_grad()
def generate(
    model: nn.Module,
    num_chunks: int,
    seed: int,
    *,
    batch_size: int = 1,
    max_frames: int | None = None,
    context: torch.Tensor | None = None,
    denoising_steps: Sequence[float] = (1000.0, 750.0, 500.0, 250.0),
    shift: float = 5.0,
    progress: bool = True,
    kv_cache: KVCache | None = None,
    crossattn_cache: CrossAttnCache | None = None,
    on_chunk: Callable[[int, KVCache], None] | None = None,
) -> torch.Tensor:
    """Generate ``num_chunks`` chunks the way Self-Forcing's causal inference pipeline does.

    Per chunk: one forward per denoising step (x0 prediction, then re-noising to the next step's
    level), then a clean forward at t=0 that rewrites the chunk's cache slot.

    Args:
        model: a :class:`SelfForcingModel`, eager or ``torch.compile``d.
        num_chunks: chunks of ``config.chunk_frames`` latent frames to generate.
        seed: seeds all noise (and the stand-in text embedding when ``context`` is None).
        batch_size: videos generated together.
        max_frames: cache capacity in latent frames for global attention (default: the whole
            video); must be unset for a rolling window, whose capacity is ``local_attn_size``.
        context: text encoder states ``[B, text_len, text_dim]``; random when None.
        denoising_steps: timesteps in [0, 1000] of the few-step sampler, before the shift.
        shift: flow-matching schedule shift.
        progress: show a tqdm bar over chunks.
        kv_cache: a cache from :func:`init_kv_cache` to use instead of a fresh one (the pipeline
            owns it: pass one to inspect it afterwards, or one converted by
            ``qvg_compile.compress`` to run the eager model on a compressed cache).
        crossattn_cache: likewise, from :func:`init_crossattn_cache`.
        on_chunk: called after each chunk's clean pass with ``(chunk_index, kv_cache)``.

    Returns:
        Latents ``[B, 16, num_chunks * chunk_frames, H, W]`` in the model dtype.
    """
    cfg = _config_of(model)
    check_int("num_chunks", num_chunks)
    check_int("batch_size", batch_size)
    steps = [float(s) for s in denoising_steps]
    if not steps:
        raise ValueError("denoising_steps must not be empty")
    sigmas = [shifted_sigma(s, shift) for s in steps]
    device, dtype = model_device_dtype(model)
    total_frames = num_chunks * cfg.chunk_frames
    if cfg.local_attn_size == -1 and max_frames is None:
        max_frames = total_frames
    gen = new_generator(device, seed)
    context = prompt_states(context, cfg, batch_size, gen, device, dtype)

    if kv_cache is None:
        kv_cache = init_kv_cache(model, batch_size, max_frames)
    if crossattn_cache is None:
        crossattn_cache = init_crossattn_cache(model, batch_size)
    if len(kv_cache) != cfg.num_layers or len(crossattn_cache) != cfg.num_layers:
        raise ValueError(f"kv_cache and crossattn_cache must hold {cfg.num_layers} layers, got "
                         f"{len(kv_cache)} and {len(crossattn_cache)}")
    output = torch.zeros(cfg.latent_shape(batch_size, total_frames), dtype=dtype, device=device)
    for chunk in tqdm(range(num_chunks), desc="self_forcing", unit="chunk", disable=not progress):
        current_start = chunk * cfg.chunk_frames * cfg.frame_tokens
        denoised = sample_chunk(model, sigmas, gen, context, kv_cache, crossattn_cache, current_start)
        output[:, :, chunk * cfg.chunk_frames:(chunk + 1) * cfg.chunk_frames] = denoised
        if on_chunk is not None:
            on_chunk(chunk, kv_cache)
    return output


def sample_chunk(model: nn.Module, sigmas: Sequence[float], gen: torch.Generator, context: torch.Tensor,
                 kv_cache: KVCache, crossattn_cache: CrossAttnCache, current_start: int) -> torch.Tensor:
    """One chunk of Self-Forcing's few-step sampler from noise drawn from ``gen``: per noise level a
    forward (x0 prediction, then re-noising to the next level), then the clean forward at t=0 that
    rewrites the chunk's cache slot. Returns the chunk's latents ``[B, C, chunk_frames, H, W]``."""
    cfg = model.config
    device, dtype = model_device_dtype(model)
    batch_size = context.shape[0]
    shape = cfg.latent_shape(batch_size, cfg.chunk_frames)
    t_shape = (batch_size, cfg.chunk_frames)
    noisy = randn(shape, gen, dtype)
    for i, sigma in enumerate(sigmas):
        flow = model(noisy, timesteps_for(sigma, t_shape, device), context, kv_cache, crossattn_cache, current_start)
        x0 = noisy.float() - sigma * flow.float()
        if i + 1 < len(sigmas):
            nxt = sigmas[i + 1]
            noisy = ((1.0 - nxt) * x0 + nxt * randn(shape, gen, torch.float32)).to(dtype)
    denoised = x0.to(dtype)
    model(denoised, timesteps_for(0.0, t_shape, device), context, kv_cache, crossattn_cache, current_start)
    return denoised
