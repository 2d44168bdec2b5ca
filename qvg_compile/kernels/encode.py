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

import functools
import math
from typing import Optional, Sequence

import torch

from ..quant.lloyd import assign as ref_assign
from ..quant.lloyd import init_centroids as ref_init
from ..quant.lloyd import update as ref_update
from ..quant.config import QVGConfig
from ..quant.group import group_quantize
from ..quant.qvg import check_input
from ..quant.qvg import encode_qvg as reference_encode
from ..quant.segment import QVGSegment, gather_centroids, residual_energy, to_normalised

TRITON_BITS = (2, 4, 8)


def encode_qvg(x: torch.Tensor, config: QVGConfig, seq_dim: int = -2, role: str = "key",
               init_centroids: Optional[torch.Tensor] = None) -> QVGSegment:
    """`qvg_compile.quant.qvg.encode_qvg` with Triton kernels on CUDA (reference elsewhere, and for
    3-bit codes or head dims that are not a power of two)."""
    if isinstance(x, torch.Tensor) and x.is_cuda and triton_supports(x, config, role):
        return triton_encode(x, config, seq_dim, role, init_centroids)
    return reference_encode(x, config, seq_dim, role, init_centroids)


def encode_qvg_pair(k: torch.Tensor, v: torch.Tensor, config: QVGConfig, seq_dim: int = -2,
                    init_k: Optional[torch.Tensor] = None, init_v: Optional[torch.Tensor] = None
                    ) -> tuple[QVGSegment, QVGSegment]:
    """`encode_qvg` of one layer's keys and values: ``(encode_qvg(k, ..., "key", init_k),
    encode_qvg(v, ..., "value", init_v))``, with the k-means kernels of both launched together on
    CUDA when k and v have the same shape, strides and dtype (same results as two calls)."""
    if all(isinstance(t, torch.Tensor) and t.is_cuda for t in (k, v)) and \
            triton_supports(k, config, "key") and triton_supports(v, config, "value"):
        ks, vs = triton_encode_many([k, v], config, seq_dim, ["key", "value"], [init_k, init_v])
        return ks, vs
    return (encode_qvg(k, config, seq_dim, "key", init_k), encode_qvg(v, config, seq_dim, "value", init_v))


def triton_supports(x: torch.Tensor, config: QVGConfig, role: str) -> bool:
    d = x.shape[-1]
    return (config.bits_for(role) in TRITON_BITS and d >= 16 and d & (d - 1) == 0
            and config.group_size <= d and config.method == "qvg")


def triton_encode(x: torch.Tensor, config: QVGConfig, seq_dim: int = -2, role: str = "key",
                  init_centroids: Optional[torch.Tensor] = None) -> QVGSegment:
    """The Triton path of `encode_qvg` on any device Triton runs on (CPU tensors under
    ``TRITON_INTERPRET=1``)."""
    return triton_encode_many([x], config, seq_dim, [role], [init_centroids])[0]


def triton_encode_many(xs: Sequence[torch.Tensor], config: QVGConfig, seq_dim: int = -2,
                       roles: Optional[Sequence[str]] = None,
                       inits: Optional[Sequence[Optional[torch.Tensor]]] = None, fused: Optional[bool] = None
                       ) -> list[QVGSegment]:
    """`triton_encode` of each of ``xs`` (roles default to "key"); tensors with the same shape,
    strides and dtype are encoded two at a time, one kernel launch for both. ``fused`` picks the
    Lloyd step (see `_triton_encode.lloyd_step`). One host sync in all: the final range and
    finiteness check."""
    roles = list(roles) if roles is not None else ["key"] * len(xs)
    inits = list(inits) if inits is not None else [None] * len(xs)
    if not len(roles) == len(inits) == len(xs):
        raise ValueError(f"roles, inits: expected {len(xs)} of each, got {len(roles)} and {len(inits)}")
    out, summary, _ = _encode_all(xs, config, seq_dim, roles, inits, fused)
    raise_on_summary(summary.tolist(), config)  # the one host sync of an encode
    return out


