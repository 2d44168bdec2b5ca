"""The ATen op table of `QVGCache`: each cache idiom (docs/design.md §5, A-H) run on a `QVGCache`
equals the same code run on dense tensors holding the same (quantized) values.

Reference: ``dq(t)`` is the dense tensor the cache view stands for at that moment. Reads compare
the fused attention with SDPA on ``dq`` views (fp32, max abs diff <= 1e-5); writes compare the
cache's content with the dense tensor after the same write (exact where nothing is quantized).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache import QVGFallbackWarning, read, reset_stats, stats
from qvg_compile.kernels.attention import qvg_attention

CFG = QVGConfig.preset("qvg").replace(centroids=16)
B, S, H, D, L = 1, 64, 2, 64, 16
ATOL = 1e-5


@pytest.fixture(autouse=True, params=["auto", "general"])
def read_path(request, monkeypatch):
    """Every idiom runs with the fast read (where its plan allows it) and with the general read
    only: both must equal SDPA on the dequantized views."""
    monkeypatch.setenv("QVG_READ_PATH", request.param)
    return request.param


def dq(t: torch.Tensor) -> torch.Tensor:
    return t.dequantize() if isinstance(t, QVGCache) else t


def empty(role: str = "key", **kw) -> QVGCache:
    kw.setdefault("chunk_tokens", L)
    return QVGCache.empty((B, S, H, D), 1, CFG, role=role, dtype=torch.float32, **kw)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused output, SDPA on the dense values) for ``[B, S, H, D]`` k, v and ``[B, H, M, D]`` q."""
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    return F.scaled_dot_product_attention(q, kt, vt), F.scaled_dot_product_attention(q, dq(kt), dq(vt))


def test_a_slice_write_prefix_read_keeps_the_open_chunk_dense_and_seals_each_chunk_once(read_path):
    torch.manual_seed(0)
    kb, vb = empty(), empty("value")
    reset_stats()
    for c in range(4):
        for _ in range(4):  # denoising steps rewrite the same slot
            k, v, q = torch.randn(B, L, H, D), torch.randn(B, L, H, D), torch.randn(B, H, L, D)
            kb[:, c * L:(c + 1) * L] = k
            vb[:, c * L:(c + 1) * L] = v
            out, ref = attend(q, kb[:, :(c + 1) * L], vb[:, :(c + 1) * L])
            assert (out - ref).abs().max() <= ATOL
            assert torch.equal(dq(kb[:, c * L:(c + 1) * L]), k)
    s = stats()
    assert s["seals"] == 2 * 3 and s["sealed_tokens"] == 2 * 3 * L  # chunks 0-2 of K and V, once each
    # Three sealed chunks, two codebooks: by default two consecutive segments share one.
    assert kb.token_counts() == {"sealed": 3 * L, "dense": L, "holes": 0, "segments": 2}
    assert s["fallback_total"] == 0
    if read_path == "auto":
        assert s["fast_tokens"] > 0 and s["general_reads"] == 0
    else:
        assert s["fused_tokens"] > 0 and s["fast_reads"] == 0


def test_b_rolling_window_with_sinks_relabels_without_requantizing():
    torch.manual_seed(1)
    kb = empty(dense_sinks=4)
    x = torch.randn(B, S, H, D)
    for s in range(0, 52, L):
        kb[:, s:min(s + L, 52)] = x[:, s:min(s + L, 52)]
    before = dq(kb)
    sealed = stats()["sealed_tokens"]
    kb[:, 4:20] = kb[:, 36:52].clone()  # evict [4, 36), keep the sinks
    after = dq(kb)
    # Positions 36..47 were sealed: their packed tokens move as they are (bit-exact).
    assert torch.equal(after[:, 4:16], before[:, 36:48])
    # 48..51 were the open chunk; with no free slot they are quantized where they land, once.
    assert stats()["sealed_tokens"] == sealed + 4
    rel = (after[:, 16:20] - before[:, 48:52]).norm() / before[:, 48:52].norm()
    # measured 0.769: 2-bit three-level key codes of Gaussian tokens on a codebook fit to other tokens
    assert 0.65 < rel < 0.85
    assert torch.equal(after[:, :4], x[:, :4])  # sinks stay dense
    assert torch.equal(after[:, 20:52], before[:, 20:52])


