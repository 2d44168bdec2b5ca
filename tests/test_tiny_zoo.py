"""The named models: the proxy has Wan's latent geometry and runs through the same code path as
the tiny model (cached generation equals teacher forcing), here at a reduced frame size."""

import dataclasses

import pytest
import torch

from qvg_compile.tiny.model import TinyVideoModel, generate
from qvg_compile.tiny.zoo import MODELS, get_model_spec
from tiny_rollout import teacher_forced_and_chunkwise


def test_proxy_has_wan_latent_geometry_and_fits_the_file_budget():
    cfg = get_model_spec("proxy").config
    assert cfg.head_dim == 128 and cfg.tokens_per_frame >= 1024 and cfg.frames_per_chunk == 3
    assert cfg.chunk_tokens >= 3072 and cfg.layers >= 4
    params = sum(p.numel() for p in TinyVideoModel(cfg).parameters())
    assert params * 2 <= 13 * 2 ** 20  # bf16 weights + prompts stay under 15 MB
    assert {m.checkpoint for m in MODELS.values()} == {"tiny_video.safetensors", "proxy_video.safetensors"}
    with pytest.raises(ValueError, match="model"):
        get_model_spec("wan")


def test_reduced_proxy_generates_as_it_trains():
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_model_spec("proxy").config, size=8, layers=2)
    m = TinyVideoModel(cfg).eval()
    expected, got, cache = teacher_forced_and_chunkwise(m, (1, 6, 3, 8, 8), chunks=2, scale=0.05)
    assert cache[0]["k"].shape == (1, 6 * 16, 3, 128)
    assert (got - expected).abs().max() < 1e-4
    video = generate(m, 2, seed=0, progress=False)
    assert video.shape == (1, 6, 3, 8, 8) and torch.isfinite(video).all()
