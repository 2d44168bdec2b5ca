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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import (
    DiTConfig,
    GeluFFN,
    RMSNorm,
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
    wan_rope_axes,
)
from .dit import (ModulatedBlock, add_head, add_stem, build_config, check_config, check_int_fields, config_of,
    head_out, prompt_states, tiny)

KVCache = list[dict[str, torch.Tensor]]
"""One dict per layer: ``k`` (``[2B, H, N, D]`` for ``pos_layout="batch"``, ``[B, H, N, 2D]``
for ``"head_dim"``), ``v`` ``[B, H, N, D]``; both in the model dtype, positional encodings
already applied to ``k``."""

TextKV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer ``(k, v)`` of the text tokens, ``[B, H, L, D]`` each, without positions."""

POS_LAYOUTS = ("batch", "head_dim")


@dataclass(frozen=True)
class WorldPlayConfig(DiTConfig):
    """Architecture, sample geometry and sampler. ``memory_frames=None`` keeps the whole history."""

    patch_size: tuple[int, int, int] = (1, 1, 1)
    chunk_frames: int = 4
    memory_frames: int | None = None
    num_steps: int = 4
    shift: float = 5.0
    pos_layout: str = "batch"
    rope_theta: float = 256.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_int_fields(self, "num_steps", optional=("memory_frames",))
        if self.pos_layout not in POS_LAYOUTS:
            raise ValueError(f"pos_layout must be one of {POS_LAYOUTS}, got {self.pos_layout!r}")
        self.check_geometry()


def tiny_config(**overrides: object) -> WorldPlayConfig:
    """A 2-layer model, 2 heads x 64, on ``[B, 16, F, 2, 2]`` latents (4 tokens per frame), chunks of
    2 frames and 2 sampling steps: seconds on CPU."""
    return tiny(WorldPlayConfig, overrides, latent_height=2, latent_width=2, chunk_frames=2, num_steps=2)


def real_config(**overrides: object) -> WorldPlayConfig:
    """HY-WorldPlay at its real width: 54 layers, 16 heads x 128, 1,560 tokens per latent frame."""
    return build_config(WorldPlayConfig, overrides, num_layers=54, dim=2048, num_heads=16, ffn_dim=8192,
                        text_dim=3584, text_len=256, latent_height=30, latent_width=52, in_channels=32)


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


def rope_tables(cfg: WorldPlayConfig, poses: torch.Tensor, grid: tuple[int, int, int], start: int,
                device: torch.device) -> tuple[torch.Tensor, ...]:
    """Both positional variants of a chunk on ``grid = (f, h, w)`` whose frames stand from ``start``:
    (cos, sin, cam_cos, cam_sin) ``[f*h*w, D]`` fp32, 3D RoPE then the camera variant."""
    f, h, w = grid
    axes = wan_rope_axes(cfg.head_dim)
    frame_pos = torch.arange(start, start + f, device=device)
    cos, sin = rope_cos_sin(rope_angles_3d(frame_pos, h, w, axes, cfg.rope_theta))
    cam_cos, cam_sin = rope_cos_sin(camera_angles(poses, h, w, axes, cfg.rope_theta))
    return cos, sin, cam_cos, cam_sin


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

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, n, dim]`` -> ``q``, ``k`` (normed, both positional variants) and ``v`` ``[B, H, n, D]``."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.positions(self.norm_q(q), rope), self.positions(self.norm_k(k), rope), v

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
        q, k, v = self.project(x, rope)
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


class WorldPlayBlock(ModulatedBlock):
    """AdaLN-modulated joint attention and GELU FFN."""

    def __init__(self, cfg: WorldPlayConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.attn = SelfAttention(cfg)
        self.add_ffn(cfg, GeluFFN)
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.text_norm_k = RMSNorm(cfg.head_dim, cfg.eps)

    def forward(self, x, e, rope, text_kv, kv_cache, return_kv):
        """``x [B, n, dim]``, ``e [B, F, dim]`` -> (``[B, n, dim]``, new cache entries)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(e)).chunk(6, dim=-1)
        y, new_kv = self.attn(modulate(self.norm1(x), shift1, scale1), rope, text_kv, kv_cache, return_kv)
        x = x + gate(y, gate1)
        return self.ffn_residual(x, shift2, scale2, gate2), new_kv


