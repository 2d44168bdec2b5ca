"""Files for people: a side-by-side GIF of videos and a PNG plot of PSNR over frames.

Pillow and matplotlib are optional (the ``demo`` extra); a missing one raises ImportError
saying what to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch

from .data import to_uint8


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"writing this file needs {package}: pip install 'qvg-compile[demo]' "
                          f"(or pip install {package})") from exc


def save_strip(videos: Sequence[torch.Tensor], labels: Sequence[str], path: Union[str, Path],
               scale: int = 4, fps: float = 8.0) -> Path:
    """Animated GIF of videos ``[T, C, H, W]`` in [-1, 1] side by side, each under its label,
    upscaled ``scale`` times (nearest neighbour)."""
    _need("PIL", "pillow")
    from PIL import Image, ImageDraw

    if len(videos) != len(labels) or not videos:
        raise ValueError(f"videos, labels: expected equal non-zero lengths, got {len(videos)} and {len(labels)}")
    shapes = {tuple(v.shape) for v in videos}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"videos: expected equal shapes [T, C, H, W], got {sorted(shapes)}")
    t, c, h, w = videos[0].shape
    pad, top = 4, 14
    width = len(videos) * (w * scale + pad) + pad
    height = h * scale + top + pad
    tiles = [to_uint8(v.detach().cpu()).permute(0, 2, 3, 1).numpy() for v in videos]
    images = []
    for i in range(t):
        canvas = Image.new("RGB", (width, height), (24, 24, 24))
        draw = ImageDraw.Draw(canvas)
        for j, (tile, label) in enumerate(zip(tiles, labels)):
            x = pad + j * (w * scale + pad)
            frame = Image.fromarray(tile[i] if c == 3 else tile[i][..., 0]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(frame, (x, top))
            draw.text((x, 2), label, fill=(235, 235, 235))
        draw.text((width - 40, height - 12), f"{i:3d}", fill=(160, 160, 160))
        images.append(canvas)
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def save_psnr_plot(records: Sequence[dict], path: Union[str, Path], title: str = "") -> Path:
    """PNG of per-frame PSNR (``per_frame_psnr_db`` against frame index) for every record with
    finite values; the legend gives each record's sealed bits per element when it has them."""
    matplotlib = _need("matplotlib", "matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for r in records:
        values = r["per_frame_psnr_db"]
        if not all(v != float("inf") for v in values):
            continue
        frames = list(range(r["first_frame"], r["first_frame"] + len(values)))
        # Sealed bits (what a matched budget counts) where the eval recorded them.
        bits = r.get("sealed_bits_per_element", r["bits_per_element"])
        ax.plot(frames, values, label=f"{r['label']} ({bits:.2f} bits)")
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR vs BF16-cache rollout (dB)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small" if len(records) > 8 else None)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
