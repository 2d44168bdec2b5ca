"""`quantize`: one entry point for every method, and the analytic bit accounting."""

from __future__ import annotations

from typing import Optional

import torch

from .baselines import encode_kivi, encode_quarot
from .config import QVGConfig
from .qvg import encode_qvg
from .segment import Segment


def quantize(
    x: torch.Tensor,
    config: Optional[QVGConfig] = None,
    *,
    seq_dim: int = -2,
    role: str = "key",
    init_centroids: Optional[torch.Tensor] = None,
) -> Segment:
    """Quantize one K or V tensor with ``config`` (default: the ``qvg`` preset).

    Args:
        x: ``[B, H, N, D]`` (``seq_dim=-2``), ``[B, N, H, D]`` (``seq_dim=1``) or any rank >= 3
            layout whose last dim is the head dim; float16, bfloat16, float32 or float64.
        role: ``"key"`` or ``"value"`` (KIVI quantizes them differently; bit widths may differ).
        init_centroids: QVG warm start ``[S, *lead, C, D]``, e.g. the previous segment's centroids.

    Returns a segment with ``.dequantize()``, ``.nbytes`` and ``.bits_per_element``.
    NaN/Inf in ``x`` raise ``ValueError`` unless ``config.check_finite`` is False.
    """
    config = QVGConfig.preset("qvg") if config is None else config
    if not isinstance(config, QVGConfig):
        raise TypeError(f"config: expected a QVGConfig, got {type(config).__name__}")
    if role not in ("key", "value"):
        raise ValueError(f"role: expected 'key' or 'value', got {role!r}")
    if config.method in ("qvg", "rtn"):
        return encode_qvg(x, config, seq_dim, role, init_centroids)
    if init_centroids is not None:
        raise ValueError(f"init_centroids: method {config.method!r} has no centroids")
    if config.method == "kivi":
        return encode_kivi(x, config, seq_dim, role)
    return encode_quarot(x, config, seq_dim, role)


def analytic_bits_per_element(config: QVGConfig, num_tokens: int, head_dim: int, role: str = "key") -> float:
    """docs/design.md §4's formula ``b + scale/G (+ zero/G) + S*8/D + S*C*centroid_bits/N`` for QVG/RTN."""
    if config.method not in ("qvg", "rtn"):
        raise ValueError(f"config.method: the analytic formula covers qvg and rtn, got {config.method!r}")
    scale_bits = config.torch_scale_dtype.itemsize * 8
    per_group = scale_bits * (2 if config.code_mode_for(role) == "asymmetric" else 1)
    stages = config.stages if config.method == "qvg" else 0
    centroid_bits = config.torch_centroid_dtype.itemsize * 8
    return (config.bits_for(role) + per_group / config.group_size + stages * 8 / head_dim
            + stages * config.centroids * centroid_bits / num_tokens)
