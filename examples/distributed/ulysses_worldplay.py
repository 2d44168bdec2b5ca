"""Ulysses sequence-parallel HY-WorldPlay-style model: tokens split over ranks, heads split in attention.

`UlyssesWorldPlay` is `examples.models.worldplay.WorldPlayModel` (same weights, same cache
idioms D and F) where each rank holds ``1/P`` of every frame's tokens (rows ``[r*T/P, (r+1)*T/P)``
of each latent frame, so the per-frame modulation still applies) through embeddings, FFNs and
the head. Attention is where the ranks meet, as in HY-WorldPlay's xDiT Ulysses path:
an all-to-all turns this rank's tokens of all heads into all tokens of its ``H/P`` heads, the
tokens are put back in frame order, attention runs over ``[text ; cache ; new]`` for those
heads, and a second all-to-all returns the outputs to their tokens. The cache entries each rank
returns (and the pipeline ``cat``s) are therefore its own heads for the whole sequence,
``[2B, H/P, N, D]`` / ``[B, H/P, N, D]``, in the same token order as in one process, and
``torch.compile(backend=qvg_compile.backend(...))`` compresses them per rank with the two
all-to-alls left in the graph.

Generation is `examples.models.worldplay.generate`, unchanged: every rank calls it with the
same seed and gets the whole video back.

    torchrun --nproc-per-node 2 -m examples.distributed.ulysses_worldplay --config tiny --qvg
    python -m examples.distributed.ulysses_worldplay --config tiny --nproc 2 --qvg    # CPU, gloo
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from examples.models import worldplay as wp
from examples.models.common import check_tensor, unpatchify
from examples.models.dit import head_tokens

from . import cli
from .cli import compiled_rank_model, print_memory, seeded_model
from .parallel import (
    Group,
    all_gather,
    heads_to_seq,
    rank_and_size,
    seq_to_heads,
    split_evenly,
)


def _swap_blocks(x: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """Tokens ``[..., outer*inner*m, D]`` as ``outer`` x ``inner`` blocks of ``m`` -> ``inner`` x ``outer``."""
    lead, d = x.shape[:-2], x.shape[-1]
    y = x.reshape(*lead, outer, inner, -1, d).transpose(-4, -3)
    return y.reshape(*lead, -1, d)


def _frame_order(x: torch.Tensor, frames: int, size: int) -> torch.Tensor:
    """``[..., P*n, D]`` with rank-major tokens (each rank: ``frames`` x ``T/P``) -> frame-major."""
    return x if size == 1 else _swap_blocks(x, size, frames)


def _rank_order(x: torch.Tensor, frames: int, size: int) -> torch.Tensor:
    """Inverse of `_frame_order`."""
    return x if size == 1 else _swap_blocks(x, frames, size)


class UlyssesSelfAttention(wp.SelfAttention):
    """`wp.SelfAttention` with the Ulysses all-to-alls around the attention of this rank's heads."""

    group: Group
    frames: int  # latent frames per chunk: every rank's tokens are frames x (T / P)

    @classmethod
    def from_attention(cls, attn: wp.SelfAttention, group: Group) -> "UlyssesSelfAttention":
        _, size = rank_and_size(group)
        split_evenly("num_heads", attn.num_heads, size)
        attn.__class__ = cls
        attn.group = group
        return attn

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        text_kv: tuple[torch.Tensor, torch.Tensor],
        kv_cache: dict[str, torch.Tensor] | None,
        return_kv: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """``x [B, n, dim]`` (this rank's tokens), ``rope`` tables ``[n, D]`` of those tokens,
        ``text_kv`` and ``kv_cache`` of this rank's heads. Returns ``[B, n, dim]`` and, with
        ``return_kv``, this chunk's cache entries for this rank's heads."""
        _, size = rank_and_size(self.group)
        frames = self.frames
        q, k, v = self.project(x, rope)
        q, k, v = (_frame_order(seq_to_heads(t, self.group), frames, size) for t in (q, k, v))
        out, new_kv = self.attend(q, k, v, text_kv, kv_cache, return_kv)
        out = heads_to_seq(_rank_order(out, frames, size), self.group)
        return self.o(out.transpose(1, 2).flatten(2)), new_kv


