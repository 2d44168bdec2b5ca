"""The DiT scaffolding the four reference models share: their config builders, the embeddings in
front of the blocks, the block base with its modulated FFN half, the per-block modulation, the
AdaLN head behind the blocks and the prompt stand-in.

Each helper creates its layers in the order the models always did, so a model seeded with
``torch.manual_seed`` draws the same weights as before; the models keep their own attribute
names (``blocks``, ``double_blocks``, ...) and their cache code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import (
    PatchEmbed3d,
    TimestepEmbedding,
    check_int,
    check_tensor,
    gate,
    modulate,
    randn,
    unpatchify,
)

C = TypeVar("C")

TINY_WIDTH: dict[str, int] = dict(num_layers=2, dim=128, num_heads=2, ffn_dim=256, text_dim=24, text_len=8,
                                  freq_dim=32)
"""The CPU-sized width of every ``tiny_config``: 2 layers, 2 heads x 64, an 8-token prompt."""

SHARED_INT_FIELDS = ("num_layers", "dim", "num_heads", "ffn_dim", "text_dim", "text_len", "latent_height",
                     "latent_width", "in_channels", "freq_dim", "chunk_frames")
"""The integer fields every model config has, each checked ``>= 1``."""


def build_config(cls: type[C], overrides: dict[str, Any], **fields: Any) -> C:
    """``cls(**fields)`` with ``overrides`` replaced on top (each config checked as built)."""
    return dataclasses.replace(cls(**fields), **overrides)


def tiny(cls: type[C], overrides: dict[str, Any], **fields: Any) -> C:
    """A ``tiny_config``: :data:`TINY_WIDTH` with the model's own ``fields`` on top, then ``overrides``."""
    return build_config(cls, overrides, **{**TINY_WIDTH, **fields})


def check_int_fields(config: object, *extra: str, optional: tuple[str, ...] = ()) -> None:
    """Check :data:`SHARED_INT_FIELDS` and the model's ``extra`` integer fields are ints ``>= 1``;
    the ``optional`` fields too unless None."""
    for name in SHARED_INT_FIELDS + extra:
        check_int(name, getattr(config, name))
    for name in optional:
        if getattr(config, name) is not None:
            check_int(name, getattr(config, name))


def check_config(config: object, cls: type) -> None:
    """A model constructor's argument check: ``config`` must be a ``cls``."""
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")


def config_of(model: nn.Module, cls: type[C], models: str) -> C:
    """The ``cls`` config of ``model`` (one of ``models``), also through a ``torch.compile`` wrapper."""
    cfg = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(cfg, cls):
        raise TypeError(f"model must be a {models} (optionally wrapped by torch.compile)")
    return cfg


def add_stem(model: nn.Module, config: Any) -> None:
    """Give ``model`` its inputs: ``patch_embedding``, ``text_embedding`` (Linear-GELU-Linear) and
    ``time_embedding``."""
    dim = config.dim
    model.patch_embedding = PatchEmbed3d(config.in_channels, dim, config.patch_size)
    model.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU("tanh"), nn.Linear(dim, dim))
    model.time_embedding = TimestepEmbedding(config.freq_dim, dim)


def build_wan_dit(model: nn.Module, config: Any, cls: type, block: Callable[[int], nn.Module],
                  ada_head: bool = True) -> None:
    """The layers of the transformers modulated Wan's way (Self-Forcing, LongCat, MAGI), created in
    the order that fixes their seeded weights: the stem, the shared ``time_projection``,
    ``config.num_layers`` ``blocks`` (``block(layer_index)``), the head (:func:`add_head`)."""
    check_config(config, cls)
    model.config = config
    add_stem(model, config)
    model.time_projection = time_projection(config.dim)
    model.blocks = nn.ModuleList(block(i) for i in range(config.num_layers))
    add_head(model, config, ada_head)


def time_modulations(model: nn.Module, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps ``t [B, F]`` fp32 -> the time embedding ``e [B, F, dim]`` and, through the shared
    projection of :func:`build_wan_dit`, every block's six modulations ``e0 [B, F, 6, dim]``."""
    e = model.time_embedding(t)
    return e, model.time_projection(e).unflatten(2, (6, model.config.dim))


def time_projection(dim: int) -> nn.Sequential:
    """Wan's shared projection of the time embedding to the six per-block modulations."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))


def block_modulation(dim: int) -> nn.Parameter:
    """A block's learnt offsets ``[1, 1, 6, dim]`` on the shared time projection (Wan-style): a
    6 x dim x dim Linear per block would add ~100M parameters per layer at the real width."""
    return nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)


class ModulatedBlock(nn.Module):
    """Base of the reference models' blocks. Every one ends with the same half: an FFN on the
    AdaLN-modulated ``norm2`` of its input, gated, added back; LongCat's and MAGI's blocks also
    share their attention layers' names (:meth:`add_attention`)."""

    def add_attention(self, cfg: Any, attn: nn.Module, cross_attn: nn.Module) -> None:
        """``norm1`` (no affine), ``attn``, ``norm_cross`` (affine), ``cross_attn``, in that order."""
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.attn = attn
        self.norm_cross = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.cross_attn = cross_attn

    def add_ffn(self, cfg: Any, ffn_cls: Callable[[int, int], nn.Module]) -> None:
        """``norm2`` (no affine) and ``ffn = ffn_cls(dim, ffn_dim)``, after the attention layers."""
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = ffn_cls(cfg.dim, cfg.ffn_dim)

    def ffn_residual(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     g: torch.Tensor) -> torch.Tensor:
        """``x [B, N, dim]`` plus the FFN of its ``norm2`` modulated by per-frame ``shift``/``scale``
        and gated by ``g`` (each ``[B, F, dim]``)."""
        return x + gate(self.ffn(modulate(self.norm2(x), shift, scale)), g)


def add_head(model: nn.Module, config: Any, ada: bool = True) -> None:
    """Give ``model`` its output: ``head_norm``, with ``ada`` a ``head_ada`` Linear for the shift
    and scale, and ``head`` to one patch of latents per token."""
    dim = config.dim
    model.head_norm = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
    if ada:
        model.head_ada = nn.Linear(dim, 2 * dim)
    pt, ph, pw = config.patch_size
    model.head = nn.Linear(dim, config.in_channels * pt * ph * pw)


def head_tokens(model: nn.Module, tokens: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The AdaLN head (:func:`add_head` with ``ada``) on ``tokens [B, N, dim]`` with the time
    embedding ``e [B, F, dim]`` -> per-token patches ``[B, N, pt*ph*pw*C]``."""
    shift, scale = model.head_ada(F.silu(e)).chunk(2, dim=-1)
    return model.head(modulate(model.head_norm(tokens), shift, scale))


def head_out(model: nn.Module, tokens: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """:func:`head_tokens` put back on the latent ``grid`` -> ``[B, C, F, H, W]``."""
    cfg = model.config
    return unpatchify(head_tokens(model, tokens, e), grid, cfg.patch_size, cfg.in_channels)


def prompt_states(context: torch.Tensor | None, config: Any, batch_size: int, gen: torch.Generator,
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``context [B, L, text_dim]`` on ``device`` in ``dtype``, or random stand-in prompt states
    drawn from ``gen`` when None (the first draw of a generation, so the noise after it is fixed)."""
    if context is None:
        context = randn((batch_size, config.text_len, config.text_dim), gen, dtype)
    check_tensor("context", context, (batch_size, None, config.text_dim))
    return context.to(device=device, dtype=dtype)
