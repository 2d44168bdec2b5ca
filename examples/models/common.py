"""Building blocks shared by the reference models: patchify, timestep embedding, norms, FFNs,
RoPE (complex fp64 and real cos/sin forms), the flow-matching schedule and input checks.

Nothing here touches a KV cache: each model file owns its family's cache idioms, so the cache
code is read in one place per family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------- checks


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an int (not a bool) ``>= minimum``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_tensor(name: str, value: object, shape: Sequence[int | None]) -> torch.Tensor:
    """Check ``value`` is a tensor of ``len(shape)`` dims whose sizes match (``None``: any)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(value.shape)}")
    return value


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first parameter: where and how caches are allocated."""
    param = next(model.parameters())
    return param.device, param.dtype


def new_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``, so noise is drawn where it is used."""
    check_int("seed", seed, minimum=0)
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn in fp32 (same stream whatever ``dtype``), then cast."""
    return torch.randn(tuple(shape), generator=gen, device=gen.device, dtype=torch.float32).to(dtype)


# ------------------------------------------------------------------------------ embeddings


class PatchEmbed3d(nn.Module):
    """Non-overlapping 3D patchify: ``[B, C, F, H, W]`` -> tokens ``[B, f*h*w, dim]``.

    Tokens are ordered frame-major (then row, then column), so one latent frame is a contiguous
    run of ``h*w`` tokens: every model here relies on that to slice the sequence per frame.
    """

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``x [B, C, F, H, W]`` -> (tokens ``[B, N, dim]``, grid ``(f, h, w)``)."""
        y = self.proj(x)
        grid = (y.shape[2], y.shape[3], y.shape[4])
        return y.flatten(2).transpose(1, 2), grid


def unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int
) -> torch.Tensor:
    """Inverse of :class:`PatchEmbed3d` for a head output ``[B, N, pt*ph*pw*C]`` -> ``[B, C, F, H, W]``."""
    f, h, w = grid
    pt, ph, pw = patch
    b = tokens.shape[0]
    x = tokens.reshape(b, f, h, w, pt, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, f * pt, h * ph, w * pw)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of timesteps ``t [...]`` (any float) -> ``[..., dim]`` fp32.

    Computed in fp64 as Wan does: timesteps up to 1000 times frequencies near 1 lose the low
    bits of the phase in fp32.
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float64) / half)
    args = t.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()


class TimestepEmbedding(nn.Module):
    """Timesteps ``[B, F]`` (0..1000, one per latent frame) -> ``[B, F, dim]`` in the weights' dtype."""

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(t, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(emb)))