def encode_unchecked(x: torch.Tensor, config: QVGConfig, seq_dim: int = -2, role: str = "key",
                     init_centroids: Optional[torch.Tensor] = None, fit: bool = False
                     ) -> tuple[QVGSegment, torch.Tensor, Optional[torch.Tensor]]:
    """`encode_qvg` without its host sync: returns the segment, its refusal summary, int8 ``[2]``
    on x's device (``[range, non-finite]``: nonzero where a scale or zero point left the scale
    dtype's range, or where ``check_finite`` found NaN/Inf), for the caller to check when it can
    afford to wait (`raise_on_summary`), and with ``fit`` the segment's codebook fit over x (0-dim
    fp32 on x's device: `quant.segment.residual_energy`, summed in the quantize kernel on the
    Triton path), else None. Launches only, once a layout has been seen: CUDA-graph capturable
    when ``init_centroids`` is given, ``config.stages == 0``, or the start is seeded ``"random"``
    (its picks are drawn on the host at the first call and kept on the device). Inputs the
    Triton encoder does not take run the reference, which checks at once."""
    if isinstance(x, torch.Tensor) and x.is_cuda and triton_supports(x, config, role):
        segs, summary, fits = _encode_all([x], config, seq_dim, [role], [init_centroids], None)
        return segs[0], summary, fits[0] if fit else None
    seg = reference_encode(x, config, seq_dim, role, init_centroids)
    summary = torch.zeros(2, dtype=torch.int8, device=seg.codes.device)
    return seg, summary, residual_energy(x, seg) if fit else None


def _encode_all(xs: Sequence[torch.Tensor], config: QVGConfig, seq_dim: int, roles: list[str],
                inits: list[Optional[torch.Tensor]], fused: Optional[bool]
                ) -> tuple[list[QVGSegment], torch.Tensor, list[torch.Tensor]]:
    """The segments of ``xs``, the refusal summary of all of them and each one's codebook fit
    (0-dim fp32), launches only."""
    prepared = [_prepare(x, config, seq_dim, role, init) for x, role, init in zip(xs, roles, inits)]
    out: list[Optional[QVGSegment]] = [None] * len(xs)
    summaries, fits = [], []
    i = 0
    while i < len(xs):
        group = [i]
        a = prepared[i][0]
        if i + 1 < len(xs):
            b = prepared[i + 1][0]
            if b.shape == a.shape and b.stride() == a.stride() and b.dtype == a.dtype and b.device == a.device:
                group.append(i + 1)
        segs, summary, group_fits = _encode_group([xs[j] for j in group], [prepared[j] for j in group], config,
                                                  [roles[j] for j in group], [inits[j] for j in group], fused)
        for j, seg in zip(group, segs):
            out[j] = seg
        summaries.append(summary)
        fits.extend(group_fits.unbind())
        i += len(group)
    summary = summaries[0] if len(summaries) == 1 else torch.stack(summaries).amax(0)
    return out, summary, fits  # type: ignore[return-value]


def _prepare(x: torch.Tensor, config: QVGConfig, seq_dim: int, role: str, init: Optional[torch.Tensor]
             ) -> tuple[torch.Tensor, int]:
    """Validate one input; returns its ``[B1, B2, N, D]`` view and the normalised ``seq_dim``."""
    # Non-finite inputs are caught by the quantize kernel's flags (no extra pass over x).
    seq_dim = check_input(x, config.replace(check_finite=False), seq_dim)
    if not triton_supports(x, config, role):
        raise ValueError(f"config: bits {config.bits_for(role)}, method {config.method!r} or head_dim "
                         f"{x.shape[-1]} is not handled by the Triton encoder; use encode_qvg")
    xs = to_normalised(x, seq_dim)
    lead, (n, d) = xs.shape[:-2], xs.shape[-2:]
    x4 = xs if len(lead) == 2 else xs.reshape(-1 if lead else 1, lead[-1] if lead else 1, n, d)
    stages, c = config.stages, config.centroids
    if stages and c > n:
        raise ValueError(f"config.centroids: {c} centroids for a segment of {n} tokens; use at most as many "
                         "centroids as tokens (pick a smaller codebook for short segments)")
    if config.init == "given" and stages and init is None:
        raise ValueError("init_centroids: config.init is 'given' but no centroids were passed")
    if init is not None and tuple(init.shape) != (stages, *lead, c, d):
        raise ValueError(f"init_centroids: expected shape {[stages, *lead, c, d]}, got {list(init.shape)}")
    return x4, seq_dim


