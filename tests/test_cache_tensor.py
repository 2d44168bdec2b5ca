"""QVGCache against a dense tensor holding the same quantized values (eager)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from qvg_compile import QVGCache, QVGConfig, compress, memory_report, reset_stats, stats

CFG = QVGConfig(centroids=8, group_size=32, kmeans_iters=2)
B, S, H, D = 1, 48, 2, 32


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sdpa_bshd(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def test_denoise_steps_rewrite_the_open_slot_and_seal_once():
    reset_stats()
    k = QVGCache.empty((B, S, H, D), 1, CFG, dtype=torch.float32)
    for chunk in range(3):
        for step in range(4):
            k[:, 16 * chunk:16 * chunk + 16] = rand(B, 16, H, D, seed=10 * chunk + step)
    assert stats()["seals"] == 2 and stats()["tokens_sealed"] == 32
    st = k._storage
    assert [seg[:2] for seg in st.segments] == [(0, 16), (16, 32)] and st.open[:2] == (32, 48)
    # The open slot holds exactly the last write; sealed chunks hold their last write, quantized.
    assert torch.equal(k.dequantize()[:, 32:], rand(B, 16, H, D, seed=23))
    last = rand(B, 16, H, D, seed=13)
    assert (k.dequantize()[:, 16:32] - last).abs().max() < 1.5


def test_fused_read_equals_dense_sdpa_on_the_same_values():
    k = QVGCache.empty((B, S, H, D), 1, CFG, dtype=torch.float32)
    v = QVGCache.empty((B, S, H, D), 1, CFG, role="value", dtype=torch.float32)
    for chunk in range(3):
        k[:, 16 * chunk:16 * chunk + 16] = rand(B, 16, H, D, seed=chunk)
        v[:, 16 * chunk:16 * chunk + 16] = rand(B, 16, H, D, seed=100 + chunk)
    q = rand(B, 5, H, D, seed=7)
    reset_stats()
    for lo, hi in [(0, 48), (8, 40), (0, 20)]:
        got = sdpa_bshd(q, k[:, lo:hi], v[:, lo:hi])
        want = sdpa_bshd(q, k.dequantize()[:, lo:hi], v.dequantize()[:, lo:hi])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any(name.startswith("fallback") for name in stats())


def test_read_with_mask_and_gqa():
    k = QVGCache.from_dense(rand(1, 2, 40, 32), 2, CFG)
    v = QVGCache.from_dense(rand(1, 2, 40, 32, seed=1), 2, CFG, role="value")
    q = rand(1, 4, 3, 32, seed=2)
    mask = rand(1, 1, 3, 40, seed=3) > 0
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k.dequantize(), v.dequantize(), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rolling_window_relabels_segments_without_requantizing():
    k = QVGCache.empty((B, S, H, D), 1, CFG, dtype=torch.float32)
    for chunk in range(3):
        k[:, 16 * chunk:16 * chunk + 16] = rand(B, 16, H, D, seed=chunk)
    k[:, 40:48] = rand(B, 8, H, D, seed=9)  # seals [32, 48) chunk
    before = k.dequantize()
    reset_stats()
    k[:, 0:16] = k[:, 16:32].clone()
    assert stats().get("relabelled_tokens") == 16 and not stats().get("requantized_tokens")
    assert torch.equal(k.dequantize()[:, :16], before[:, 16:32])


def test_functional_cat_append_and_clone():
    base = QVGCache.from_dense(rand(1, 2, 32, 32), 2, CFG)
    new = rand(1, 2, 8, 32, seed=5)
    out = torch.cat([base, new], dim=2)
    assert isinstance(out, QVGCache) and out.shape == (1, 2, 40, 32)
    assert torch.equal(out.dequantize()[:, :, 32:], new)
    assert torch.equal(out.dequantize()[:, :, :32], base.dequantize())
    c = base.clone()
    c[:, :, 0:8] = new
    assert not torch.equal(base.dequantize()[:, :, :8], new)


def test_reset_and_device_move_and_unknown_op_fallback():
    k = QVGCache.from_dense(rand(1, 2, 32, 32), 2, CFG)
    moved = k.to("cpu")
    assert torch.equal(moved.dequantize(), k.dequantize())
    reset_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total = (k * 2).sum()
    assert stats()["fallback:aten.mul.Tensor"] == 1 and caught
    torch.testing.assert_close(total, (k.dequantize() * 2).sum())
    k.zero_()
    assert torch.equal(k.dequantize(), torch.zeros(1, 2, 32, 32)) and k.nbytes() == 0


def test_memory_at_wan_scale_one_layer():
    """12 heads x 128, 1,560 tokens/frame, chunks of 3 frames, 21 frames, 5 writes per chunk."""
    tokens, frames = 1560, 21
    cfg = QVGConfig.preset("qvg", kmeans_iters=1)
    k = QVGCache.empty((1, tokens * frames, 12, 128), 1, cfg, dtype=torch.bfloat16)
    reset_stats()
    chunk = 3 * tokens
    for c in range(frames // 3):
        x = rand(1, chunk, 12, 128, seed=c).to(torch.bfloat16)
        for _ in range(5):
            k[:, c * chunk:(c + 1) * chunk] = x
    assert stats()["seals"] == frames // 3 - 1
    dense = math.prod(k.shape) * 2
    # at most one chunk dense: the open slot
    assert k._storage.open[2].shape[1] == chunk
    k._storage.seal_open()
    assert dense / k.nbytes() >= 6.5


def test_compress_and_memory_report():
    cache = [{"k": torch.zeros(1, 32, 2, 32), "v": torch.zeros(1, 32, 2, 32)}, (torch.ones(2),)]
    cache[0]["k"][:, :16] = rand(1, 16, 2, 32)
    compress(cache, CFG, seq_dim=1)
    assert isinstance(cache[0]["k"], QVGCache) and not isinstance(cache[1][0], QVGCache)
    report = memory_report(cache)
    assert report["held_bytes"] < report["dense_bytes"] and "total" in report["table"]


def test_bad_input():
    with pytest.raises(ValueError, match="seq_dim"):
        QVGCache.empty((1, 8, 2, 32), 3, CFG)
    with pytest.raises(ValueError, match="group_size"):
        QVGCache.empty((1, 8, 2, 48), 1, CFG)
    with pytest.raises(TypeError, match="dense"):
        QVGCache.from_dense(torch.zeros(1, 8, 2, 32, dtype=torch.int32), 1, CFG)
    k = QVGCache.empty((1, 32, 2, 32), 1, CFG, dtype=torch.float32)
    bad = rand(1, 16, 2, 32)
    bad[0, 0, 0, 0] = float("nan")
    k[:, 0:16] = bad
    with pytest.raises(ValueError, match="NaN"):
        k[:, 16:32] = rand(1, 16, 2, 32)
