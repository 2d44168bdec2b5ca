"""The shipped tiny video model: checkpoint format and size, data determinism, metrics."""

from pathlib import Path

import pytest
import torch

from qvg_compile.tiny.checkpoint import default_path, load_checkpoint
from qvg_compile.tiny.data import ClipSampler, load_photos
from qvg_compile.tiny.metrics import psnr_per_frame, ssim_per_frame
from qvg_compile.tiny.model import generate


def test_checkpoint_is_small_safetensors_with_prompts_and_recipe():
    path = default_path()
    assert path.is_file() and path.stat().st_size <= 10 * 2 ** 20
    ckpt = load_checkpoint()
    assert ckpt.prompts.dtype == torch.uint8 and ckpt.prompts.dim() == 5
    assert ckpt.recipe.get("final_loss", 1.0) < 0.5
    with pytest.raises(FileNotFoundError, match="train_tiny"):
        load_checkpoint(Path("/nonexistent.safetensors"))


def test_generation_is_deterministic_for_a_seed():
    ckpt = load_checkpoint()
    a = generate(ckpt.model, 2, seed=3, progress=False)
    b = generate(ckpt.model, 2, seed=3, progress=False)
    assert torch.equal(a, b) and a.shape[1] == 2 * ckpt.model.cfg.frames_per_chunk


def test_clips_are_deterministic_from_a_seed():
    photos = load_photos(side=64)
    assert photos.dim() == 4 and photos.shape[1] == 3
    a = ClipSampler(photos, size=16, frames=8, seed=5).sample(2)
    b = ClipSampler(photos, size=16, frames=8, seed=5).sample(2)
    c = ClipSampler(photos, size=16, frames=8, seed=6).sample(2)
    assert a.shape == (2, 8, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 1:] - a[:, :-1]).abs().mean() > 1e-3  # the camera or the sprites move


def test_psnr_and_ssim_per_frame():
    x = torch.rand(1, 3, 3, 16, 16) * 2 - 1
    assert torch.isinf(psnr_per_frame(x, x)).all()
    assert torch.allclose(ssim_per_frame(x, x), torch.ones(3), atol=1e-4)
    noisy = x + 0.2 * torch.randn_like(x)
    assert (ssim_per_frame(x, noisy) < 0.99).all() and (psnr_per_frame(x, noisy) < 30).all()