def _encode_group(xs: list[torch.Tensor], prepared: list[tuple[torch.Tensor, int]], config: QVGConfig,
                  roles: list[str], inits: list[Optional[torch.Tensor]], fused: Optional[bool]
                  ) -> tuple[list[QVGSegment], torch.Tensor, torch.Tensor]:
    """Encode one or two inputs whose ``[B1, B2, N, D]`` views share a grid; returns the segments,
    the refusal summary of all of them (int8 ``[2]``, not yet checked) and each input's codebook
    fit (fp32 ``[inputs]``), launches only."""
    from . import _triton_encode as tk

    x4s = [p[0] for p in prepared]
    parts = len(x4s)
    b1, b2, n, d = x4s[0].shape
    g0 = b1 * b2
    gt = parts * g0
    dev = x4s[0].device
    stages, c = config.stages, config.centroids
    cdtype = config.torch_centroid_dtype
    centroids = torch.empty(stages, gt, c, d, dtype=cdtype, device=dev)
    assignments = torch.empty(stages, gt, n, dtype=torch.uint8, device=dev)
    srcs = x4s
    for s in range(stages):
        starts = [_initial(piece, c, config, s, None if init is None else init[s])
                  for piece, init in zip(_split_sets(srcs, parts), inits)]
        cent = starts[0] if len(starts) == 1 else torch.cat(starts)
        book, cnorm = tk.codebook_buffers(gt, c, d, srcs[0].dtype, dev)
        cent = tk.finish(None, None, cent, book, cnorm)
        threshold = _threshold(srcs, parts, config)
        shifts = None if threshold is None else torch.zeros(config.kmeans_iters, parts, device=dev)
        for it in range(config.kmeans_iters):
            stop = None if threshold is None else tk.EarlyStop(shifts, threshold, it)
            cent = tk.lloyd_step(srcs, cent, book, cnorm, stop, fused)
        assignments[s] = tk.assign_book(srcs, book, cnorm)
        centroids[s] = cent.to(cdtype)
        if s + 1 < stages:
            res = torch.empty(gt, n, d, dtype=torch.float32, device=dev)
            for i, src in enumerate(_split_sets(srcs, parts)):
                res[i * g0:(i + 1) * g0] = src.reshape(g0, n, d)
            res -= gather_centroids(centroids[s], assignments[s])
            srcs = [res.view(1, gt, n, d)]
    nb = tk.quantize_blocks(n)
    flags = torch.empty(gt, nb, dtype=torch.int8, device=dev)
    energy = torch.empty(gt, nb, 2, dtype=torch.float32, device=dev)
    segs = []
    for i, (x, x4, role) in enumerate(zip(xs, x4s, roles)):
        sl = slice(i * g0, (i + 1) * g0)
        cents_i = centroids[:, sl] if parts == 1 else centroids[:, sl].clone()
        assign_i = assignments[:, sl] if parts == 1 else assignments[:, sl].clone()
        bits = config.bits_for(role)
        mode = config.code_mode_for(role)
        codes, scales, zeros, _, _ = tk.quantize(x4, cents_i, assign_i, bits, config.group_size, mode,
                                                 config.torch_scale_dtype, flags=flags[sl], energy=energy[sl],
                                                 check_finite=config.check_finite)
        xs_view = to_normalised(x, prepared[i][1])
        lead = xs_view.shape[:-2]
        segs.append(QVGSegment(
            codes=codes.view(*lead, n, -1),
            scales=scales.view(*lead, n, -1),
            zeros=zeros.view(*lead, n, -1) if mode == "asymmetric" else None,
            assignments=assign_i.view(stages, *lead, n),
            centroids=cents_i.view(stages, *lead, c, d),
            bits=bits, group_size=config.group_size, code_mode=mode,
            shape=x.shape, dtype=x.dtype, seq_dim=prepared[i][1],
        ))
    fits, summary = tk.close(flags, energy, parts)
    return segs, summary, fits


