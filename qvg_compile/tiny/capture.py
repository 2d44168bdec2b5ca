"""K/V captured from a trained model's rollout, for ``qvg-compile quant-bench --kv`` and the tests.

A short dense rollout continues the first shipped prompt; the file keeps, for a few layers and
heads, the post-RoPE keys and the values of the last ``frames`` frames of the history and a
sample of the queries of the last clean pass (post-RoPE), as ``k.<layer>``, ``v.<layer>``,
``q.<layer>``: ``[1, heads, N, head_dim]`` (N = frames x tokens per frame) and
``[1, heads, queries, head_dim]``, in bf16 by default. The metadata records the model, layers,
heads and geometry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import torch

from .checkpoint import Checkpoint
from .data import from_uint8
from .evaluate import rollout
from .model import apply_rope, rope_angles

FORMAT = "qvg-compile-kv/1"


def _check(ckpt: Checkpoint, chunks: int, frames: int, layers: Sequence[int], heads: Sequence[int],
           queries: int) -> tuple[list[int], list[int]]:
    cfg = ckpt.model.cfg
    if not isinstance(chunks, int) or chunks < 2:
        raise ValueError(f"chunks: expected an int >= 2 (the prompt chunk and a generated one), got {chunks!r}")
    if not isinstance(frames, int) or not 1 <= frames <= chunks * cfg.frames_per_chunk:
        raise ValueError(f"frames: expected an int in [1, {chunks * cfg.frames_per_chunk}], got {frames!r}")
    if not isinstance(queries, int) or not 1 <= queries <= cfg.chunk_tokens:
        raise ValueError(f"queries: expected an int in [1, {cfg.chunk_tokens}], got {queries!r}")
    for name, values, count in (("layers", layers, cfg.layers), ("heads", heads, cfg.heads)):
        if not values or any(not isinstance(i, int) or not -count <= i < count for i in values):
            raise ValueError(f"{name}: expected indices in [-{count}, {count}), got {list(values)}")
    return sorted({i % cfg.layers for i in layers}), sorted({h % cfg.heads for h in heads})


def capture_kv(ckpt: Checkpoint, chunks: int = 3, frames: int = 4, layers: Sequence[int] = (0, -1),
               heads: Sequence[int] = (0,), queries: int = 256, seed: int = 0,
               device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Roll the first prompt of ``ckpt`` out for ``chunks`` chunks (dense cache, model in
    ``dtype`` on ``device``) and return ``{"k.<l>", "v.<l>": [1, h, frames*tokens_per_frame, D],
    "q.<l>": [1, h, queries, D]}`` on the CPU in ``dtype`` for each layer l of ``layers`` and the
    heads of ``heads`` (negative indices count from the end). The queries are ``queries`` tokens
    evenly spaced over the last chunk's clean pass."""
    layers, heads = _check(ckpt, chunks, frames, layers, heads, queries)
    model = ckpt.model.to(device=device, dtype=dtype)
    cfg = model.cfg
    seen: dict[int, torch.Tensor] = {}
    hooks = [model.blocks[i].q_norm.register_forward_hook(
        lambda _m, _args, out, i=i: seen.__setitem__(i, out)) for i in layers]
    try:
        _, cache, _ = rollout(model, chunks, from_uint8(ckpt.prompts[:1]), seed)
    finally:
        for hook in hooks:
            hook.remove()
    end = chunks * cfg.frames_per_chunk
    angles = rope_angles(cfg, end - cfg.frames_per_chunk, cfg.frames_per_chunk, model._freqs, seen[layers[0]].device)
    rows = torch.linspace(0, cfg.chunk_tokens - 1, queries).round().long()
    first = (end - frames) * cfg.tokens_per_frame
    out = {}
    for i in layers:
        q = apply_rope(seen[i], angles)[:, rows.to(angles.device)]
        for name, x in (("k", cache[i]["k"][:, first:]), ("v", cache[i]["v"][:, first:]), ("q", q)):
            out[f"{name}.{i}"] = x[:, :, heads].transpose(1, 2).to("cpu", dtype).contiguous()
    return out


def save_kv(tensors: dict[str, torch.Tensor], path: Union[str, Path], metadata: dict) -> Path:
    """Write captured ``tensors`` to ``path`` (safetensors) with ``metadata`` (JSON-able)."""
    from safetensors.torch import save_file

    if not tensors or any(t.dim() != 4 for t in tensors.values()):
        raise ValueError("tensors: expected a non-empty dict of [B, H, N, D] tensors")
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": FORMAT, "info": json.dumps(metadata)})
    return path
