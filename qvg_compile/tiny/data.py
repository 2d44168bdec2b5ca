"""Training and prompt videos, made on the fly and deterministic from a seed: camera pans, zooms
and oscillations over natural photographs, with moving sprites on top.

The photographs are the sample images that ship inside scikit-image's wheel (``skimage/data``);
they are read with Pillow from the installed package without importing scikit-image, and nothing
is downloaded. Install them with ``pip install "qvg-compile[train]"``. Where scikit-image or
Pillow is missing (a bare GPU machine), `procedural_photos` stands in: deterministic textures with
a natural image's 1/f spectrum and a few flat-coloured shapes. Frames are ``[-1, 1]``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

TRAIN_PHOTOS = ("astronaut", "coffee", "hubble_deep_field", "ihc", "motorcycle_left", "retina",
                "camera", "brick", "grass", "gravel", "moon", "coins")
HELD_OUT_PHOTOS = ("chelsea", "rocket")


def photos_available() -> bool:
    """Whether scikit-image's photos and Pillow (which reads them) are installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("skimage", "PIL"))


def procedural_photos(count: int, side: int = 160, seed: int = 0) -> torch.Tensor:
    """``count`` textures ``[count, 3, side, side]`` float32 in [-1, 1], deterministic from ``seed``.

    Each is coloured noise with a 1/f amplitude spectrum (the statistics of natural photographs:
    edges and smooth regions at every scale) under 4-8 flat-coloured discs and boxes with soft
    edges, so that tokens fall into regions as they do on photos."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count: expected a positive int, got {count!r}")
    if not isinstance(side, int) or side < 8:
        raise ValueError(f"side: expected an int >= 8, got {side!r}")
    gen = torch.Generator().manual_seed(seed)
    f = torch.fft.fftfreq(side)
    radius = torch.hypot(f[:, None], f[None, :]).clamp_min(1.0 / side)
    spectrum = torch.randn(count, 3, side, side, generator=gen) / radius ** 1.5
    noise = torch.fft.ifft2(spectrum * torch.exp(2j * torch.pi * torch.rand(count, 3, side, side, generator=gen))).real
    noise = noise / noise.flatten(1).std(dim=1)[:, None, None, None]
    # Mostly shared luminance, a little independent chroma, as in photographs.
    mix = 0.5 + torch.randn(count, 3, 3, generator=gen) * 0.25 + 0.3 * torch.eye(3)
    out = torch.einsum("pij,pjhw->pihw", mix, noise) * 0.3
    yy, xx = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    for p in range(count):
        for _ in range(int(torch.randint(4, 9, (1,), generator=gen))):
            cx, cy, r = (torch.rand(3, generator=gen) * torch.tensor([side, side, side / 4.0])).tolist()
            r += side / 16
            d = torch.hypot(xx - cx, yy - cy) if torch.rand(1, generator=gen) < 0.5 else \
                torch.maximum((xx - cx).abs(), (yy - cy).abs())
            alpha = (r - d + 1.0).clamp(0, 1)
            colour = torch.rand(3, 1, 1, generator=gen) * 1.6 - 0.8
            out[p] = out[p] * (1 - alpha) + (colour + 0.15 * out[p]) * alpha
    return out.clamp(-1, 1)


def photo_dir() -> Path:
    """The folder of scikit-image's bundled sample images."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the training photos are scikit-image's sample images: "
                          "pip install 'qvg-compile[train]' (or scikit-image)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_photos(names: Sequence[str] = TRAIN_PHOTOS, side: int = 160) -> torch.Tensor:
    """Photos ``[P, 3, side, side]`` float32 in [-1, 1]: centre square, Lanczos-resized, gray as RGB."""
    from PIL import Image

    if not names:
        raise ValueError("names: expected at least one photo name")
    if not isinstance(side, int) or side < 8:
        raise ValueError(f"side: expected an int >= 8, got {side!r}")
    folder = photo_dir()
    out = []
    for name in names:
        matches = sorted(folder.glob(f"{name}.*"))
        if not matches:
            raise ValueError(f"names: no sample image {name!r} in {folder}")
        img = Image.open(matches[0]).convert("RGB")
        s = min(img.size)
        left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((side, side), Image.LANCZOS)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(side, side, 3)
        out.append(data.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


class ClipSampler:
    """Random clips ``[B, T, 3, size, size]`` from ``photos`` ``[P, 3, S, S]`` (on the device
    the clips should be made on). All random choices come from a CPU generator seeded with
    ``seed``, so a seed gives the same clips on every device (up to float rounding)."""

    def __init__(self, photos: torch.Tensor, size: int = 32, frames: int = 24, seed: int = 0,
                 max_sprites: int = 3) -> None:
        if photos.dim() != 4 or photos.shape[1] != 3:
            raise ValueError(f"photos: expected [P, 3, S, S], got {list(photos.shape)}")
        for name, value in (("size", size), ("frames", frames)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(max_sprites, int) or max_sprites < 0:
            raise ValueError(f"max_sprites: expected a non-negative int, got {max_sprites!r}")
        self.photos, self.size, self.frames, self.max_sprites = photos, size, frames, max_sprites
        self.generator = torch.Generator().manual_seed(seed)

    def _u(self, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator) * (high - low) + low

    def sample(self, batch: int) -> torch.Tensor:
        """``batch`` clips ``[B, T, 3, size, size]`` in [-1, 1] on the photos' device."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected a positive int, got {batch!r}")
        device = self.photos.device
        index = torch.randint(len(self.photos), (batch,), generator=self.generator)
        background = self._camera(batch).to(device)
        frames = F.grid_sample(self.photos[index.to(device)], background, mode="bilinear",
                               padding_mode="reflection", align_corners=False)
        frames = frames.view(batch, 3, self.frames, self.size, self.size).permute(0, 2, 1, 3, 4)
        return self._sprites(frames).clamp(-1, 1).contiguous()

    def _camera(self, b: int) -> torch.Tensor:
        """Sampling grid ``[B, T*size, size, 2]``: per frame, a window of half-width ``w_t``
        centred at ``c_t`` in the photo's [-1, 1] coordinates (pan + optional zoom + oscillation)."""
        t = torch.arange(self.frames, dtype=torch.float32)
        w0 = self._u(b, low=0.2, high=0.45)
        zoom = self._u(b, low=-0.015, high=0.015) * (self._u(b) < 0.5)
        w = w0[:, None] * torch.exp(zoom[:, None] * t)                          # [B, T]
        px = 2 * w0 / self.size                                                 # one output pixel
        speed = self._u(b, low=0.0, high=1.5) * px
        angle = self._u(b, high=2 * math.pi)
        centre = self._u(b, 2, low=-1, high=1) * (1 - w0[:, None])
        path = centre[:, None, :] + (speed[:, None] * t)[..., None] * torch.stack([angle.cos(), angle.sin()], -1)[:, None]
        amp = self._u(b, low=2.0, high=8.0) * px * (self._u(b) < 0.3)
        period = self._u(b, low=8.0, high=24.0)
        phase = self._u(b, high=2 * math.pi)
        swing = self._u(b, high=2 * math.pi)
        wave = amp[:, None] * torch.sin(2 * math.pi * t / period[:, None] + phase[:, None])
        path = path + wave[..., None] * torch.stack([swing.cos(), swing.sin()], -1)[:, None]
        u = (2 * torch.arange(self.size, dtype=torch.float32) + 1) / self.size - 1
        gx = path[:, :, None, None, 0] + w[:, :, None, None] * u[None, None, None, :]
        gy = path[:, :, None, None, 1] + w[:, :, None, None] * u[None, None, :, None]
        grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)               # [B, T, size, size, 2]
        return grid.reshape(b, self.frames * self.size, self.size, 2)

    def _sprites(self, frames: torch.Tensor) -> torch.Tensor:
        """Paint up to ``max_sprites`` discs and squares moving at constant speed, bouncing off
        the borders, with anti-aliased edges. Sizes and speeds are in units of a 32-pixel frame."""
        b, n = frames.shape[0], self.max_sprites
        if n == 0:
            return frames
        size = float(self.size)
        unit = size / 32
        live = torch.arange(n)[None, :] < torch.randint(0, n + 1, (b, 1), generator=self.generator)
        radius = self._u(b, n, low=2.0, high=5.0) * unit
        square = self._u(b, n) < 0.5
        colour = self._u(b, n, 3, low=-1.0, high=1.0)
        start = radius[..., None] + self._u(b, n, 2) * (size - 2 * radius[..., None])
        velocity = self._u(b, n, 2, low=-1.5, high=1.5) * unit
        t = torch.arange(self.frames, dtype=torch.float32)
        span = (size - 2 * radius)[:, :, None, None]
        travel = (start[:, :, None, :] - radius[:, :, None, None] + velocity[:, :, None, :] * t[None, None, :, None])
        folded = travel.remainder(2 * span)
        pos = radius[:, :, None, None] + span - (folded - span).abs()            # [B, n, T, 2]
        device = frames.device
        pos, radius, square, colour, live = (x.to(device) for x in (pos, radius, square, colour, live))
        centres = torch.arange(self.size, device=device, dtype=torch.float32) + 0.5
        dx = centres[None, None, None, None, :] - pos[..., 0, None, None]
        dy = centres[None, None, None, :, None] - pos[..., 1, None, None]
        dist = torch.where(square[:, :, None, None, None], torch.maximum(dx.abs(), dy.abs()), torch.hypot(dx, dy))
        alpha = (radius[:, :, None, None, None] - dist + 0.5).clamp(0, 1) * live[:, :, None, None, None]
        for i in range(n):
            a = alpha[:, i, :, None]                                            # [B, T, 1, H, W]
            frames = frames * (1 - a) + colour[:, i, None, :, None, None] * a
        return frames


def prompt_clips(count: int, frames: int, size: int = 32, seed: int = 1234,
                 photos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``count`` clips ``[count, frames, 3, size, size]`` over the held-out photos (never seen
    in training): the prompts shipped with the checkpoint and the ground truth they start."""
    photos = load_photos(HELD_OUT_PHOTOS) if photos is None else photos
    return ClipSampler(photos, size=size, frames=frames, seed=seed).sample(count)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 (round to nearest)."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1] float32."""
    return frames.float() / 127.5 - 1.0