def _split_sets(srcs: list[torch.Tensor], parts: int) -> list[torch.Tensor]:
    """The per-input ``[B1', B2', N, D]`` pieces of ``srcs`` (the inputs, or the one residual of all)."""
    if len(srcs) == parts:
        return srcs
    res = srcs[0]
    g = res.shape[1] // parts
    return [res[:, i * g:(i + 1) * g] for i in range(parts)]


def _threshold(srcs: list[torch.Tensor], parts: int, config: QVGConfig) -> Optional[torch.Tensor]:
    """``kmeans_tol`` x RMS of each input, on the device (None without early stopping)."""
    if not (config.kmeans_tol > 0 and config.kmeans_iters):
        return None
    pieces = _split_sets(srcs, parts)
    norms = [torch.linalg.vector_norm(p, dtype=torch.float32) for p in pieces]
    norm = norms[0].unsqueeze(0) if len(norms) == 1 else torch.stack(norms)
    return norm * (config.kmeans_tol / math.sqrt(pieces[0].numel()))


def raise_on_summary(summary: Sequence[int], config: QVGConfig) -> None:
    """Raise the encoder's refusal for a summary read back to the host (see `encode_unchecked`)."""
    if summary[1] and config.check_finite:
        raise ValueError(
            "x: contains NaN or Inf; quantization would spread it over a whole group and codebook "
            "(set check_finite=False to skip this check at your own risk)")
    if summary[0]:
        raise ValueError("x: a scale or zero point exceeds the range of the scale dtype "
                         f"({config.scale_dtype}); use scale_dtype='fp16' or normalise the input")


def _initial(src: torch.Tensor, c: int, config: QVGConfig, stage: int, given: Optional[torch.Tensor]) -> torch.Tensor:
    """Initial centroids ``[G, C, D]`` fp32 of one input's sets: the given warm start, or the math
    layer's seeded choice, gathering only the picked rows."""
    b1, b2, n, d = src.shape
    g = b1 * b2
    if given is not None:
        return given.reshape(g, c, d).to(src.device, torch.float32)
    init = "random" if config.init == "given" else config.init
    seed = config.seed + stage
    if init == "random":
        outer, inner, picks = _random_picks(g, b2, n, c, seed, src.device)
        # Index the picked rows in place: no copy of a strided (BSHD) input.
        return src[outer, inner, picks].float()
    return ref_init(src.reshape(g, n, d), c, init, seed)


@functools.lru_cache(maxsize=64)
def _random_picks(g: int, b2: int, n: int, c: int, seed: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seeded tokens a ``"random"`` start picks: for ``g`` sets of ``b2`` per outer index, the
    outer and inner set index (``[G, 1]``) and the picked tokens (``[G, C]``), on ``device``. They
    depend on the shapes and the seed only, so they are drawn on the host once and kept: a seeded
    encode is then launches only (CUDA-graph capturable, no host copy, no index arithmetic)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    picks = torch.rand(g, n, generator=gen).topk(c, dim=1).indices.to(device)
    sets = torch.arange(g).unsqueeze(1)
    return (sets // b2).to(device), (sets % b2).to(device), picks


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

        codes, scales, zeros, _, _ = quantize(x, centroids, assignments, bits, group_size, code_mode, scale_dtype)
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