def test_c_clone_write_and_cat_of_sink_and_window():
    torch.manual_seed(2)
    kb = empty()
    kb[:, :48] = torch.randn(B, 48, H, D)
    t = kb.clone()
    new = torch.randn(B, L, H, D)
    t[:, 48:64] = new
    r = torch.cat([t[:, :4], t[:, 20:64]], 1)
    assert isinstance(r, QVGCache) and r.shape == (B, 48, H, D)
    assert torch.equal(dq(r), torch.cat([dq(t)[:, :4], dq(t)[:, 20:64]], 1))
    assert torch.equal(dq(kb)[:, 48:], torch.zeros(B, L, H, D))  # the clone did not write through


def test_d_functional_cat_repeat_for_cfg_and_device_copy():
    torch.manual_seed(3)
    kc = QVGCache.from_dense(torch.randn(1, H, 32, D), 2, CFG)
    vc = QVGCache.from_dense(torch.randn(1, H, 32, D), 2, CFG, role="value")
    kn, vn = torch.randn(2, H, 8, D), torch.randn(2, H, 8, D)
    k = torch.cat([kc.repeat(2, 1, 1, 1), kn], 2)
    v = torch.cat([vc.repeat(2, 1, 1, 1), vn], 2)
    assert isinstance(k, QVGCache) and k.shape == (2, H, 40, D)
    assert torch.equal(dq(k), torch.cat([dq(kc).repeat(2, 1, 1, 1), kn], 2))
    q = torch.randn(2, H, 8, D)
    reset_stats()
    out = F.scaled_dot_product_attention(q, k, v)
    assert (out - F.scaled_dot_product_attention(q, dq(k), dq(v))).abs().max() <= ATOL
    assert stats()["fused_tokens"] == 32  # the batch-1 store read once for both CFG copies
    moved = kc.to("cpu")
    assert isinstance(moved, QVGCache) and torch.equal(dq(moved), dq(kc))


def test_d_repeat_after_cat_tiles_the_store_and_repeats_the_appended_tokens():
    """HY-WorldPlay's CFG read: ``cat([text, cache, new]).repeat(2, 1, 1, 1)`` for K and V."""
    torch.manual_seed(13)
    kc = QVGCache.from_dense(torch.randn(1, H, 32, D), 2, CFG)
    vc = QVGCache.from_dense(torch.randn(1, H, 32, D), 2, CFG, role="value")
    text, new = torch.randn(1, H, 4, D), torch.randn(1, H, 8, D)
    reset_stats()
    k = torch.cat([text, kc, new], 2).repeat(2, 1, 1, 1)
    v = torch.cat([text, vc, new], 2).repeat(2, 1, 1, 1)
    assert isinstance(k, QVGCache) and k.shape == (2, H, 44, D)
    assert torch.equal(dq(k), torch.cat([text, dq(kc), new], 2).repeat(2, 1, 1, 1))
    q = torch.randn(2, H, 8, D)
    out = F.scaled_dot_product_attention(q, k, v)
    assert (out - F.scaled_dot_product_attention(q, dq(k), dq(v))).abs().max() <= ATOL
    assert stats()["fallback_total"] == 0 and stats()["fused_tokens"] == 32
    with pytest.raises(RuntimeError):
        torch.cat([kc, new], 2).repeat(2, 1, 1)  # fewer repeats than dims: the dense error


