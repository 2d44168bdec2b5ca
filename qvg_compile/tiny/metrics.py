"""Per-frame video quality: PSNR and SSIM of a video against a reference video."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check(reference: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if reference.dim() != 5 or reference.shape != test.shape:
        raise ValueError(f"reference, test: expected equal shapes [B, T, C, H, W], got "
                         f"{list(reference.shape)} and {list(test.shape)}")
    # [-1, 1] -> [0, 1]: PSNR and SSIM below use a peak of 1.
    return (reference.float().clamp(-1, 1) + 1) / 2, (test.float().clamp(-1, 1) + 1) / 2


def psnr_per_frame(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per frame ``[T]`` (MSE averaged over the batch), frames in [-1, 1] with peak-to-peak 2;
    identical frames give ``inf``."""
    r, t = _check(reference, test)
    mse = (r - t).pow(2).mean(dim=(0, 2, 3, 4))
    return torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-30)), torch.full_like(mse, math.inf))


def _gaussian(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_per_frame(reference: torch.Tensor, test: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per frame ``[T]`` (Wang et al. 2004: Gaussian window, K1=0.01, K2=0.03, dynamic range 1,
    valid positions only, channels and batch averaged). ``window`` is 7 because frames are small."""
    r, t = _check(reference, test)
    b, n, c, h, w = r.shape
    if min(h, w) < window:
        raise ValueError(f"window: expected at most the frame size {min(h, w)}, got {window}")
    kernel = _gaussian(window, sigma, r.device).expand(b * n * c, 1, window, window)
    x, y = r.reshape(1, -1, h, w), t.reshape(1, -1, h, w)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, kernel, groups=b * n * c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return ssim.reshape(b, n, c, -1).mean(dim=(0, 2, 3))
