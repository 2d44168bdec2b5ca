"""QVG encode on the GPU: the kernel version of `qvg_compile.quant.qvg.encode_qvg`.

Same contract and same result layout (`QVGSegment`). Per stage: seeded or warm-started
centroids, Lloyd iterations of (fused distance + arg-min assignment, deterministic one-hot
update), a final assignment; then one fused pass subtracts every stage's centroids, scales,
quantizes and packs. Custom ops: ``qvg::kmeans_assign``, ``qvg::kmeans_update``,
``qvg::quantize_residual`` (Triton on CUDA, the math layer elsewhere).

Agreement with the reference for the same input and initial centroids:
- fp32 inputs under the Triton interpreter: identical codes, scales and assignments except for
  exact distance ties; centroids within 1e-5 relative (different summation order).
- 16-bit inputs on the GPU: distances are evaluated against centroids rounded to the input type
  on the tensor cores, so a token whose two nearest centroids are within that rounding may pick
  the other one; given the same centroids and assignments the codes and scales are identical.
Every random choice uses the math layer's seeded CPU generator, so a seed picks the same tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quant.kmeans import assign as ref_assign
from ..quant.kmeans import init_centroids as ref_init
from ..quant.kmeans import update as ref_update
from ..quant.config import QVGConfig
from ..quant.group import group_quantize
from ..quant.qvg import check_input
from ..quant.qvg import encode_qvg as reference_encode
from ..quant.segment import QVGSegment, gather_centroids, to_normalised

TRITON_BITS = (2, 4, 8)


def encode_qvg(x: torch.Tensor, config: QVGConfig, seq_dim: int = -2, role: str = "key",
               init_centroids: Optional[torch.Tensor] = None) -> QVGSegment:
    """`qvg_compile.quant.qvg.encode_qvg` with Triton kernels on CUDA (reference elsewhere, and for
    3-bit codes or head dims that are not a power of two)."""
    if isinstance(x, torch.Tensor) and x.is_cuda and triton_supports(x, config, role):
        return triton_encode(x, config, seq_dim, role, init_centroids)
    return reference_encode(x, config, seq_dim, role, init_centroids)


def triton_supports(x: torch.Tensor, config: QVGConfig, role: str) -> bool:
    d = x.shape[-1]
    return (config.bits_for(role) in TRITON_BITS and d >= 16 and d & (d - 1) == 0
            and config.group_size <= d and config.method == "qvg")


def triton_encode(x: torch.Tensor, config: QVGConfig, seq_dim: int = -2, role: str = "key",
                  init_centroids: Optional[torch.Tensor] = None) -> QVGSegment:
    """The Triton path of `encode_qvg` on any device Triton runs on (CPU tensors under
    ``TRITON_INTERPRET=1``)."""
    from . import _triton_encode as tk

    seq_dim = check_input(x, config, seq_dim)
    if not triton_supports(x, config, role):
        raise ValueError(f"config: bits {config.bits_for(role)}, method {config.method!r} or head_dim "
                         f"{x.shape[-1]} is not handled by the Triton encoder; use encode_qvg")
    bits = config.bits_for(role)
    xs = to_normalised(x, seq_dim)
    lead, (n, d) = xs.shape[:-2], xs.shape[-2:]
    x4 = xs if len(lead) == 2 else xs.reshape(-1 if lead else 1, lead[-1] if lead else 1, n, d)
    g = x4.shape[0] * x4.shape[1]
    stages = config.stages
    c = config.centroids
    if stages and c > n:
        raise ValueError(f"config.centroids: {c} centroids for a segment of {n} tokens; use at most as many "
                         "centroids as tokens (pick a smaller codebook for short segments)")
    if config.init == "given" and stages and init_centroids is None:
        raise ValueError("init_centroids: config.init is 'given' but no centroids were passed")
    if init_centroids is not None and tuple(init_centroids.shape) != (stages, *lead, c, d):
        raise ValueError(f"init_centroids: expected shape {[stages, *lead, c, d]}, got {list(init_centroids.shape)}")
    cdtype = config.torch_centroid_dtype
    centroids = torch.empty(stages, g, c, d, dtype=cdtype, device=x.device)
    assignments = torch.empty(stages, g, n, dtype=torch.uint8, device=x.device)
    src = x4
    for s in range(stages):
        if init_centroids is not None:
            cent = init_centroids[s].reshape(g, c, d).to(x.device, torch.float32)
        else:
            init = "random" if config.init == "given" else config.init
            cent = _initial(src, c, init, config.seed + s)
        threshold = -1.0
        if config.kmeans_tol > 0 and config.kmeans_iters:
            threshold = config.kmeans_tol * float(src.float().pow(2).mean().sqrt())
        for _ in range(config.kmeans_iters):
            a = tk.assign(src, cent)
            new = tk.update(src, a, cent)
            shift = float((new - cent).norm(dim=-1).max()) if threshold >= 0 else 0.0
            cent = new
            if threshold >= 0 and shift <= threshold:
                break
        assignments[s] = tk.assign(src, cent)
        centroids[s] = cent.to(cdtype)
        if s + 1 < stages:
            res = src.reshape(g, n, d).float() - gather_centroids(centroids[s], assignments[s])
            src = res.view(1, g, n, d)
    codes, scales, zeros, flags = tk.quantize(x4, centroids, assignments, bits, config.group_size,
                                              config.code_mode, config.torch_scale_dtype)
    if bool(flags.any()):
        raise ValueError("x: a scale or zero point exceeds the range of the scale dtype "
                         f"({config.scale_dtype}); use scale_dtype='fp16' or normalise the input")
    return QVGSegment(
        codes=codes.view(*lead, n, -1),
        scales=scales.view(*lead, n, -1),
        zeros=zeros.view(*lead, n, -1) if config.code_mode == "asymmetric" else None,
        assignments=assignments.view(stages, *lead, n),
        centroids=centroids.view(stages, *lead, c, d),
        bits=bits, group_size=config.group_size, code_mode=config.code_mode,
        shape=x.shape, dtype=x.dtype, seq_dim=seq_dim,
    )


def _initial(src: torch.Tensor, c: int, init: str, seed: int) -> torch.Tensor:
    """The math layer's seeded initial centroids ``[G, C, D]`` fp32, gathering only the picked rows."""
    b1, b2, n, d = src.shape
    g = b1 * b2
    if init == "random":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        picks = torch.rand(g, n, generator=gen).topk(c, dim=1).indices.to(src.device)
        sets = torch.arange(g, device=src.device).unsqueeze(1)
        # Index the picked rows in place: no copy of a strided (BSHD) input.
        return src[sets // b2, sets % b2, picks].float()
    return ref_init(src.reshape(g, n, d), c, init, seed)


def _sets(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"x: expected [B1, B2, N, D], got {list(x.shape)}")
    b1, b2, n, d = x.shape
    return x, b1 * b2, n, d


@torch.library.custom_op("qvg::kmeans_assign", mutates_args=())
def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid: x ``[B1, B2, N, D]``, centroids ``[B1*B2, C, D]`` -> uint8 ``[B1*B2, N]``."""
    x, g, n, d = _sets(x)
    if x.is_cuda:
        from ._triton_encode import assign

        return assign(x, centroids)
    idx, _ = ref_assign(x.reshape(g, n, d), centroids)
    return idx.to(torch.uint8)


@kmeans_assign.register_fake
def _(x, centroids):
    return x.new_empty(x.shape[0] * x.shape[1], x.shape[2], dtype=torch.uint8)


@torch.library.custom_op("qvg::kmeans_update", mutates_args=())
def kmeans_update(x: torch.Tensor, assignments: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Cluster means fp32 ``[G, C, D]``; empty clusters keep ``previous``."""
    x, g, n, d = _sets(x)
    if x.is_cuda:
        from ._triton_encode import update

        return update(x, assignments, previous)
    return ref_update(x.reshape(g, n, d), assignments.long(), previous)


@kmeans_update.register_fake
def _(x, assignments, previous):
    return previous.new_empty(previous.shape, dtype=torch.float32)


@torch.library.custom_op("qvg::quantize_residual", mutates_args=())
def quantize_residual(x: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor, bits: int,
                      group_size: int, code_mode: str, scale_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[G, N, D*bits/8]``, scales ``[G, N, D/G]`` and zeros (``[G, N, D/G]`` in asymmetric
    mode, else ``[G, N, 0]``) of x ``[B1, B2, N, D]`` minus its centroids ``[S, G, C, D]``."""
    x, g, n, d = _sets(x)
    if x.is_cuda:
        from ._triton_encode import quantize

        codes, scales, zeros, flags = quantize(x, centroids, assignments, bits, group_size, code_mode, scale_dtype)
        return codes, scales, zeros
    r = x.reshape(g, n, d).float()
    for s in range(assignments.shape[0]):
        r = r - gather_centroids(centroids[s], assignments[s])
    q = group_quantize(r, bits, group_size, code_mode, scale_dtype)
    zeros = q.zeros if q.zeros is not None else q.scales.new_empty(g, n, 0)
    return q.codes, q.scales, zeros


@quantize_residual.register_fake
def _(x, centroids, assignments, bits, group_size, code_mode, scale_dtype):
    g, n, d = x.shape[0] * x.shape[1], x.shape[2], x.shape[3]
    ng = d // group_size
    return (x.new_empty(g, n, d * bits // 8, dtype=torch.uint8), x.new_empty(g, n, ng, dtype=scale_dtype),
            x.new_empty(g, n, ng if code_mode == "asymmetric" else 0, dtype=scale_dtype))
