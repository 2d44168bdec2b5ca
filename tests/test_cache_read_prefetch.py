"""`cache.read_prefetch`: a read learns which read follows it and decodes that read's sealed
history ahead of it; the prefetched read copies only its open rows. Outputs are bit-equal with
and without prefetch through rewrites of the open chunk, seals, reads out of order and a released
workspace (on the CPU, ``QVG_READ_PREFETCH=on`` runs each prefetch at once)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache import read_fast, read_prefetch, reset_stats, stats
from qvg_compile.kernels.gather import Gather

CFG = QVGConfig.preset("qvg").replace(centroids=8)
B, H, D, L = 1, 2, 64, 8
LAYERS, PASSES = 3, 4


@pytest.fixture(autouse=True)
def fresh():
    read_prefetch.forget()
    read_fast.release_workspace()
    yield
    read_prefetch.forget()
    read_fast.release_workspace()


def caches(seed: int) -> list[tuple[QVGCache, QVGCache]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(LAYERS):
        pair = tuple(QVGCache.empty((B, 96, H, D), 1, CFG, role=role, dtype=torch.float32, chunk_tokens=L)
                     for role in ("key", "value"))
        for c in pair:
            for i in range(3):
                c[:, i * L:(i + 1) * L] = torch.randn(B, L, H, D, generator=gen)
        out.append(pair)
    return out


def video(chunks: int, seed: int = 0, extra_read: bool = False) -> tuple[list[torch.Tensor], dict]:
    """Denoise ``chunks`` chunks after a 3-chunk history: ``PASSES`` passes per chunk, each layer
    writing the chunk's K/V (the first pass of a chunk seals the previous one) and reading the
    whole history. With ``extra_read`` each pass ends with a read of layer 0 out of turn."""
    layers = caches(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(B, H, L, D, generator=gen)
    outs = []
    reset_stats()
    for c in range(chunks):
        lo, hi = (3 + c) * L, (4 + c) * L
        for _ in range(PASSES):
            for k, v in layers:
                k[:, lo:hi] = torch.randn(B, L, H, D, generator=gen)
                v[:, lo:hi] = torch.randn(B, L, H, D, generator=gen)
                outs.append(F.scaled_dot_product_attention(q, k[:, :hi].transpose(1, 2), v[:, :hi].transpose(1, 2)))
            if extra_read:
                k, v = layers[0]
                outs.append(F.scaled_dot_product_attention(q, k[:, :hi].transpose(1, 2), v[:, :hi].transpose(1, 2)))
    return outs, stats()


@pytest.mark.parametrize("extra_read", [False, True])
def test_prefetched_reads_equal_reads_without_prefetch(monkeypatch, extra_read):
    monkeypatch.setenv("QVG_READ_PREFETCH", "off")
    plain, s_off = video(3, extra_read=extra_read)
    assert s_off["prefetches"] == 0 and s_off["prefetched_reads"] == 0
    read_prefetch.forget()
    monkeypatch.setenv("QVG_READ_PREFETCH", "on")
    fetched, s_on = video(3, extra_read=extra_read)
    assert len(fetched) == len(plain)
    assert all(torch.equal(a, b) for a, b in zip(fetched, plain))
    assert s_on["fast_reads"] == s_off["fast_reads"] == len(plain)
    assert s_on["prefetched_reads"] > 0


def test_the_read_order_is_learnt_in_one_pass_and_a_seal_voids_the_prefetch(monkeypatch):
    """Per chunk: the first pass seals (new states, new keys: nothing known to prefetch, and the
    prefetch launched at the end of the previous chunk is for a key that no longer comes); the
    second pass knows every successor but the first layer's; later passes prefetch every read."""
    monkeypatch.setenv("QVG_READ_PREFETCH", "on")
    _, s = video(2)
    per_chunk = (LAYERS - 1) + (PASSES - 2) * LAYERS
    assert s["prefetched_reads"] == 2 * per_chunk
    # Every prefetch but the last of each chunk (for the sealing pass's first read) was taken,
    # and the very last one is still pending.
    assert s["prefetches"] == 2 * per_chunk + 2


def test_a_prefetched_read_is_two_launches_and_a_prefetch_one(monkeypatch):
    """A prefetched read copies its open rows (one gather launch) and runs one SDPA; the prefetch
    it launches for its successor is one more: three launches, at any history length."""
    monkeypatch.setenv("QVG_READ_PREFETCH", "on")
    counts = {"gather": 0}
    gather = Gather.__call__

    def counted(self, *args):
        counts["gather"] += 1
        return gather(self, *args)
    monkeypatch.setattr(Gather, "__call__", counted)
    for history in (3, 9):
        read_prefetch.forget()
        (k, v), = [caches(history)[0]]
        for i in range(3, history):
            k[:, i * L:(i + 1) * L] = torch.randn(B, L, H, D)
            v[:, i * L:(i + 1) * L] = torch.randn(B, L, H, D)
        q = torch.randn(B, H, L, D)
        e = history * L
        for _ in range(3):
            F.scaled_dot_product_attention(q, k[:, :e].transpose(1, 2), v[:, :e].transpose(1, 2))
        counts["gather"] = 0
        reset_stats()
        F.scaled_dot_product_attention(q, k[:, :e].transpose(1, 2), v[:, :e].transpose(1, 2))
        assert stats()["prefetched_reads"] == 1 and stats()["prefetches"] == 1
        assert counts["gather"] == 2


def test_a_released_workspace_voids_the_pending_prefetch(monkeypatch):
    monkeypatch.setenv("QVG_READ_PREFETCH", "on")
    (k, v), = [caches(5)[0]]
    q = torch.randn(B, H, L, D)
    e = 3 * L

    def read():
        return F.scaled_dot_product_attention(q, k[:, :e].transpose(1, 2), v[:, :e].transpose(1, 2))
    first, _ = read(), read()
    read_fast.release_workspace()
    reset_stats()
    assert torch.equal(read(), first) and stats()["prefetched_reads"] == 0


def test_a_bad_prefetch_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("QVG_READ_PREFETCH", "sometimes")
    with pytest.raises(ValueError, match="QVG_READ_PREFETCH"):
        read_prefetch.prefetch_enabled(torch.device("cpu"))
    monkeypatch.setenv("QVG_READ_PREFETCH", "auto")
    assert not read_prefetch.prefetch_enabled(torch.device("cpu"))
    assert read_prefetch.prefetch_enabled(torch.device("cuda"))