class UlyssesWorldPlay(wp.WorldPlayModel):
    """This rank's view of a `wp.WorldPlayModel` under Ulysses sequence parallelism. Build it
    with `from_model` from the same full weights on every rank."""

    group: Group

    @classmethod
    def from_model(cls, model: wp.WorldPlayModel, group: Group) -> "UlyssesWorldPlay":
        """Convert ``model`` in place (weights are kept whole; every rank runs its tokens)."""
        if not isinstance(model, wp.WorldPlayModel):
            raise TypeError(f"model must be a WorldPlayModel, got {type(model).__name__}")
        _, size = rank_and_size(group)
        cfg = model.config
        split_evenly("num_heads", cfg.num_heads, size)
        split_evenly("tokens per frame", cfg.frame_tokens, size)
        model.__class__ = cls
        model.group = group
        for block in model.blocks:
            UlyssesSelfAttention.from_attention(block.attn, group)
            block.attn.frames = cfg.chunk_frames
        return model

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's heads of ``[B, H, ...]``."""
        rank, size = rank_and_size(self.group)
        hp = x.shape[1] // size
        return x[:, rank * hp:(rank + 1) * hp]

    def _tokens(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """This rank's tokens of ``[..., frames*T, C]`` (a contiguous block of every frame)."""
        rank, size = rank_and_size(self.group)
        if size == 1:
            return x
        per_frame = x.unflatten(-2, (frames, -1))
        part = per_frame.shape[-2] // size
        return per_frame[..., rank * part:(rank + 1) * part, :].flatten(-3, -2)

    def encode_text(self, context: torch.Tensor) -> wp.TextKV:
        """Text K/V of this rank's heads, ``[B, H/P, L, D]`` per layer."""
        return [(self._heads(k), self._heads(v)) for k, v in super().encode_text(context)]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        poses: torch.Tensor,
        text_kv: wp.TextKV,
        kv_cache: wp.KVCache | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, wp.KVCache]:
        """`wp.WorldPlayModel.forward` with this rank's tokens; the flow is gathered from every
        rank, so each returns the whole ``[B, C, F, H, W]``."""
        cfg = self.config
        self.check_caches(text_kv, kv_cache)
        tokens, grid = self.patch_embedding(x)
        f = grid[0]
        if f != cfg.chunk_frames:
            raise ValueError(f"x must hold one chunk of {cfg.chunk_frames} frames, got {f}")
        check_tensor("poses", poses, (f, 3))
        tables = wp.rope_tables(cfg, poses, grid, wp.history_frames(kv_cache, grid), x.device)
        rope = tuple(self._tokens(r, f) for r in tables)
        e = self.time_embedding(t) + self.pose_embedding(poses.to(tokens.dtype))
        tokens, new_cache = self.run_blocks(self._tokens(tokens, f), e, rope, text_kv, kv_cache, return_kv)
        local = head_tokens(self, tokens, e)
        _, size = rank_and_size(self.group)
        gathered = _frame_order(all_gather(local, 1, self.group), f, size)
        out = unpatchify(gathered, grid, cfg.patch_size, cfg.in_channels)
        return (out, new_cache) if return_kv else out


# ------------------------------------------------------------------------------------ CLI


def build(config: str, device: torch.device, group: Group, seed: int = 0,
          dtype: torch.dtype = torch.bfloat16, layers: int | None = None) -> UlyssesWorldPlay:
    """The same full model on every rank (seeded), as this rank's Ulysses view. ``layers``
    overrides the config's number of layers (real widths, shorter compiles)."""
    cfg = wp.real_config() if config == "real" else wp.tiny_config()
    return UlyssesWorldPlay.from_model(seeded_model(wp.WorldPlayModel, cfg, device, seed, dtype, layers), group)


def _worker(rank: int, world: int, args: argparse.Namespace) -> None:
    caches = []
    latents = wp.generate(compiled_rank_model(build, rank, args), args.chunks, args.seed, progress=False, on_chunk=lambda i, kv: caches.append(kv))
    print_memory(rank, world, latents, caches[-1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("Ulysses sequence-parallel HY-WorldPlay-style generation")
    cli.run(_worker, parser.parse_args(argv))


if __name__ == "__main__":
    main()