# ------------------------------------------------------------------------------ layers


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in fp32 (bf16 mean of squares underflows)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class GeluFFN(nn.Module):
    """``Linear -> GELU(tanh) -> Linear`` (Wan, HunyuanVideo)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLUFFN(nn.Module):
    """``W2(silu(W1 x) * W3 x)`` without biases (LongCat, MAGI)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def per_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """View tokens ``[B, F*T, C]`` as ``[B, F, T, C]`` so per-frame modulation broadcasts."""
    return x.unflatten(1, (frames, -1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``x [B, N, C]`` with per-frame ``shift``/``scale [B, F, C]`` -> ``[B, N, C]``."""
    frames = shift.shape[1]
    return (per_frame(x, frames) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-frame gate ``g [B, F, C]`` on ``x [B, N, C]``."""
    return (per_frame(x, g.shape[1]) * g.unsqueeze(2)).flatten(1, 2)


# ------------------------------------------------------------------------------ RoPE


def wan_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split of ``head_dim`` channels over (t, h, w) as in Wan: 44/42/42 for 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def check_rope_axes(axes: tuple[int, int, int], head_dim: int) -> None:
    """Each axis rotates channel pairs, so each must be even; together they cover ``head_dim``."""
    if len(axes) != 3 or sum(axes) != head_dim or any(a <= 0 or a % 2 for a in axes):
        raise ValueError(f"rope axes {axes} must be 3 positive even sizes summing to head_dim={head_dim}")


def rope_angles_3d(
    frame_pos: torch.Tensor, h: int, w: int, axes: tuple[int, int, int], theta: float
) -> torch.Tensor:
    """Rotation angles of a ``(F, h, w)`` token grid -> ``[F*h*w, head_dim/2]`` fp64.

    ``frame_pos [F]`` holds absolute frame positions (AR models place a chunk after its history);
    rows and columns start at 0. Token order matches :class:`PatchEmbed3d`.
    """
    device = frame_pos.device
    f = frame_pos.shape[0]

    def axis(pos: torch.Tensor, size: int) -> torch.Tensor:
        inv = torch.pow(theta, -torch.arange(0, size, 2, device=device, dtype=torch.float64) / size)
        return torch.outer(pos.to(torch.float64), inv)

    t_ang = axis(frame_pos, axes[0])[:, None, None, :].expand(f, h, w, -1)
    h_ang = axis(torch.arange(h, device=device), axes[1])[None, :, None, :].expand(f, h, w, -1)
    w_ang = axis(torch.arange(w, device=device), axes[2])[None, None, :, :].expand(f, h, w, -1)
    return torch.cat([t_ang, h_ang, w_ang], dim=-1).reshape(f * h * w, -1)


def rope_complex(angles: torch.Tensor) -> torch.Tensor:
    """Angles ``[N, D/2]`` fp64 -> unit complex128 rotations (Wan keeps its RoPE table this way)."""
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Wan-style RoPE on ``x [B, N, H, D]`` with ``freqs [N, D/2]`` complex128 -> ``x``'s dtype.

    Adjacent channel pairs are one complex number; the product runs in complex128 like the
    original (the backend must recognise an fp64 complex ``mul`` between projection and cache).
    """
    b, n, h, d = x.shape
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, n, h, d // 2, 2))
    out = torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3)
    return out.to(x.dtype)


def rope_cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles ``[N, D/2]`` -> (cos, sin) ``[N, D]`` fp32, each value repeated for its channel pair."""
    ang = angles.float().repeat_interleave(2, dim=-1)
    return torch.cos(ang), torch.sin(ang)


def apply_rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Real-form RoPE on interleaved channel pairs, computed in fp32, returned in ``x``'s dtype.

    ``cos``/``sin`` must broadcast against ``x`` (e.g. ``[N, D]`` for ``x [B, H, N, D]``, or
    ``[N, 1, D]`` for ``x [B, N, H, D]``).
    """
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


# ------------------------------------------------------------------------ flow matching


def shifted_sigma(t: float, shift: float) -> float:
    """Noise level of timestep ``t`` in [0, 1000] under the shifted flow-matching schedule.

    ``x_t = (1 - sigma) x0 + sigma * noise``; the shift spends more steps at high noise, as
    Wan/Self-Forcing's scheduler does (shift 5 maps t=500 to sigma=0.83).
    """
    if not 0.0 <= t <= 1000.0:
        raise ValueError(f"timestep must be in [0, 1000], got {t}")
    s = t / 1000.0
    return shift * s / (1.0 + (shift - 1.0) * s)


def sigma_schedule(num_steps: int, shift: float) -> list[float]:
    """``num_steps + 1`` decreasing noise levels from 1 to 0 for Euler flow-matching sampling."""
    check_int("num_steps", num_steps)
    return [shifted_sigma(1000.0 * (1 - i / num_steps), shift) for i in range(num_steps + 1)]


def timesteps_for(sigma: float, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """A ``[B, F]`` fp32 tensor of the model timestep (``1000 * sigma``) for every frame."""
    return torch.full(tuple(shape), 1000.0 * sigma, device=device, dtype=torch.float32)


class LatentGeometry:
    """Shared by the model configs: heads and the per-frame token grid, and their checks. Needs the
    fields ``dim``, ``num_heads``, ``patch_size`` (t, h, w), ``in_channels``, ``latent_height``,
    ``latent_width``."""

    def check_geometry(self, cache: str = "the cache") -> None:
        """Heads divide ``dim``, the head dim fits Wan's 3D RoPE, one latent frame per patch in
        time (the cache is per latent frame) and the patch tiles the latent frame."""
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        check_rope_axes(wan_rope_axes(self.head_dim), self.head_dim)
        if self.patch_size[0] != 1:
            raise ValueError(f"{cache} is per latent frame: patch_size[0] must be 1")
        if self.latent_height % self.patch_size[1] or self.latent_width % self.patch_size[2]:
            raise ValueError("latent height/width must be multiples of the patch size")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def latent_shape(self, batch: int, frames: int) -> tuple[int, int, int, int, int]:
        """Shape ``[B, C, F, H, W]`` of ``frames`` latent frames for ``batch`` videos."""
        return (batch, self.in_channels, frames, self.latent_height, self.latent_width)

    @property
    def frame_tokens(self) -> int:
        """Tokens per latent frame after patchify (1,560 for the real configs)."""
        return (self.latent_height // self.patch_size[1]) * (self.latent_width // self.patch_size[2])


@dataclass(frozen=True)
class DiTConfig(LatentGeometry):
    """The fields every reference model's config starts with: width, prompt and latent frame size.
    Each model's config adds its own sampler and cache fields after these."""

    num_layers: int
    dim: int
    num_heads: int
    ffn_dim: int
    text_dim: int
    text_len: int
    latent_height: int
    latent_width: int
    in_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
