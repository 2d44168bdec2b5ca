"""Tensor-parallel Self-Forcing-style model: attention heads and FFN columns split over ranks.

`shard_` turns a `SelfForcingModel` (examples/models/self_forcing.py, unchanged) into this rank's
part, Megatron style: q/k/v and the FFN's first layer keep this rank's output columns (its
``H/P`` heads), ``o`` and the FFN's second layer keep its input columns and sum over the group;
Wan's q/k RMS norms span every head, so their sum of squares is reduced too. Embeddings,
modulation and the head stay replicated. The model's own attention code runs unchanged with
``num_heads = H/P``, so every rank's self-attention cache is the pipeline's cache of its own heads,
``[B, S, H/P, D]``, written and read through the same idioms (A, G) as in one process, and
``torch.compile(backend=qvg_compile.backend(...))`` on each rank compresses it.

`generate` is `examples.models.self_forcing.generate` with per-rank caches and resumption from
a cache saved per rank (`parallel.save_caches` / `parallel.load_caches`).

    torchrun --nproc-per-node 2 -m examples.distributed.tp_self_forcing --config tiny --qvg
    python -m examples.distributed.tp_self_forcing --config tiny --nproc 2 --qvg     # CPU, gloo
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from examples.models import self_forcing as sf
from examples.models.common import (
    check_int,
    model_device_dtype,
    new_generator,
    randn,
    shifted_sigma,
)

from . import cli
from .cli import compiled_rank_model, print_memory, seeded_model
from .parallel import (
    Group,
    RowParallelLinear,
    ShardedRMSNorm,
    column_shard,
    rank_and_size,
    save_caches,
    split_evenly,
)

CHUNK_SEED_STRIDE = 1_000_003


def shard_(model: sf.SelfForcingModel, group: Group) -> sf.SelfForcingModel:
    """Replace ``model``'s attention and FFN layers by this rank's shards, in place.

    Every rank must hold the same full weights first (same seed, or loaded from one checkpoint).
    Returns ``model``, with ``model.tp_group`` set; ``group=None`` leaves it whole.
    """
    if not isinstance(model, sf.SelfForcingModel):
        raise TypeError(f"model must be a SelfForcingModel, got {type(model).__name__}")
    _, size = rank_and_size(group)
    cfg = model.config
    split_evenly("num_heads", cfg.num_heads, size)
    split_evenly("ffn_dim", cfg.ffn_dim, size)
    model.tp_group = group
    if group is None:
        return model
    for block in model.blocks:
        for attn in (block.self_attn, block.cross_attn):
            attn.num_heads = cfg.num_heads // size
            attn.q, attn.k, attn.v = (column_shard(lin, group) for lin in (attn.q, attn.k, attn.v))
            attn.o = RowParallelLinear(attn.o, group)
            attn.norm_q = ShardedRMSNorm(attn.norm_q, group)
            attn.norm_k = ShardedRMSNorm(attn.norm_k, group)
        block.ffn.fc1 = column_shard(block.ffn.fc1, group)
        block.ffn.fc2 = RowParallelLinear(block.ffn.fc2, group)
    return model


def local_heads(model: nn.Module) -> int:
    """Attention heads held by this rank (all of them when the model is not sharded)."""
    cfg = model.config
    _, size = rank_and_size(getattr(model, "tp_group", None))
    return cfg.num_heads // size


def init_kv_cache(model: nn.Module, batch_size: int, max_frames: int) -> sf.KVCache:
    """The pipeline's self-attention cache for this rank: ``[B, frames * 1560, H/P, D]`` per layer
    (layout of `sf.init_kv_cache`) with its index tensors."""
    cfg = model.config
    check_int("batch_size", batch_size)
    check_int("max_frames", max_frames)
    return sf.kv_buffers(model, (batch_size, max_frames * cfg.frame_tokens, local_heads(model), cfg.head_dim))


def init_crossattn_cache(model: nn.Module, batch_size: int) -> sf.CrossAttnCache:
    """The text K/V cache for this rank's heads (layout of `sf.init_crossattn_cache`)."""
    cfg = model.config
    return sf.crossattn_buffers(model, (batch_size, cfg.text_len, local_heads(model), cfg.head_dim))


