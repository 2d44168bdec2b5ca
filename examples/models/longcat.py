"""LongCat-Video style AR video model: a functional cache of pre-RoPE K/V, re-encoded each chunk.

This file calls its model the way LongCat-Video's own continuation pipeline calls its DiT
(``pipeline_longcat_video.py``, ``modules/longcat_video_dit.py``, ``modules/attention.py`` of the
public repository meituan-longcat/LongCat-Video), so that what the backend sees is what a user's
LongCat run shows it. Cache idioms (docs/design.md §5 ids):

* **D** - every chunk after the first starts with a *cache pass*: the DiT runs over the
  conditioning latent frames (the already generated ones) at t=0 with ``return_kv=True`` and
  ``skip_crs_attn=True``. Each block's attention keeps ``k.clone(), v.clone()`` *before* RoPE;
  the DiT returns them in a dict ``{layer: (k, v)}`` of ``[B, H, N, D]`` tensors, through
  ``.contiguous()`` (a copy: the clones are strided views of the projection), or ``.cpu()`` with
  ``offload_kv_cache``. The pipeline keeps that dict on itself and hands it to every denoising
  call as ``kv_cache_dict=``; each block looks its entry up with ``kv_cache_dict.get(i)`` and
  moves it with ``.to(x.device)``.
* **E** - the denoising attention (``forward_with_kv_cache``) repeats the cache along batch when
  it was made at batch 1 (CFG runs at batch 2), concatenates ``cat([k_cache, k], 2).contiguous()``,
  pads the queries with ``cat([torch.empty_like(k_cache), q], 2)`` so that one RoPE call over the
  whole ``(T + num_cond_latents, H, W)`` grid rotates both, then slices the queries back out.
* The attention itself runs on ``[B, S, H, D]`` through ``flash_attn_func`` (a stand-in that
  calls SDPA here: flash-attn is not a dependency), between two context-parallel all-to-alls
  decorated ``@torch.compiler.disable`` (identities without context parallelism): the graph
  breaks there, so the ``cat`` and RoPE of the cache run in one graph and the attention that
  reads the result in the next.
* Text: the prompt states are packed to ``[1, sum(valid), C]`` with ``masked_select`` and the
  valid lengths read with ``mask.sum(1).tolist()`` (a graph break before the blocks); cross
  attention runs per prompt over its own tokens.

Loop: chunk 0 is generated without a cache; every later chunk runs the cache pass over the
history (all generated frames, or the last ``cond_frames`` of them), then ``num_steps`` Euler
flow-matching steps, each one CFG forward at batch ``2B`` reading the cache.

Real dimensions (``real_config``): 48 layers, dim 4096, 32 heads x 128, SwiGLU FFN, umT5 text
(512 x 4096), 480p latents ``60 x 104`` (1,560 tokens per latent frame). Weights are random; the
model is a faithful cache workload, not a video generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import (
    DiTConfig,
    RMSNorm,
    SwiGLUFFN,
    check_int,
    gate,
    model_device_dtype,
    modulate,
    new_generator,
    randn,
    rope_angles_3d,
    rope_cos_sin,
    sigma_schedule,
    timesteps_for,
    wan_rope_axes,
)
from .dit import (ModulatedBlock, block_modulation, build_config, build_wan_dit, check_int_fields, config_of,
    head_out, prompt_states, time_modulations, tiny)

KVCacheDict = dict[int, tuple[torch.Tensor, torch.Tensor]]
"""Layer index -> ``(k, v)``, each ``[B, H, N, D]`` pre-RoPE K and V of the conditioning frames,
in the model dtype (on the host when offloaded): what the cache pass returns."""


@dataclass(frozen=True)
class LongCatConfig(DiTConfig):
    """Architecture, sample geometry and sampler. ``cond_frames=None`` conditions every chunk on
    the whole history; an int keeps only the last ``cond_frames`` latent frames."""

    chunk_frames: int = 4
    cond_frames: int | None = None
    num_steps: int = 4
    guidance_scale: float = 4.0
    shift: float = 3.0
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_int_fields(self, "num_steps", optional=("cond_frames",))
        self.check_geometry()


def tiny_config(**overrides: object) -> LongCatConfig:
    """A 2-layer model, 2 heads x 64, on ``[B, 16, F, 4, 4]`` latents (4 tokens per frame), chunks of
    2 frames and 2 sampling steps: seconds on CPU."""
    return tiny(LongCatConfig, overrides, latent_height=4, latent_width=4, chunk_frames=2, num_steps=2)


def real_config(**overrides: object) -> LongCatConfig:
    """LongCat-Video at its real width: 48 layers, 32 heads x 128, 480p latents (60 x 104)."""
    return build_config(LongCatConfig, overrides, num_layers=48, dim=4096, num_heads=32, ffn_dim=11008,
                        text_dim=4096, text_len=512, latent_height=60, latent_width=104)


@torch.compiler.disable
def context_parallel_a2a_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LongCat wraps its attention in Ulysses all-to-alls excluded from compilation; without
    context parallelism they hand the tensors back unchanged, but the graph breaks around them."""
    return q, k, v