@pytest.mark.parametrize("k_batch,v_batch,calls", [(2, 1, 1), (4, 2, 2)])
def test_d_keys_stored_per_cfg_copy_values_repeated_read_without_fallback(monkeypatch, k_batch, v_batch, calls):
    """HY-WorldPlay's batch layout: keys cached at batch 2 (two RoPE layouts), values at batch 1
    and repeated at read; both with a text prefix and the new chunk appended by cat. One kernel
    call reads every row when the values are one stored row (a stride-0 batch); values stored
    for 2 of 4 rows are read in blocks of 2 rows."""
    seen = []
    monkeypatch.setattr(read, "attention_impl", lambda *a, **kw: seen.append(a[0].shape[0]) or qvg_attention(*a, **kw))
    torch.manual_seed(14)
    kc = QVGCache.from_dense(torch.randn(k_batch, H, 32, D), 2, CFG)
    vc = QVGCache.from_dense(torch.randn(v_batch, H, 32, D), 2, CFG, role="value")
    k = torch.cat([torch.randn(k_batch, H, 4, D), kc, torch.randn(k_batch, H, 8, D)], 2)
    v = torch.cat([torch.randn(v_batch, H, 4, D), vc, torch.randn(v_batch, H, 8, D)], 2)
    v = v.repeat(k_batch // v_batch, 1, 1, 1)
    q = torch.randn(k_batch, H, 8, D)
    reset_stats()
    out = F.scaled_dot_product_attention(q, k, v)
    assert (out - F.scaled_dot_product_attention(q, dq(k), dq(v))).abs().max() <= ATOL
    assert stats()["fallback_total"] == 0 and stats()["fused_tokens"] == 32
    assert len(seen) == calls and sum(seen) == k_batch


def test_e_pre_rope_history_rotated_at_read_time_falls_back_correctly():
    torch.manual_seed(4)
    kc = QVGCache.from_dense(torch.randn(1, H, 32, D), 2, CFG)
    k = torch.cat([kc, torch.randn(1, H, 8, D)], 2)
    cos, sin = torch.randn(40, D), torch.randn(40, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QVGFallbackWarning)
        rotated = k * cos + k.flip(-1) * sin
    assert not isinstance(rotated, QVGCache)
    assert torch.allclose(rotated, dq(k) * cos + dq(k).flip(-1) * sin, atol=ATOL)
    assert stats()["fallback_total"] >= 1


def test_f_packed_kv_split_and_gqa_repeat_interleave():
    torch.manual_seed(5)
    kv = QVGCache.empty((B, S, H, 2 * D), 1, CFG, roles=("key", "value"), dtype=torch.float32, chunk_tokens=L)
    k, v = torch.randn(B, 2 * L, H, D), torch.randn(B, 2 * L, H, D)
    for c in range(2):
        kv[:, c * L:(c + 1) * L] = torch.cat([k, v], -1)[:, c * L:(c + 1) * L]
    kk, vv = kv[:, :2 * L].split(D, -1)
    assert isinstance(kk, QVGCache) and kk.spec.roles == ("key", "value")
    assert torch.equal(dq(kk)[:, L:], k[:, L:]) and torch.equal(dq(vv)[:, L:], v[:, L:])
    kh, vh = kk.transpose(1, 2).repeat_interleave(2, 1), vv.transpose(1, 2).repeat_interleave(2, 1)
    q = torch.randn(B, 2 * H, L, D)
    out = F.scaled_dot_product_attention(q, kh, vh)
    ref = F.scaled_dot_product_attention(q, dq(kk).transpose(1, 2).repeat_interleave(2, 1),
                                         dq(vv).transpose(1, 2).repeat_interleave(2, 1))
    assert (out - ref).abs().max() <= ATOL


def test_g_index_tensor_bookkeeping_fill_and_reset():
    torch.manual_seed(6)
    kb = empty()
    end = torch.tensor([0])
    for c in range(3):
        s = int(end.item())
        kb[:, s:s + L] = torch.randn(B, L, H, D)
        end.fill_(s + L)
    assert kb.token_counts()["holes"] == S - 3 * L
    kb.zero_()
    assert kb.token_counts() == {"sealed": 0, "dense": 0, "holes": S, "segments": 0}
    assert torch.equal(dq(kb), torch.zeros(B, S, H, D))


def test_h_index_copy_and_index_put_along_the_sequence():
    torch.manual_seed(7)
    kb = empty()
    k = torch.randn(B, L, H, D)
    idx = torch.arange(16, 32)
    kb.index_copy_(1, idx, k)
    assert torch.equal(dq(kb)[:, 16:32], k)
    kb[:, idx] = 2 * k
    assert torch.equal(dq(kb)[:, 16:32], 2 * k)
    functional = torch.index_copy(kb, 1, idx, 3 * k)
    assert isinstance(functional, QVGCache) and torch.equal(dq(functional)[:, 16:32], 3 * k)
    assert torch.equal(dq(kb)[:, 16:32], 2 * k)


def test_unknown_op_falls_back_to_dense_counted_and_warned_once():
    torch.manual_seed(8)
    kb = empty()
    kb[:, :L] = torch.randn(B, L, H, D)
    reset_stats(forget_warnings=True)
    with pytest.warns(QVGFallbackWarning, match="cumsum"):
        a = kb.cumsum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QVGFallbackWarning)
        b = kb.cumsum(1)  # second time: counted, not warned again
    assert torch.equal(a, dq(kb).cumsum(1)) and torch.equal(b, a)
    assert stats()["fallbacks"]["aten.cumsum.default"] == 2


