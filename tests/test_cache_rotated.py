"""cache/rotated.py: ``qvg::rope`` of a QVGCache is a rotated view (nothing decoded) that layout
views keep, a token slice slices its tables, any other op decodes and rotates (a counted
fallback), and SDPA over it (history + appended tokens, CFG repeat) equals SDPA over the dense
rotated keys with no fallback."""

import pytest
import torch
import torch.nn.functional as F

from qvg_compile import QVGCache, QVGConfig, reset_stats, stats
from qvg_compile.cache.rope import RopeSpec, apply

CFG = QVGConfig.preset("qvg", centroids=16, kmeans_iters=2, group_size=32)
SPEC = RopeSpec("pairs", "float32")


def _setup(n=24, new=6, d=32, heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(1, heads, n, d, generator=gen) for _ in range(2))
    kc, vc = (QVGCache.from_dense(t, seq_dim=2, config=CFG) for t in (k, v))
    ang = torch.rand(n + new, d // 2, generator=gen) * 6
    cos, sin = torch.cos(ang).repeat_interleave(2, -1), torch.sin(ang).repeat_interleave(2, -1)
    k_new, v_new = (torch.randn(2, heads, new, d, generator=gen) for _ in range(2))
    return kc, vc, k_new, v_new, cos, sin


def test_rotated_view_stands_for_the_rotated_decode_and_keeps_it_through_layout_views():
    kc, _, _, _, cos, sin = _setup()
    reset_stats()
    r = torch.ops.qvg.rope(kc, cos[:24], sin[:24], "pairs", "float32")
    assert isinstance(r, QVGCache) and r.rope is not None and stats()["decoded_tokens"] == 0
    want = apply(kc.dequantize(), cos[:24], sin[:24], SPEC)
    assert torch.allclose(r.dequantize(), want, atol=1e-6)
    t = r.transpose(1, 2)
    assert isinstance(t, QVGCache) and torch.allclose(t.dequantize(), want.transpose(1, 2), atol=1e-6)
    part = r[:, :, 5:17]
    assert isinstance(part, QVGCache) and torch.allclose(part.dequantize(), want[:, :, 5:17], atol=1e-6)
    assert stats()["fallback_total"] == 0
    doubled = r * 2
    assert torch.allclose(doubled, want * 2, atol=1e-5) and stats()["fallback_total"] == 1


def test_tables_may_broadcast_but_not_vary_along_batch_or_heads():
    kc, _, _, _, cos, sin = _setup()
    r = torch.ops.qvg.rope(kc, cos[None, None, :24], sin[:24], "pairs", "float32")
    assert r.rope[1][0].shape == (24, 32)
    dense = torch.ops.qvg.rope(kc, cos[:24].expand(2, 24, 32), sin[:24], "pairs", "float32")
    assert not isinstance(dense, QVGCache)


@pytest.mark.parametrize("cfg_repeat", [False, True])
def test_sdpa_over_rotated_keys_with_appended_tokens_equals_dense_without_fallback(cfg_repeat):
    kc, vc, k_new, v_new, cos, sin = _setup()
    batch = 2 if cfg_repeat else 1
    k_new, v_new = k_new[:batch], v_new[:batch]
    ks, vs = (kc.repeat(2, 1, 1, 1), vc.repeat(2, 1, 1, 1)) if cfg_repeat else (kc, vc)
    q = torch.randn(batch, 2, 6, 32)
    reset_stats()
    k_full = torch.ops.qvg.rope(torch.cat([ks, k_new], 2), cos, sin, "pairs", "float32")
    out = F.scaled_dot_product_attention(q, k_full, torch.cat([vs, v_new], 2))
    s = stats()
    dense_k = apply(torch.cat([ks.dequantize(), k_new], 2), cos, sin, SPEC)
    want = F.scaled_dot_product_attention(q, dense_k, torch.cat([vs.dequantize(), v_new], 2))
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()
    assert s["fallback_total"] == 0 and s["fast_reads"] == 1 and s["decoded_tokens"] == 0


def test_queries_padded_with_an_empty_cache_are_read_as_their_dense_rows():
    kc, vc, k_new, v_new, cos, sin = _setup()
    q = torch.randn(1, 2, 6, 32)
    reset_stats()
    padded = torch.ops.qvg.rope(torch.cat([torch.empty_like(kc), q], 2), cos, sin, "pairs", "float32")
    q_rot = padded[:, :, -6:]
    assert isinstance(q_rot, QVGCache)
    k_full = torch.ops.qvg.rope(torch.cat([kc, k_new[:1]], 2), cos, sin, "pairs", "float32")
    out = F.scaled_dot_product_attention(q_rot, k_full, torch.cat([vc, v_new[:1]], 2))
    want = F.scaled_dot_product_attention(apply(q, cos[-6:], sin[-6:], SPEC), k_full.dequantize(),
                                          torch.cat([vc.dequantize(), v_new[:1]], 2))
    assert (out - want).abs().max() <= 1e-5 * want.abs().max() and stats()["fallback_total"] == 0
