"""``qvg::cache_attention`` over `QVGCache` views (`cache.read.attend`): equals SDPA on the
dequantized views (fp32, max abs diff <= 1e-5), reads sealed tokens from packed storage without a
dense copy of the history, folds CFG copies onto one read, and handles GQA and appended tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache import reset_stats, stats
from qvg_compile.cache.read_plan import flag_runs as _runs

CFG = QVGConfig.preset("qvg").replace(centroids=16)
ATOL = 1e-5


def filled(role: str, seed: int, n: int = 80, h: int = 2) -> QVGCache:
    gen = torch.Generator().manual_seed(seed)
    c = QVGCache.empty((1, h, 96, 64), 2, CFG, role=role, dtype=torch.float32, chunk_tokens=16)
    for s in range(0, n, 16):
        c[:, :, s:s + 16] = torch.randn(1, h, 16, 64, generator=gen)
    return c


def sdpa_ref(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k.dequantize(), v.dequantize(), **kw)


def test_general_read_is_fused_and_builds_no_dense_copy_of_the_history(monkeypatch):
    monkeypatch.setenv("QVG_READ_PATH", "general")
    k, v = filled("key", 0), filled("value", 1)
    q = torch.randn(1, 2, 16, 64)
    reset_stats()
    out = F.scaled_dot_product_attention(q, k[:, :, :80], v[:, :, :80], scale=0.3)
    s = stats()
    assert s["fused_tokens"] == 64 and s["tail_tokens"] == 16 and s["decoded_tokens"] == 0
    assert (out - sdpa_ref(q, k[:, :, :80], v[:, :, :80], scale=0.3)).abs().max() <= ATOL


def test_gqa_by_repeat_interleave_and_cfg_by_repeat_with_appended_tokens(monkeypatch):
    monkeypatch.setenv("QVG_READ_PATH", "general")
    k, v = filled("key", 2), filled("value", 3)
    kn, vn = torch.randn(2, 2, 8, 64), torch.randn(2, 2, 8, 64)
    kk = torch.cat([k[:, :, :80].repeat(2, 1, 1, 1), kn], 2).repeat_interleave(3, 1)
    vv = torch.cat([v[:, :, :80].repeat(2, 1, 1, 1), vn], 2).repeat_interleave(3, 1)
    q = torch.randn(2, 6, 8, 64)
    reset_stats()
    out = F.scaled_dot_product_attention(q, kk, vv)
    assert (out - sdpa_ref(q, kk, vv)).abs().max() <= ATOL
    assert stats()["decoded_tokens"] == 0


def test_keys_and_values_in_different_states_fall_back_to_the_tail():
    k, v = filled("key", 4), filled("value", 5, n=64)  # v has one chunk fewer: a hole range
    q = torch.randn(1, 2, 4, 64)
    out = F.scaled_dot_product_attention(q, k[:, :, :80], v[:, :, :80])
    assert (out - sdpa_ref(q, k[:, :, :80], v[:, :, :80])).abs().max() <= ATOL


def test_masked_and_causal_reads_fall_back_correctly():
    k, v = filled("key", 6), filled("value", 7)
    q = torch.randn(1, 2, 80, 64)
    out = F.scaled_dot_product_attention(q, k[:, :, :80], v[:, :, :80], is_causal=True)
    assert (out - sdpa_ref(q, k[:, :, :80], v[:, :, :80], is_causal=True)).abs().max() <= ATOL
    mask = torch.rand(1, 1, 80, 80) > 0.3
    mask[..., 0] = True
    out = F.scaled_dot_product_attention(q, k[:, :, :80], v[:, :, :80], attn_mask=mask)
    assert (out - sdpa_ref(q, k[:, :, :80], v[:, :, :80], attn_mask=mask)).abs().max() <= ATOL


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=64))
def test_runs_of_a_flag_vector_cover_it_in_order(flags):
    runs = _runs(torch.tensor(flags))
    assert runs[0][0] == 0 and runs[-1][1] == len(flags)
    for (lo, hi, value), nxt in zip(runs, runs[1:] + [None]):
        assert lo < hi and all(f == value for f in flags[lo:hi])
        if nxt is not None:
            assert nxt[0] == hi and nxt[2] != value
