"""QVG encode: semantic-aware smoothing + progressive residual k-means + group quantization.

For ``x`` with N tokens of D channels per (batch, head):
1. k-means the tokens into C centroids, subtract each token's (stored-precision) centroid;
2. repeat on the residual for S stages;
3. group-quantize the last residual to b bits and pack it.
`QVGSegment.dequantize` inverts it. With ``stages == 0`` this is exactly the group quantizer.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import QVGConfig
from .group import group_quantize
from .lloyd import kmeans
from .segment import QVGSegment, gather_centroids, normalise_seq_dim, to_normalised


def check_input(x: torch.Tensor, config: QVGConfig, seq_dim: int) -> int:
    """Validate a tensor to quantize; returns the non-negative ``seq_dim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(config, QVGConfig):
        raise TypeError(f"config: expected a QVGConfig, got {type(config).__name__}")
    if not x.dtype.is_floating_point or x.dtype.itemsize == 1:
        raise TypeError(f"x: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    seq_dim = normalise_seq_dim(x.shape, seq_dim)
    if x.shape[seq_dim] == 0:
        raise ValueError("x: the sequence dim is empty; there is nothing to quantize")
    d = x.shape[-1]
    if d % config.group_size:
        raise ValueError(f"config.group_size: {config.group_size} does not divide head_dim {d}")
    if config.check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(
            "x: contains NaN or Inf; quantization would spread it over a whole group and codebook "
            "(set check_finite=False to skip this check at your own risk)"
        )
    return seq_dim


def encode_qvg(
    x: torch.Tensor,
    config: QVGConfig,
    seq_dim: int = -2,
    role: str = "key",
    init_centroids: Optional[torch.Tensor] = None,
) -> QVGSegment:
    """Quantize ``x`` (``[B, H, N, D]``, ``[B, N, H, D]``, ... any float dtype) with QVG.

    Args:
        seq_dim: the token dim; the last dim is always the channel (head) dim.
        role: ``"key"`` or ``"value"``: picks ``config.key_bits`` / ``config.value_bits``.
        init_centroids: ``[S, *lead, C, D]`` centroids to warm-start every stage's k-means
            (for example the previous segment's ``centroids``); required when ``config.init == "given"``.
    """
    seq_dim = check_input(x, config, seq_dim)
    bits = config.bits_for(role)
    xs = to_normalised(x, seq_dim)
    lead, (n, d) = xs.shape[:-2], xs.shape[-2:]
    sets = int(torch.Size(lead).numel())
    stages = config.stages if config.method == "qvg" else 0
    if stages and config.centroids > n:
        raise ValueError(
            f"config.centroids: {config.centroids} centroids for a segment of {n} tokens; "
            "use at most as many centroids as tokens (pick a smaller codebook for short segments)"
        )
    if config.init == "given" and stages and init_centroids is None:
        raise ValueError("init_centroids: config.init is 'given' but no centroids were passed")
    if init_centroids is not None:
        expected = (stages, *lead, config.centroids, d)
        if tuple(init_centroids.shape) != expected:
            raise ValueError(f"init_centroids: expected shape {list(expected)}, got {list(init_centroids.shape)}")
    # The one copy the math needs: the fp32 residual, refined in place stage by stage.
    residual = torch.empty(xs.shape, dtype=torch.float32, device=x.device)
    residual.copy_(xs)
    residual = residual.view(sets, n, d)
    cdtype = config.torch_centroid_dtype
    centroids = torch.empty(stages, sets, config.centroids, d, dtype=cdtype, device=x.device)
    assignments = torch.empty(stages, sets, n, dtype=torch.uint8, device=x.device)
    for s in range(stages):
        warm = None if init_centroids is None else init_centroids[s].reshape(sets, config.centroids, d).to(x.device)
        km = kmeans(residual, config.centroids, config.kmeans_iters, config.kmeans_tol,
                    init="random" if config.init == "given" else config.init,
                    seed=config.seed + s, centroids=warm)
        centroids[s] = km.centroids.to(cdtype)
        assignments[s] = km.assignments.to(torch.uint8)
        residual -= gather_centroids(centroids[s], assignments[s])
    mode = config.code_mode_for(role)
    g = group_quantize(residual, bits, config.group_size, mode, config.torch_scale_dtype)
    return QVGSegment(
        codes=g.codes.view(*lead, n, -1),
        scales=g.scales.view(*lead, n, -1),
        zeros=None if g.zeros is None else g.zeros.view(*lead, n, -1),
        assignments=assignments.view(stages, *lead, n),
        centroids=centroids.view(stages, *lead, config.centroids, d),
        bits=bits,
        group_size=config.group_size,
        code_mode=mode,
        shape=x.shape,
        dtype=x.dtype,
        seq_dim=seq_dim,
    )