def build_worldplay(model: nn.Module, config: WorldPlayConfig, blocks: str, block: type[nn.Module]) -> None:
    """The layers both WorldPlay transformers have, created in the order that fixes their seeded
    weights: the stem, the camera-pose embedding, ``config.num_layers`` ``block``s under the
    attribute ``blocks``, the AdaLN head."""
    check_config(config, WorldPlayConfig)
    model.config = config
    add_stem(model, config)
    model.pose_embedding = nn.Linear(3, config.dim)
    setattr(model, blocks, nn.ModuleList(block(config) for _ in range(config.num_layers)))
    add_head(model, config)


class WorldPlayModel(nn.Module):
    """Camera-conditioned DiT predicting the flow ``noise - x0`` of one chunk."""

    def __init__(self, config: WorldPlayConfig) -> None:
        super().__init__()
        build_worldplay(self, config, "blocks", WorldPlayBlock)

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
        self.check_caches(text_kv, kv_cache)
        tokens, grid = self.patch_embedding(x)
        check_tensor("poses", poses, (grid[0], 3))
        rope = rope_tables(self.config, poses, grid, history_frames(kv_cache, grid), x.device)
        e = self.time_embedding(t) + self.pose_embedding(poses.to(tokens.dtype))
        tokens, new_cache = self.run_blocks(tokens, e, rope, text_kv, kv_cache, return_kv)
        out = head_out(self, tokens, e, grid)
        return (out, new_cache) if return_kv else out

    def check_caches(self, text_kv: TextKV, kv_cache: KVCache | None) -> None:
        """Both caches must hold one entry per layer."""
        layers = self.config.num_layers
        for name, cache in (("text_kv", text_kv), ("kv_cache", kv_cache)):
            if cache is not None and len(cache) != layers:
                raise ValueError(f"{name} must hold {layers} layers, got {len(cache)}")

    def run_blocks(self, tokens: torch.Tensor, e: torch.Tensor, rope: tuple[torch.Tensor, ...], text_kv: TextKV,
                   kv_cache: KVCache | None, return_kv: bool) -> tuple[torch.Tensor, KVCache]:
        """Every block over ``tokens [B, n, dim]``: the output and (with ``return_kv``) the new entries."""
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            tokens, new_kv = block(tokens, e, rope, text_kv[i], None if kv_cache is None else kv_cache[i], return_kv)
            if return_kv:
                new_cache.append(new_kv)
        return tokens, new_cache


def history_frames(kv_cache: KVCache | None, grid: tuple[int, int, int]) -> int:
    """Latent frames ``kv_cache`` holds (0 without one): where the next chunk's frames stand."""
    return 0 if kv_cache is None else kv_cache[0]["v"].shape[2] // (grid[1] * grid[2])


def _config_of(model: nn.Module) -> WorldPlayConfig:
    return config_of(model, WorldPlayConfig, "WorldPlayModel or WorldPlayAR")


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
    context = prompt_states(context, cfg, batch_size, gen, device, dtype)
    if poses is None:
        poses = camera_trajectory(total, gen)
    check_tensor("poses", poses, (total, 3))
    poses = poses.to(device=device, dtype=torch.float32)
    text_kv = model.encode_text(context)
    memory_tokens = None if cfg.memory_frames is None else cfg.memory_frames * cfg.frame_tokens
    sigmas = sigma_schedule(cfg.num_steps, cfg.shift)
    shape = cfg.latent_shape(batch_size, f)
    output = torch.zeros(cfg.latent_shape(batch_size, total), dtype=dtype, device=device)
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