@torch.no_grad()
def generate(
    model: nn.Module,
    num_chunks: int,
    seed: int,
    *,
    max_frames: int | None = None,
    kv_cache: sf.KVCache | None = None,
    first_chunk: int = 0,
    batch_size: int = 1,
    denoising_steps: Sequence[float] = (1000.0, 750.0, 500.0, 250.0),
    shift: float = 5.0,
    on_chunk: Callable[[int, sf.KVCache], None] | None = None,
) -> tuple[torch.Tensor, sf.KVCache]:
    """Self-Forcing's per-chunk loop (4 denoising forwards, then a clean forward that rewrites
    the chunk's cache slot) on this rank's share of the model.

    Every rank runs it with the same arguments: noise is drawn per chunk from ``seed`` and the
    chunk index, so ranks agree and a run resumed at ``first_chunk`` from a loaded ``kv_cache``
    draws what an uninterrupted run would.

    Args:
        model: a (sharded) `SelfForcingModel`, eager or ``torch.compile``d.
        num_chunks: chunks of ``config.chunk_frames`` latent frames to generate now.
        seed: seeds the text stand-in and all noise.
        max_frames: cache capacity in latent frames for a new cache (default: this call's video).
        kv_cache: a cache to continue from (`parallel.load_caches`); its index tensors say where.
        first_chunk: index of the first chunk generated by this call.

    Returns:
        (latents ``[B, 16, num_chunks * chunk_frames, H, W]``, the cache).
    """
    cfg = model.config
    check_int("num_chunks", num_chunks)
    check_int("first_chunk", first_chunk, minimum=0)
    device, dtype = model_device_dtype(model)
    if kv_cache is None:
        kv_cache = init_kv_cache(model, batch_size, max_frames or (first_chunk + num_chunks) * cfg.chunk_frames)
    cross = init_crossattn_cache(model, batch_size)
    context = randn((batch_size, cfg.text_len, cfg.text_dim), new_generator(device, seed), dtype)
    sigmas = [shifted_sigma(float(s), shift) for s in denoising_steps]
    chunks = []
    for chunk in range(first_chunk, first_chunk + num_chunks):
        gen = new_generator(device, seed * CHUNK_SEED_STRIDE + chunk + 1)
        start = chunk * cfg.chunk_frames * cfg.frame_tokens
        chunks.append(sf.sample_chunk(model, sigmas, gen, context, kv_cache, cross, start))
        if on_chunk is not None:
            on_chunk(chunk, kv_cache)
    return torch.cat(chunks, dim=2), kv_cache


# ------------------------------------------------------------------------------------ CLI


def build(config: str, device: torch.device, group: Group, seed: int = 0,
          dtype: torch.dtype = torch.bfloat16, layers: int | None = None) -> sf.SelfForcingModel:
    """The same full model on every rank (seeded), then this rank's shard of it. ``layers``
    overrides the config's number of layers (real widths, shorter compiles)."""
    cfg = sf.real_config() if config == "real" else sf.tiny_config(dim=128, num_heads=2, ffn_dim=128)
    return shard_(seeded_model(sf.SelfForcingModel, cfg, device, seed, dtype, layers), group)


def _worker(rank: int, world: int, args: argparse.Namespace) -> None:
    latents, cache = generate(compiled_rank_model(build, rank, args), args.chunks, args.seed)
    print_memory(rank, world, latents, cache)
    if args.save:
        save_caches(cache, args.save, rank)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("tensor-parallel Self-Forcing-style generation")
    parser.add_argument("--save", default=None, help="directory for per-rank caches")
    cli.run(_worker, parser.parse_args(argv))


if __name__ == "__main__":
    main()
