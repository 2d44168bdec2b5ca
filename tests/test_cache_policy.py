"""`CachePolicy` validation, codebook sizing and the defaults' errors; `StoreSpec` layout and JSON round trip."""

from __future__ import annotations

import pytest
import torch

from qvg_compile import QVGCache, QVGConfig
from qvg_compile.bench.synthetic import video_like_kv
from qvg_compile.cache import CachePolicy
from qvg_compile.cache.policy import policy_from_options
from qvg_compile.cache.spec import StoreSpec
from qvg_compile.quant.metrics import rel_mse

# `test_default_policy_errors_on_the_generator_are_pinned`: measured per chunk (seed 0).
KEY_ERRORS = [0.0972, 0.1206]
VALUE_ERRORS = [0.0957, 0.0859]


def test_policy_validates_every_field():
    with pytest.raises(ValueError, match="dense_chunks"):
        CachePolicy(dense_chunks=0)
    with pytest.raises(ValueError, match="seal_chunks"):
        CachePolicy(dense_chunks=1, seal_chunks=2)
    with pytest.raises(ValueError, match="codebook_bits"):
        CachePolicy(codebook_bits=0)
    with pytest.raises(ValueError, match="warm_start"):
        CachePolicy(warm_start=1)
    for bad in (0, -1.0, True, "3"):
        with pytest.raises(ValueError, match="share_fit"):
            CachePolicy(share_fit=bad)
    assert CachePolicy(share_fit=None).share_fit is None and CachePolicy().share_fit == 3.0
    with pytest.raises(TypeError, match="unknown cache options"):
        policy_from_options(chunks=3)
    with pytest.raises(TypeError, match="CachePolicy"):
        policy_from_options("fast")


@pytest.mark.parametrize("tokens, chunks, expected", [(4680, 1, 64), (4680, 2, 128), (37440, 1, 256), (10, 1, 1)])
def test_codebook_size_fits_the_bit_budget(tokens, chunks, expected):
    policy = CachePolicy(codebook_bits=0.25, codebook_chunks=chunks)
    c = policy.codebook_size(QVGConfig.preset("qvg"), tokens)
    assert c == expected
    assert c <= 256 and c <= tokens


def test_spec_round_trips_through_json_and_sizes_its_arrays():
    spec = StoreSpec(QVGConfig.preset("qvg"), CachePolicy(), (128,), ("key",), "bfloat16").sized_for(4680, 32760)
    assert StoreSpec.from_json(spec.to_json()) == spec
    shapes = spec.shapes((1, 12), 32760)
    assert shapes["codes0"] == (1, 12, 32760, 32) and shapes["scales0"] == (1, 12, 32760, 2)
    assert shapes["tail0"] == (1, 12, 4680, 128) and shapes["cents0"][0] == spec.segments
    with pytest.raises(ValueError, match="group_size"):
        StoreSpec(QVGConfig.preset("qvg"), CachePolicy(), (96,), ("key",), "bfloat16")
    with pytest.raises(ValueError, match="method"):
        StoreSpec(QVGConfig.preset("kivi"), CachePolicy(), (128,), ("key",), "bfloat16")


def _rotated_by_frame(k: torch.Tensor, frame_tokens: int) -> torch.Tensor:
    """``k`` ``[B, H, N, D]`` with a temporal RoPE: channel pair i turned by frame * 10^(-2i/D)."""
    d = k.shape[-1]
    angle = (torch.arange(k.shape[2]) // frame_tokens)[:, None] / 10.0 ** (torch.arange(0, d, 2) / d)
    cos, sin = angle.cos(), angle.sin()
    a, b = k[..., 0::2], k[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def _sealed_chunk_errors(x: torch.Tensor, role: str, chunk: int, **options) -> list[float]:
    """Rel-MSE per chunk of ``x`` ``[B, H, N, D]`` written chunk by chunk into a `qvg` cache, sealed."""
    cache = QVGCache.empty(tuple(x.shape), 2, QVGConfig.preset("qvg"), role=role, dtype=x.dtype,
                           chunk_tokens=chunk, **options)
    for s in range(0, x.shape[2], chunk):
        cache[:, :, s:s + chunk] = x[:, :, s:s + chunk]
    y = cache.seal().dequantize()
    return [rel_mse(x[:, :, s:s + chunk], y[:, :, s:s + chunk]) for s in range(0, x.shape[2], chunk)]


def test_default_policy_errors_on_the_generator_are_pinned():
    """The defaults (one codebook per chunk, 0.25 bit) on `video_like_kv`, 2 chunks of 768 tokens
    (C=8 each), seed 0: measured key rel-MSE per chunk, value rel-MSE per chunk; deterministic on
    the CPU, so the tolerance (2%) only covers BLAS summation order."""
    assert CachePolicy().codebook_chunks == 1
    data = video_like_kv(heads=1, frames=6, height=16, width=16, seed=0)
    keys = _sealed_chunk_errors(data["k"], "key", 768)
    values = _sealed_chunk_errors(data["v"], "value", 768)
    assert keys == pytest.approx(KEY_ERRORS, rel=0.02)
    assert values == pytest.approx(VALUE_ERRORS, rel=0.02)


def test_chunks_rotated_by_rope_keep_their_own_codebook():
    """Why codebooks are not shared by default: keys turned by a temporal RoPE from frame to frame
    (as the proxy model's are) fit the previous chunk's codebook badly. The second chunk, sharing,
    had 2.3x the key error of its own codebook of half the size (0.39 vs 0.17)."""
    keys = _rotated_by_frame(video_like_kv(heads=1, frames=6, height=16, width=16, seed=0)["k"], 256)
    own = _sealed_chunk_errors(keys, "key", 768)
    shared = _sealed_chunk_errors(keys, "key", 768, codebook_chunks=2)
    assert shared[1] > 1.5 * own[1]
    assert max(own) < 1.3 * min(own)