# ------------------------------------------------------------------------------------------------
# HY-WorldPlay's own AR rollout (``worldplay_1_5_transformer.py``, ``modules/attention.py``,
# ``worldplay_video_pipeline.py``): the calling convention the public pipeline uses.
#
# * The attention functions are ``@torch.compiler.disable``d (sequence parallelism and custom
#   kernels live there): they create, concatenate and read the caches, so no compiled graph holds
#   a cache.
# * Per-layer cache dicts ``{k_vision, v_vision, k_txt, v_txt}`` start as ``None``, one list per
#   CFG branch. A text pass writes ``k_txt``/``v_txt`` ``[B, H, L, D]`` once; for every chunk after
#   the first a context pass (``cache_vision=True``) re-encodes the memory frames and returns a
#   NEW list the pipeline rebinds: ``k_vision``/``v_vision`` ``[2B, H, S, D]`` (RoPE rows, then
#   camera rows, concatenated along the batch; keys after their positions).
# * Denoising calls read ``cat([repeat(k_txt), cat([k_vision, k_new], 2)], 2)`` into SDPA.
# ------------------------------------------------------------------------------------------------
ARCache = list[dict[str, torch.Tensor | None]]
"""One dict per layer: ``k_vision``, ``v_vision`` ``[2B, H, S, D]`` (None before the first context
pass), ``k_txt``, ``v_txt`` ``[B, H, L, D]`` (None before the text pass); the model dtype."""

CACHE_NAMES = ("k_vision", "v_vision", "k_txt", "v_txt")


def empty_ar_cache(num_layers: int) -> ARCache:
    """The pipeline's ``init_kv_cache``: one dict of ``None`` per layer."""
    return [dict.fromkeys(CACHE_NAMES) for _ in range(num_layers)]


@torch.compiler.disable
def attention_txt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cache_txt: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Text self-attention of ``q, k, v [B, L, H, D]`` -> (``[B, L, H*D]``, ``{k_txt, v_txt}`` as
    ``[B, H, L, D]`` transposed views when ``cache_txt``, else ``{}``)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    t_kv = {"k_txt": k, "v_txt": v} if cache_txt else {}
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2), t_kv


@torch.compiler.disable
def attention_vision(
    q: tuple[torch.Tensor, torch.Tensor],
    k: tuple[torch.Tensor, torch.Tensor],
    v: tuple[torch.Tensor, torch.Tensor],
    block_idx: int,
    kv_cache: ARCache,
    cache_vision: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Vision attention of the (RoPE, camera) variants of ``q, k, v [B, n, H, D]`` over
    ``[text ; cached vision ; new]``. Returns the two outputs ``[B, n, H*D]`` and, with
    ``cache_vision``, this call's ``{k_vision, v_vision}`` ``[2B, H, n, D]`` (the history is not
    read then: the context pass re-encodes every memory frame)."""
    query = torch.cat(q, dim=0).transpose(1, 2)
    key = torch.cat(k, dim=0).transpose(1, 2)
    value = torch.cat(v, dim=0).transpose(1, 2)
    layer = kv_cache[block_idx]
    vision_kv = {"k_vision": key, "v_vision": value} if cache_vision else {}
    if not cache_vision and layer["k_vision"] is not None:
        key = torch.cat([layer["k_vision"], key], dim=2)
        value = torch.cat([layer["v_vision"], value], dim=2)
    # einops' "B H S D -> (B R) H S D": each text row repeated for both variants.
    text_k = layer["k_txt"].unsqueeze(1).expand(-1, 2, -1, -1, -1).flatten(0, 1)
    text_v = layer["v_txt"].unsqueeze(1).expand(-1, 2, -1, -1, -1).flatten(0, 1)
    key = torch.cat([text_k, key], dim=2)
    value = torch.cat([text_v, value], dim=2)
    out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2)
    out, out_cam = torch.chunk(out, 2, dim=0)
    return out, out_cam, vision_kv


class ARBlock(ModulatedBlock):
    """A double-stream block as HY-WorldPlay runs it autoregressively: a text path and a vision
    path, each calling its compiler-disabled attention."""

    def __init__(self, cfg: WorldPlayConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.txt_qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.txt_o = nn.Linear(cfg.dim, cfg.dim)
        self.img_qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.img_o = nn.Linear(cfg.dim, cfg.dim)
        self.img_o_cam = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.head_dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.head_dim, cfg.eps)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.add_ffn(cfg, GeluFFN)
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim)

    def _qkv(self, proj: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = proj(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        return self.norm_q(q), self.norm_k(k), v

    def forward_txt(self, txt: torch.Tensor, cache_txt: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``txt [B, L, dim]`` -> (``[B, L, dim]``, ``{k_txt, v_txt}`` when ``cache_txt``)."""
        q, k, v = self._qkv(self.txt_qkv, txt)
        out, t_kv = attention_txt(q, k, v, cache_txt)
        return txt + self.txt_o(out), t_kv

    def forward_vision(self, img: torch.Tensor, e: torch.Tensor, rope: tuple[torch.Tensor, ...],
                       kv_cache: ARCache, block_idx: int, cache_vision: bool):
        """``img [B, n, dim]``, ``e [B, F, dim]``, ``rope`` = (cos, sin, cam_cos, cam_sin)
        ``[n, 1, D]`` -> (``[B, n, dim]``, ``{k_vision, v_vision}`` when ``cache_vision``)."""
        cos, sin, cam_cos, cam_sin = rope
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(e)).chunk(6, dim=-1)
        q, k, v = self._qkv(self.img_qkv, modulate(self.norm1(img), shift1, scale1))
        cam = [apply_rope_real(x, cam_cos, cam_sin) for x in (q, k, v)]
        q, k = apply_rope_real(q, cos, sin), apply_rope_real(k, cos, sin)
        out, out_cam, vision_kv = attention_vision((q, cam[0]), (k, cam[1]), (v, cam[2]), block_idx=block_idx,
                                                   kv_cache=kv_cache, cache_vision=cache_vision)
        # The camera rows' values were rotated forward: rotate the output back (ProPE's apply_fn_o).
        out_cam = apply_rope_real(out_cam.unflatten(-1, (self.num_heads, -1)), cam_cos, -cam_sin).flatten(2)
        img = img + gate(self.img_o(out) + self.img_o_cam(out_cam), gate1)
        return self.ffn_residual(img, shift2, scale2, gate2), vision_kv