@torch.compiler.disable
def context_parallel_a2a_out(x: torch.Tensor) -> torch.Tensor:
    """The all-to-all after attention (see `context_parallel_a2a_in`)."""
    return x


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Stand-in for flash-attn's ``flash_attn_func`` on ``[B, S, H, D]`` (SDPA underneath)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
    return out.transpose(1, 2)


class Rope3d(nn.Module):
    """Wan's 3D RoPE on interleaved pairs, tables kept per latent grid as LongCat's module does."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.axes = wan_rope_axes(head_dim)
        self.theta = theta
        self.tables: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``q``, ``k`` ``[B, H, T*h*w, D]`` rotated at frame positions ``0..T-1`` of ``grid = (T, h, w)``."""
        if grid not in self.tables:
            t, h, w = grid
            self.tables[grid] = rope_cos_sin(rope_angles_3d(torch.arange(t), h, w, self.axes, self.theta))
        cos, sin = (x.to(q.device) for x in self.tables[grid])
        return rope_pairs_sized(q, cos, sin), rope_pairs_sized(k, cos, sin)


def rope_pairs_sized(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope_real` spelled as LongCat-Video's RoPE is (``einops.rearrange`` from
    ``[..., D]`` to ``[..., D/2, 2]`` and back): reshapes that write every size out, the token
    count included, which is what the compiled graph sees. ``x`` ``[B, H, N, D]``."""
    xf = x.float()
    b, h, n, d = xf.shape
    pairs = xf.reshape(b, h, n, d // 2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(b, h, n, d)
    return (xf * cos + rotated * sin).to(x.dtype)


class SelfAttention(nn.Module):
    """Self-attention; ``forward`` serves the cache pass and chunk 0, ``forward_with_kv_cache`` the
    denoising calls over ``[cached history ; new tokens]`` (idioms D, E)."""

    def __init__(self, cfg: LongCatConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.rope_3d = Rope3d(cfg.head_dim, cfg.rope_theta)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _process_attn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[B, H, S, D]`` in and out, through flash-attn's ``[B, S, H, D]`` layout, between the
        compiler-disabled context-parallel exchanges."""
        q, k, v = context_parallel_a2a_in(q, k, v)
        x = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=self.scale)
        return context_parallel_a2a_out(x.transpose(1, 2))

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x: torch.Tensor, shape: tuple[int, int, int], num_cond_latents: int,
                return_kv: bool) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [B, N, dim]`` over the grid ``shape``; with ``return_kv`` also this forward's pre-RoPE
        ``(k, v)`` ``[B, H, N, D]``. With ``num_cond_latents`` frames of conditioning in front, those
        attend among themselves and the rest attend to everything."""
        q, k, v = self._qkv(x)
        if return_kv:
            k_cache, v_cache = k.clone(), v.clone()
        q, k = self.rope_3d(q, k, shape)
        if num_cond_latents > 0:
            cond = num_cond_latents * (x.shape[1] // shape[0])
            x_cond = self._process_attn(q[:, :, :cond].contiguous(), k[:, :, :cond].contiguous(),
                                        v[:, :, :cond].contiguous())
            x_noise = self._process_attn(q[:, :, cond:].contiguous(), k, v)
            out = torch.cat([x_cond, x_noise], dim=2)
        else:
            out = self._process_attn(q, k, v)
        out = self._out(out)
        return (out, (k_cache, v_cache)) if return_kv else out

    def forward_with_kv_cache(self, x: torch.Tensor, shape: tuple[int, int, int], num_cond_latents: int,
                              kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x [B, n, dim]`` of the new frames (grid ``shape``) attending to the cached
        ``num_cond_latents`` frames and themselves; ``kv_cache`` at batch ``B`` or 1."""
        b, n, _ = x.shape
        q, k, v = self._qkv(x)
        t, h, w = shape
        k_cache, v_cache = kv_cache
        if k_cache.shape[0] not in (1, b) or v_cache.shape[0] != k_cache.shape[0]:
            raise ValueError(f"kv_cache: expected K and V at batch 1 or {b}, "
                             f"got {k_cache.shape[0]} and {v_cache.shape[0]}")
        if k_cache.shape[0] == 1:
            k_cache = k_cache.repeat(b, 1, 1, 1)
            v_cache = v_cache.repeat(b, 1, 1, 1)
        k_full = torch.cat([k_cache, k], dim=2).contiguous()
        v_full = torch.cat([v_cache, v], dim=2).contiguous()
        q_padding = torch.cat([torch.empty_like(k_cache), q], dim=2).contiguous()
        q_padding, k_full = self.rope_3d(q_padding, k_full, (t + num_cond_latents, h, w))
        q = q_padding[:, :, -n:].contiguous()
        return self._out(self._process_attn(q, k_full, v_full))


class CrossAttention(nn.Module):
    """Cross-attention of each video to its own valid prompt tokens (LongCat runs it varlen)."""

    def __init__(self, cfg: LongCatConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q_linear = nn.Linear(cfg.dim, cfg.dim)
        self.kv_linear = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_seqlens: list[int]) -> torch.Tensor:
        """``x [B, n, dim]``, ``y [1, sum(y_seqlens), dim]`` packed prompts -> ``[B, n, dim]``."""
        b, n, _ = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(y[0]).view(-1, 2, self.num_heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)
        outs = [F.scaled_dot_product_attention(q[i:i + 1], kb.unsqueeze(0), vb.unsqueeze(0))
                for i, (kb, vb) in enumerate(zip(k.split(y_seqlens, dim=1), v.split(y_seqlens, dim=1)))]
        return self.proj(torch.cat(outs).transpose(1, 2).flatten(2))


class LongCatBlock(ModulatedBlock):
    """AdaLN-modulated self-attention, cross-attention, AdaLN-modulated SwiGLU FFN."""

    def __init__(self, cfg: LongCatConfig) -> None:
        super().__init__()
        self.add_attention(cfg, SelfAttention(cfg), CrossAttention(cfg))
        self.add_ffn(cfg, SwiGLUFFN)
        self.modulation = block_modulation(cfg.dim)

    def forward(self, x, y, e, y_seqlens, latent_shape, num_cond_latents, return_kv, kv_cache, skip_crs_attn):
        """``x [B, n, dim]``, ``e [B, F, 6, dim]`` per-frame modulation -> ``[B, n, dim]`` (and, with
        ``return_kv``, this block's pre-RoPE ``(k, v)``)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(2)
        x_m = modulate(self.norm1(x), shift1, scale1)
        if kv_cache is not None:
            kv_cache = (kv_cache[0].to(x.device), kv_cache[1].to(x.device))
            y_attn = self.attn.forward_with_kv_cache(x_m, latent_shape, num_cond_latents, kv_cache)
        else:
            y_attn = self.attn(x_m, latent_shape, num_cond_latents, return_kv)
        if return_kv:
            y_attn, kv_cache = y_attn
        x = x + gate(y_attn, gate1)
        if not skip_crs_attn:
            x = x + self.cross_attn(self.norm_cross(x), y, y_seqlens)
        x = self.ffn_residual(x, shift2, scale2, gate2)
        return (x, kv_cache) if return_kv else x


class LongCatModel(nn.Module):
    """DiT predicting the flow ``noise - x0`` of new latent frames, conditioned on cached history."""

    def __init__(self, config: LongCatConfig) -> None:
        super().__init__()
        build_wan_dit(self, config, LongCatConfig, lambda _: LongCatBlock(config))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        num_cond_latents: int = 0,
        return_kv: bool = False,
        kv_cache_dict: KVCacheDict | None = None,
        skip_crs_attn: bool = False,
        offload_kv_cache: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCacheDict]:
        """Denoise new frames, or (``return_kv=True``) encode conditioning frames into a cache.

        Args:
            hidden_states: latents ``[B, C, T, H, W]``.
            timestep: ``[B]`` or ``[B, T]`` in [0, 1000] (0 for the cache pass).
            encoder_hidden_states: prompt states ``[B, 1, L, text_dim]``.
            encoder_attention_mask: ``[B, 1, 1, L]`` (1 for valid tokens), or None (all valid).
            num_cond_latents: latent frames of conditioning the cache holds (denoising calls).
            return_kv: also return each layer's pre-RoPE K/V (:data:`KVCacheDict`).
            kv_cache_dict: the cache pass's output, at batch ``B`` or 1; ``{}``/None: no cache.
            skip_crs_attn: no cross-attention (the cache pass).
            offload_kv_cache: return the K/V on the host.

        Returns:
            The flow ``[B, C, T, H, W]`` fp32; with ``return_kv``, ``(flow, kv_cache_dict)``.
        """
        cfg = self.config
        kv_cache_dict = {} if kv_cache_dict is None else kv_cache_dict
        b, _, frames, _, _ = hidden_states.shape
        if timestep.dim() == 1:
            timestep = timestep.unsqueeze(1).expand(-1, frames)
        dtype = self.head.weight.dtype
        tokens, grid = self.patch_embedding(hidden_states.to(dtype))
        e, e0 = time_modulations(self, timestep.float())
        y = self.text_embedding(encoder_hidden_states.to(dtype))
        if encoder_attention_mask is not None:
            mask = encoder_attention_mask.squeeze(1).squeeze(1)
            y = y.squeeze(1).masked_select(mask.unsqueeze(-1) != 0).view(1, -1, cfg.dim)
            y_seqlens = mask.sum(dim=1).tolist()
        else:
            y_seqlens = [y.shape[2]] * b
            y = y.squeeze(1).reshape(1, -1, cfg.dim)
        kv_cache_dict_ret: KVCacheDict = {}
        for i, block in enumerate(self.blocks):
            out = block(tokens, y, e0, y_seqlens, grid, num_cond_latents, return_kv, kv_cache_dict.get(i, None),
                        skip_crs_attn)
            if return_kv:
                tokens, kv = out
                if offload_kv_cache:
                    kv_cache_dict_ret[i] = (kv[0].cpu(), kv[1].cpu())
                else:
                    kv_cache_dict_ret[i] = (kv[0].contiguous(), kv[1].contiguous())
            else:
                tokens = out
        out = head_out(self, tokens, e, grid).float()
        return (out, kv_cache_dict_ret) if return_kv else out


def _config_of(model: nn.Module) -> LongCatConfig:
    return config_of(model, LongCatConfig, "LongCatModel")


class _Pipeline:
    """Holds the cache pass's dict between the cache pass and the denoising calls, as LongCat's
    pipeline object does (``_cache_clean_latents`` stores it, the loop fetches it back)."""

    def __init__(self, model: nn.Module, offload_kv: bool) -> None:
        self.dit = model
        self.offload_kv = offload_kv
        self.kv_cache_dict: KVCacheDict | None = None

    def cache_clean_latents(self, cond_latents: torch.Tensor, text_len: int, text_dim: int) -> None:
        """The cache pass over ``cond_latents [B, C, T, H, W]``: t=0, a null prompt, no cross-attention."""
        b, _, t = cond_latents.shape[:3]
        timestep = timesteps_for(0.0, (b, t), cond_latents.device)
        empty_embeds = torch.zeros(b, 1, text_len, text_dim, device=cond_latents.device, dtype=cond_latents.dtype)
        _, self.kv_cache_dict = self.dit(hidden_states=cond_latents, timestep=timestep,
                                         encoder_hidden_states=empty_embeds, return_kv=True, skip_crs_attn=True,
                                         offload_kv_cache=self.offload_kv)


@torch.no_grad()
def generate(
    model: nn.Module,
    num_chunks: int,
    seed: int,
    *,
    context: torch.Tensor | None = None,
    offload_kv: bool = False,
    progress: bool = True,
    cache_hook: Callable[[KVCacheDict], KVCacheDict] | None = None,
    on_chunk: Callable[[int, KVCacheDict | None], None] | None = None,
) -> torch.Tensor:
    """Generate ``num_chunks`` chunks the way LongCat-Video's continuation pipeline does.

    One video (LongCat's attention repeats a batch-1 cache for CFG and accepts no other batch).
    Per chunk after the first: a cache pass over the history frames (batch 1, t=0, a null prompt,
    ``return_kv=True``), then ``config.num_steps`` Euler steps, each one forward with
    ``kv_cache_dict=`` and ``num_cond_latents=``: at batch 2 (unconditional first) when
    ``config.guidance_scale > 1``, else at batch 1.

    Args:
        model: a :class:`LongCatModel`, eager or ``torch.compile``d.
        num_chunks: chunks of ``config.chunk_frames`` latent frames.
        seed: seeds all noise (and the stand-in text embeddings when ``context`` is None).
        context: prompt states ``[1, text_len, text_dim]``; random when None. The unconditional
            branch uses zeros with a quarter of the tokens valid (a short negative prompt).
        offload_kv: the cache pass returns its K/V on the host (``offload_kv_cache``).
        progress: show a tqdm bar over chunks.
        cache_hook: applied to each new cache dict before the denoising forwards read it (e.g.
            ``lambda kv: qvg_compile.compress(kv, config, seq_dim=2)`` runs eagerly on QVG caches).
        on_chunk: called after each chunk with ``(chunk_index, kv_cache_dict or None)``.

    Returns:
        Latents ``[1, C, num_chunks * chunk_frames, H, W]`` in the model dtype.
    """
    cfg = _config_of(model)
    check_int("num_chunks", num_chunks)
    batch_size = 1
    guided = cfg.guidance_scale > 1
    device, dtype = model_device_dtype(model)
    gen = new_generator(device, seed)
    context = prompt_states(context, cfg, batch_size, gen, device, dtype)
    text_len = context.shape[1]
    prompt_embeds = (torch.cat([torch.zeros_like(context), context]) if guided else context).unsqueeze(1)
    prompt_mask = torch.ones(prompt_embeds.shape[0], 1, 1, text_len, device=device, dtype=torch.long)
    if guided:
        prompt_mask[:batch_size, ..., max(1, text_len // 4):] = 0
    pipe = _Pipeline(model, offload_kv)
    sigmas = sigma_schedule(cfg.num_steps, cfg.shift)
    f = cfg.chunk_frames
    shape = cfg.latent_shape(batch_size, f)
    output = torch.zeros(cfg.latent_shape(batch_size, num_chunks * f), dtype=dtype, device=device)
    for chunk in tqdm(range(num_chunks), desc="longcat", unit="chunk", disable=not progress):
        kv_cache_dict, num_cond_latents = None, 0
        if chunk:
            first = 0 if cfg.cond_frames is None else max(0, chunk * f - cfg.cond_frames)
            cond_latents = output[:, :, first:chunk * f]
            pipe.cache_clean_latents(cond_latents, text_len, cfg.text_dim)
            if cache_hook is not None:
                pipe.kv_cache_dict = cache_hook(pipe.kv_cache_dict)
            kv_cache_dict, num_cond_latents = pipe.kv_cache_dict, cond_latents.shape[2]
        latents = randn(shape, gen, dtype)
        for i in range(cfg.num_steps):
            sigma, nxt = sigmas[i], sigmas[i + 1]
            x = torch.cat([latents] * 2) if guided else latents
            flow = model(hidden_states=x, timestep=timesteps_for(sigma, (x.shape[0], f), device),
                         encoder_hidden_states=prompt_embeds, encoder_attention_mask=prompt_mask,
                         num_cond_latents=num_cond_latents, kv_cache_dict=kv_cache_dict)
            if guided:
                uncond, cond = flow.chunk(2)
                flow = uncond + cfg.guidance_scale * (cond - uncond)
            latents = (latents.float() + (nxt - sigma) * flow).to(dtype)
        output[:, :, chunk * f:(chunk + 1) * f] = latents
        if on_chunk is not None:
            on_chunk(chunk, kv_cache_dict)
    return output
