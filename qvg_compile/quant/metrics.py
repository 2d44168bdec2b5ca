"""Error metrics between a reference tensor and its reconstruction, all computed in fp32."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _pair(ref: torch.Tensor, approx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != approx.shape:
        raise ValueError(f"approx: expected shape {list(ref.shape)}, got {list(approx.shape)}")
    return ref.float(), approx.float()


def rel_mse(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``||ref - approx||^2 / ||ref||^2``."""
    r, a = _pair(ref, approx)
    return float((r - a).pow(2).sum() / r.pow(2).sum().clamp_min(1e-30))


def snr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio in dB, ``-10 log10(rel_mse)``."""
    err = rel_mse(ref, approx)
    return math.inf if err == 0 else -10 * math.log10(err)


def cosine_similarity(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean cosine similarity of corresponding vectors along the last dim."""
    r, a = _pair(ref, approx)
    return float(F.cosine_similarity(r, a, dim=-1, eps=1e-12).mean())


def attention_rel_err(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_hat: torch.Tensor,
    v_hat: torch.Tensor,
    scale: Optional[float] = None,
) -> float:
    """Relative L2 error of ``softmax(q k^T * scale) v`` when k, v are replaced by their
    reconstructions. ``q`` ``[B, H, M, D]``; ``k``, ``v`` ``[B, H, N, D]`` (same layout)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q, k: expected rank 4 [B, H, N, D], got {list(q.shape)} and {list(k.shape)}")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    out = F.scaled_dot_product_attention(q.float(), k_hat.float(), v_hat.float(), scale=scale)
    return math.sqrt(rel_mse(ref, out))
