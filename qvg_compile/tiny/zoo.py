"""The named video models of the package: architecture, checkpoint file and training defaults.

``tiny`` is the CPU demo's model (64 tokens per frame, head dim 64). ``proxy`` has the latent
geometry of Wan 2.1 / Self-Forcing that QVG is built for (docs/design.md §4): head dim 128, 1,024
tokens per latent frame (64x64 frames in 2x2 patches), chunks of 3 frames (3,072 tokens), 4
layers; its bf16 weights stay under 15 MB. Both are trained by ``examples/train_tiny.py --model
NAME`` and shipped next to this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .model import TinyVideoConfig


@dataclass(frozen=True)
class ModelSpec:
    """A named model: ``config``, its ``checkpoint`` file name inside ``qvg_compile/tiny`` and
    the defaults of ``examples/train_tiny.py`` for it (``train``: frames, batch, steps, lr, warmup,
    ema, log_every, photo_side)."""

    name: str
    config: TinyVideoConfig
    checkpoint: str
    train: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        "tiny", TinyVideoConfig(size=32, patch=4, dim=256, heads=4, layers=4, frames_per_chunk=4, steps=4),
        "tiny_video.safetensors",
        dict(frames=24, batch=32, steps=6000, lr=8e-4, warmup=200, ema=0.999, log_every=250, photo_side=160)),
    # Training cost is the attention over 12 frames = 4 chunks of 3,072 tokens (clean + noisy
    # rows): ~4.9 TFLOP per clip, fwd + bwd; batch 8 is ~0.25 s per step on one H200 (README).
    # The MLP is 2x wide so that 5.8 M parameters fit in 12 MB of bf16.
    "proxy": ModelSpec(
        "proxy", TinyVideoConfig(size=64, patch=2, dim=384, heads=3, layers=4, frames_per_chunk=3, steps=4,
                                 mlp_ratio=2),
        "proxy_video.safetensors",
        dict(frames=12, batch=8, steps=1200, lr=8e-4, warmup=100, ema=0.995, log_every=50, photo_side=320)),
}


def get_model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` called ``name`` (one of `MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name]
