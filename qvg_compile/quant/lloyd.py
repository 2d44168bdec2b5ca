"""Batched k-means (Lloyd) over independent token sets, the reference for the Triton kernel.

Input ``x`` ``[G, N, D]``: G independent sets (one per batch x head) of N token vectors.
- Assignment uses ``argmin_c ||c||^2 - 2 x.c`` computed by a matrix product over chunks of tokens,
  so at most ``chunk x C`` distances exist at a time, never the full ``N x C`` matrix.
- The mean update is a one-hot matrix product accumulated in fp32: no float atomics, so the
  result does not depend on thread scheduling (bit-identical for a seed on a given device).
- Random choices (initial tokens, k-means++ sampling) use a CPU generator seeded with ``seed``,
  so the same seed picks the same tokens on every device.
- An empty cluster keeps its previous centroid; iteration stops early when no centroid moves by
  more than ``tol`` times the RMS of ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_MAX_CHUNK_ELEMENTS = 1 << 24


@dataclass
class KMeansResult:
    """Centroids ``[G, C, D]`` fp32, assignments ``[G, N]`` int64, and the objective history.

    ``inertia[t]`` is the summed squared distance of every token to its nearest centroid after
    the t-th assignment step (the last entry belongs to the returned centroids).
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    inertia: list[float]
    iterations: int


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every token: (assignments ``[G, N]`` int64, squared distances ``[G, N]`` fp32)."""
    _check_sets(x, "x")
    _check_sets(centroids, "centroids")
    if centroids.shape[0] != x.shape[0] or centroids.shape[2] != x.shape[2]:
        raise ValueError(f"centroids: expected [{x.shape[0]}, C, {x.shape[2]}], got {list(centroids.shape)}")
    g, n, _ = x.shape
    c = centroids.float()
    c_norm = (c * c).sum(-1).unsqueeze(1)
    chunk = max(1, min(n, _MAX_CHUNK_ELEMENTS // max(1, g * c.shape[1])))
    idx = torch.empty(g, n, dtype=torch.int64, device=x.device)
    dist = torch.empty(g, n, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk):
        xs = x[:, start:start + chunk].float()
        partial = torch.baddbmm(c_norm, xs, c.transpose(1, 2), alpha=-2.0)
        best, arg = partial.min(-1)
        idx[:, start:start + chunk] = arg
        dist[:, start:start + chunk] = (best + (xs * xs).sum(-1)).clamp_min_(0)
    return idx, dist


def update(x: torch.Tensor, assignments: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Mean of each cluster ``[G, C, D]`` fp32; empty clusters keep ``previous``."""
    g, n, d = x.shape
    c = previous.shape[1]
    sums = torch.zeros(g, c, d, dtype=torch.float32, device=x.device)
    counts = torch.zeros(g, c, dtype=torch.float32, device=x.device)
    chunk = max(1, min(n, _MAX_CHUNK_ELEMENTS // max(1, g * c)))
    classes = torch.arange(c, device=x.device)
    for start in range(0, n, chunk):
        onehot = (assignments[:, start:start + chunk, None] == classes).float()
        sums.baddbmm_(onehot.transpose(1, 2), x[:, start:start + chunk].float())
        counts += onehot.sum(1)
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    return torch.where((counts > 0).unsqueeze(-1), means, previous.float())


def init_centroids(x: torch.Tensor, num_centroids: int, method: str, seed: int) -> torch.Tensor:
    """Seeded initial centroids ``[G, C, D]`` fp32 chosen among the tokens of each set."""
    g, n, d = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if method == "random":
        picks = torch.rand(g, n, generator=gen).topk(num_centroids, dim=1).indices
        return torch.gather(x.float(), 1, picks.to(x.device).unsqueeze(-1).expand(g, num_centroids, d))
    if method == "kmeans++":
        xf = x.float()
        first = torch.randint(n, (g,), generator=gen).to(x.device)
        cents = [xf[torch.arange(g, device=x.device), first]]
        best = ((xf - cents[0].unsqueeze(1)) ** 2).sum(-1)
        for _ in range(1, num_centroids):
            weights = best.cpu().double() + 1e-30
            pick = torch.multinomial(weights, 1, generator=gen).squeeze(1).to(x.device)
            cents.append(xf[torch.arange(g, device=x.device), pick])
            best = torch.minimum(best, ((xf - cents[-1].unsqueeze(1)) ** 2).sum(-1))
        return torch.stack(cents, 1)
    raise ValueError(f"init: expected 'random' or 'kmeans++' (or given centroids), got {method!r}")


def kmeans(
    x: torch.Tensor,
    num_centroids: int,
    iters: int,
    tol: float = 0.0,
    init: str = "random",
    seed: int = 0,
    centroids: Optional[torch.Tensor] = None,
) -> KMeansResult:
    """Lloyd's k-means on each of the ``G`` sets of ``x`` ``[G, N, D]``.

    Args:
        num_centroids: C, at most N.
        iters: maximum number of update steps (0 only assigns to the initial centroids).
        tol: early stop once the largest centroid move is ``<= tol * rms(x)``.
        init: ``"random"`` or ``"kmeans++"`` (seeded with ``seed``); ignored when ``centroids``
            ``[G, C, D]`` are given (warm start).
    """
    _check_sets(x, "x")
    g, n, d = x.shape
    if not isinstance(num_centroids, int) or num_centroids < 1:
        raise ValueError(f"num_centroids: expected a positive int, got {num_centroids!r}")
    if num_centroids > n:
        raise ValueError(
            f"num_centroids: {num_centroids} centroids for {n} tokens; use at most as many "
            "centroids as tokens (pick a smaller codebook for short segments)"
        )
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters: expected a non-negative int, got {iters!r}")
    if centroids is None:
        c = init_centroids(x, num_centroids, init, seed)
    else:
        if tuple(centroids.shape) != (g, num_centroids, d):
            raise ValueError(f"centroids: expected shape {[g, num_centroids, d]}, got {list(centroids.shape)}")
        if centroids.device != x.device:
            raise ValueError(f"centroids: expected device {x.device}, got {centroids.device}")
        c = centroids.float()
    threshold = tol * float(x.float().pow(2).mean().sqrt()) if tol > 0 else -1.0
    inertia: list[float] = []
    done = 0
    for _ in range(iters):
        a, dist = assign(x, c)
        inertia.append(float(dist.sum()))
        new = update(x, a, c)
        shift = float((new - c).norm(dim=-1).max()) if threshold >= 0 else 0.0
        c = new
        done += 1
        if threshold >= 0 and shift <= threshold:
            break
    a, dist = assign(x, c)
    inertia.append(float(dist.sum()))
    return KMeansResult(c, a, inertia, done)


def _check_sets(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name}: expected rank 3 [G, N, D], got shape {list(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
