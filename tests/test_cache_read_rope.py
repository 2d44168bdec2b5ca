"""cache/read_rope.py: ``qvg::cache_attention_rope`` (reached through SDPA over rotated keys)
gives the same output on the fast read (gather into the workspace, rotate there; later reads
replayed) and on the general read (decoded rows), equal to dense SDPA over the rotated keys;
history-only views; and the views it refuses."""

import pytest
import torch
import torch.nn.functional as F

from qvg_compile import QVGCache, QVGConfig, reset_stats, stats
from qvg_compile.cache.read_rope import history_runs
from qvg_compile.cache.rope import RopeSpec, apply

CFG = QVGConfig.preset("qvg", centroids=16, kmeans_iters=2, group_size=32)
SPEC = RopeSpec("pairs", "float32")


def _read(k, v, q, k_new, v_new, cos, sin):
    k_full = torch.ops.qvg.rope(torch.cat([k, k_new], 2) if k_new is not None else k, cos, sin, "pairs", "float32")
    return F.scaled_dot_product_attention(q, k_full, torch.cat([v, v_new], 2) if v_new is not None else v)


@pytest.mark.parametrize("appended", [True, False])
def test_fast_and_general_reads_equal_dense(monkeypatch, appended):
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(1, 2, 40, 32, generator=gen) for _ in range(2))
    kc, vc = (QVGCache.from_dense(t, seq_dim=2, config=CFG).repeat(2, 1, 1, 1) for t in (k, v))
    new = 8 if appended else 0
    k_new, v_new = ((torch.randn(2, 2, new, 32, generator=gen) for _ in range(2)) if appended else (None, None))
    ang = torch.rand(40 + new, 16, generator=gen) * 6
    cos, sin = torch.cos(ang).repeat_interleave(2, -1), torch.sin(ang).repeat_interleave(2, -1)
    q = torch.randn(2, 2, 5, 32, generator=gen)
    dense_k = torch.cat([kc.dequantize()] + ([k_new] if appended else []), 2)
    dense_v = torch.cat([vc.dequantize()] + ([v_new] if appended else []), 2)
    want = F.scaled_dot_product_attention(q, apply(dense_k, cos, sin, SPEC), dense_v)
    reset_stats()
    fast = [_read(kc, vc, q, k_new, v_new, cos, sin) for _ in range(2)]
    s = stats()
    assert s["fast_reads"] == 2 and s["read_replays"] == 1 and s["general_reads"] == 0 and s["fallback_total"] == 0
    monkeypatch.setenv("QVG_READ_PATH", "general")
    reset_stats()
    general = _read(kc, vc, q, k_new, v_new, cos, sin)
    assert stats()["general_reads"] == 1 and stats()["fallback_total"] == 0
    for out in (*fast, general):
        assert (out - want).abs().max() <= 1e-5 * want.abs().max()


def test_history_runs_needs_stored_tokens_first():
    assert history_runs([0, 0, 10, 0, 20, 4, 1, 0, 6]) == [0, 0, 10, 0, 20, 4]
    assert history_runs([1, 0, 6, 0, 0, 10]) is None
    assert history_runs([1, 0, 6]) == []


def test_keys_appended_before_the_history_fall_back_correctly():
    gen = torch.Generator().manual_seed(4)
    kc, vc = (QVGCache.from_dense(torch.randn(1, 2, 16, 32, generator=gen), seq_dim=2, config=CFG) for _ in range(2))
    k_new, v_new = (torch.randn(1, 2, 4, 32, generator=gen) for _ in range(2))
    cos, sin = torch.randn(20, 32, generator=gen), torch.randn(20, 32, generator=gen)
    q = torch.randn(1, 2, 3, 32, generator=gen)
    k_full = torch.ops.qvg.rope(torch.cat([k_new, kc], 2), cos, sin, "pairs", "float32")
    reset_stats()
    out = F.scaled_dot_product_attention(q, k_full, torch.cat([v_new, vc], 2))
    assert stats()["fallback_total"] == 1
    want = F.scaled_dot_product_attention(q, apply(torch.cat([k_new, kc.dequantize()], 2), cos, sin, SPEC),
                                          torch.cat([v_new, vc.dequantize()], 2))
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rotated_fast_read_in_bf16_on_cuda_equals_dense():
    # LongCat's head shape in BF16: the Triton gather, the rotation in the workspace and the fused
    # SDPA with its log-sum-exp, against SDPA in fp32 over the same decoded, rotated keys.
    gen = torch.Generator(device="cuda").manual_seed(5)
    cfg = QVGConfig.preset("qvg")
    k, v = (torch.randn(1, 4, 3120, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kc, vc = (QVGCache.from_dense(t, seq_dim=2, config=cfg).repeat(2, 1, 1, 1) for t in (k, v))
    k_new, v_new = (torch.randn(2, 4, 1560, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ang = torch.rand(4680, 64, generator=gen, device="cuda") * 6
    cos, sin = torch.cos(ang).repeat_interleave(2, -1), torch.sin(ang).repeat_interleave(2, -1)
    q = torch.randn(2, 4, 1560, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    dense_k = torch.cat([kc.dequantize(), k_new], 2).float()
    dense_v = torch.cat([vc.dequantize(), v_new], 2).float()
    want = F.scaled_dot_product_attention(q.float(), apply(dense_k, cos, sin, SPEC), dense_v)
    reset_stats()
    outs = [_read(kc, vc, q, k_new, v_new, cos, sin) for _ in range(2)]
    s = stats()
    assert s["fast_reads"] == 2 and s["read_replays"] == 1 and s["fallback_total"] == 0
    for out in outs:
        assert out.dtype == torch.bfloat16
        assert (out.float() - want).abs().max() <= 2e-2 * want.abs().max()