class WorldPlayAR(nn.Module):
    """HY-WorldPlay's AR transformer as its pipeline calls it: ``model(ar_txt_inference=True,
    text_states=..., kv_cache=..., cache_txt=True)`` returns a new :data:`ARCache` holding the text
    K/V; ``model(hidden_states=..., timestep=..., poses=..., kv_cache=..., cache_vision=True,
    rope_start=0)`` returns a new one holding the vision K/V of those frames (the text K/V carried
    over); with ``cache_vision=False`` it returns the flow ``[B, C, F, H, W]``."""

    def __init__(self, config: WorldPlayConfig) -> None:
        super().__init__()
        build_worldplay(self, config, "double_blocks", ARBlock)

    def forward(self, ar_txt_inference: bool = False, **kwargs: Any):
        return self.forward_txt(**kwargs) if ar_txt_inference else self.forward_vision(**kwargs)

    def forward_txt(self, text_states: torch.Tensor, kv_cache: ARCache, cache_txt: bool = True) -> ARCache:
        """Text pass over ``text_states [B, L, text_dim]``: a new cache list with ``k_txt``/``v_txt``."""
        new_cache = empty_ar_cache(len(self.double_blocks))
        txt = self.text_embedding(text_states)
        for index, block in enumerate(self.double_blocks):
            txt, t_kv = block.forward_txt(txt, cache_txt)
            if cache_txt:
                new_cache[index]["k_txt"] = t_kv["k_txt"]
                new_cache[index]["v_txt"] = t_kv["v_txt"]
        return new_cache

    def forward_vision(self, hidden_states: torch.Tensor, timestep: torch.Tensor, poses: torch.Tensor,
                       kv_cache: ARCache, cache_vision: bool = False, rope_start: int = 0):
        """Vision pass over latents ``[B, C, F, H, W]`` with timesteps ``[B, F]`` and poses ``[F, 3]``
        fp32, frames placed from ``rope_start``: the flow, or (``cache_vision``) a new cache list."""
        if cache_vision:
            new_cache = [{"k_vision": None, "v_vision": None, "k_txt": layer["k_txt"], "v_txt": layer["v_txt"]}
                         for layer in kv_cache]
        tokens, grid = self.patch_embedding(hidden_states)
        rope = tuple(x.unsqueeze(1) for x in rope_tables(self.config, poses, grid, rope_start, hidden_states.device))
        e = self.time_embedding(timestep) + self.pose_embedding(poses.to(tokens.dtype))
        for index, block in enumerate(self.double_blocks):
            tokens, vision_kv = block.forward_vision(tokens, e, rope, kv_cache, index, cache_vision)
            if cache_vision:
                new_cache[index]["k_vision"] = vision_kv["k_vision"]
                new_cache[index]["v_vision"] = vision_kv["v_vision"]
        if cache_vision:
            return new_cache
        return head_out(self, tokens, e, grid)