def test_bad_writes_are_clear_errors_and_leave_the_cache_unchanged():
    torch.manual_seed(9)
    kb = empty()
    kb[:, :L] = torch.randn(B, L, H, D)
    before = dq(kb)
    with pytest.raises(RuntimeError):
        kb[:, 60:64] = torch.randn(B, L, H, D)  # shape mismatch, as on a dense tensor
    with pytest.raises((IndexError, RuntimeError)):
        kb.index_copy_(1, torch.tensor([S + 3]), torch.randn(B, 1, H, D))
    assert torch.equal(dq(kb), before)
    bad = torch.randn(B, L, H, D)
    bad[0, 3, 1, 5] = float("nan")
    kb[:, L:2 * L] = bad  # the open chunk holds what it is given, as a dense tensor would
    assert torch.isnan(dq(kb)[0, L + 3, 1, 5])
    before = dq(kb)
    with pytest.raises(ValueError, match="NaN"):
        kb[:, 2 * L:3 * L] = torch.randn(B, L, H, D)  # sealing the NaN chunk is refused
    assert torch.equal(dq(kb).nan_to_num(), before.nan_to_num())
    assert kb.token_counts()["dense"] == L


def test_nan_is_stored_when_check_finite_is_off():
    kb = QVGCache.empty((B, S, H, D), 1, CFG.replace(check_finite=False), dtype=torch.float32, chunk_tokens=L)
    bad = torch.randn(B, L, H, D)
    bad[0, 0, 0, 0] = float("inf")
    kb[:, :L] = bad
    assert torch.isinf(dq(kb)[0, 0, 0, 0])


def test_d_cache_grown_by_repeated_cat_stays_compressed_with_the_newest_chunk_dense():
    gen = torch.Generator().manual_seed(10)
    chunks = [torch.randn(1, H, L, D, generator=gen) for _ in range(9)]
    k = QVGCache.from_dense(chunks[0], 2, CFG, chunk_tokens=L)
    for i, new in enumerate(chunks[1:]):
        k = torch.cat([k, new], 2)
        # Every append has the same structure (stored history, then the appended piece), so a
        # cache fed back through a compiled step flattens to the same metadata each call.
        assert isinstance(k, QVGCache) and [kind for kind, _, _ in k._view.pieces] == ["run", "dense"]
        assert k._view.pieces[0][2] == (i + 1) * L and k._dense[0].data_ptr() == new.data_ptr()
    full = torch.cat(chunks, 2)
    assert torch.equal(dq(k)[:, :, -2 * L:], full[:, :, -2 * L:])
    # The store holds the older chunks under the policy (one dense slot: the previous chunk).
    assert k.token_counts()["dense"] == L and k.token_counts()["sealed"] == 7 * L
    # measured 0.668: seven of nine chunks sealed, three-level key codes on Gaussian data
    assert 0.55 < (dq(k) - full).norm() / full.norm() < 0.75
    # Two of nine fp32 chunks are dense (bound: 4.5x); the seven sealed ones are >= 6x smaller.
    dense_bytes = 2 * chunks[0].numel() * chunks[0].element_size()
    assert k.compression_ratio() > 3
    assert (full.numel() * full.element_size() - dense_bytes) / (k.nbytes() - dense_bytes) > 6