ARHook = Callable[[ARCache], ARCache]


def _memory_frames(chunk: int, cfg: WorldPlayConfig) -> list[int]:
    """The frames the context pass re-encodes before ``chunk``: the last ``memory_frames`` generated
    (all of them when None), standing in for the pipeline's camera-aligned selection."""
    start = chunk * cfg.chunk_frames
    first = 0 if cfg.memory_frames is None else max(0, start - cfg.memory_frames)
    return list(range(first, start))


@torch.no_grad()
def rollout(
    model: nn.Module,
    num_chunks: int,
    seed: int,
    *,
    guidance_scale: float = 3.0,
    context_timestep: float = 14.0,
    progress: bool = True,
    cache_hook: ARHook | None = None,
    on_chunk: Callable[[int, list[ARCache]], None] | None = None,
) -> torch.Tensor:
    """Generate ``num_chunks`` chunks (batch 1) the way ``worldplay_video_pipeline``'s
    ``_ar_rollout_inner`` does: a text pass per CFG branch, then per chunk a context pass per
    branch over the memory frames (after the first chunk; the returned lists are rebound) and
    ``config.num_steps`` Euler steps of two denoising calls combined by classifier-free guidance.

    Args:
        model: a :class:`WorldPlayAR`, eager or ``torch.compile``d.
        num_chunks: chunks of ``config.chunk_frames`` latent frames.
        seed: seeds the noise, the stand-in prompt embeddings and the camera path.
        guidance_scale: CFG scale.
        context_timestep: the timestep of the context pass (the pipeline's stabilization level).
        progress: show a tqdm bar over chunks.
        cache_hook: applied to each cache list the model returns, before it is read (e.g.
            ``lambda kv: qvg_compile.compress(kv, config, seq_dim=2)``).
        on_chunk: called after each chunk with ``(chunk_index, [positive cache, negative cache])``.

    Returns:
        Latents ``[1, C, num_chunks * chunk_frames, H, W]`` in the model dtype.
    """
    cfg = _config_of(model)
    check_int("num_chunks", num_chunks)
    device, dtype = model_device_dtype(model)
    gen = new_generator(device, seed)
    f = cfg.chunk_frames
    prompts = [randn((1, cfg.text_len, cfg.text_dim), gen, dtype) for _ in range(2)]
    poses = camera_trajectory(num_chunks * f, gen).to(device)
    hook = cache_hook or (lambda kv: kv)
    caches = [hook(model(ar_txt_inference=True, text_states=p, kv_cache=empty_ar_cache(cfg.num_layers),
                         cache_txt=True)) for p in prompts]
    latents = torch.zeros(cfg.latent_shape(1, num_chunks * f), dtype=dtype, device=device)
    sigmas = sigma_schedule(cfg.num_steps, cfg.shift)
    for chunk in tqdm(range(num_chunks), desc="worldplay", unit="chunk", disable=not progress):
        memory = _memory_frames(chunk, cfg)
        if memory:
            t_ctx = torch.full((1, len(memory)), context_timestep, device=device)
            caches = [hook(model(hidden_states=latents[:, :, memory], timestep=t_ctx, poses=poses[memory],
                                 kv_cache=kv, cache_vision=True, rope_start=0)) for kv in caches]
        frames = slice(chunk * f, (chunk + 1) * f)
        noisy = randn(cfg.latent_shape(1, f), gen, dtype)
        for i in range(cfg.num_steps):
            t = timesteps_for(sigmas[i], (1, f), device)
            cond, uncond = (model(hidden_states=noisy, timestep=t, poses=poses[frames], kv_cache=kv,
                                  rope_start=len(memory)).float() for kv in caches)
            flow = uncond + guidance_scale * (cond - uncond)
            noisy = (noisy.float() + (sigmas[i + 1] - sigmas[i]) * flow).to(dtype)
        latents[:, :, frames] = noisy
        if on_chunk is not None:
            on_chunk(chunk, caches)
    return latents
