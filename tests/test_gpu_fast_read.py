"""GPU checks of the fast read (``pytest -m gpu`` on a CUDA machine; skipped elsewhere): the
Triton gather against its PyTorch reference, and the fast read against the general read at a
Wan-like head shape, in BF16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qvg_compile
from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache import reset_stats, stats
from qvg_compile.kernels.gather import ROWS, SEALED, block_table, gather_pair

from example_models import switch_seal_ahead

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

H, D, L = 12, 128, 1560


def filled(role: str, chunks: int, seed: int) -> QVGCache:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    c = QVGCache.empty((1, (chunks + 1) * L, H, D), 1, QVGConfig.preset("qvg"), role=role, dtype=torch.bfloat16,
                       device="cuda", chunk_tokens=L)
    for i in range(chunks):
        c[:, i * L:(i + 1) * L] = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    return c


def test_triton_gather_equals_reference_on_cuda():
    k, v = filled("key", 4, 0), filled("value", 4, 1)
    ks, vs = k._handle.store.packed(0), v._handle.store.packed(0)
    kt, vt = k._handle.store.rows_view(0, None), v._handle.store.rows_view(0, None)
    runs = [(SEALED, 0, 0, 3 * L), (ROWS, 0, 3 * L, L)]
    table = block_table(runs, runs, torch.device("cuda"))
    outs = [torch.empty(1, H, 4 * L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    gather_pair(ks, vs, kt, vt, runs, runs, table, outs[0], outs[1], use_triton=True)
    gather_pair(ks, vs, kt, vt, runs, runs, table, outs[2], outs[3], use_triton=False)
    for got, ref in ((outs[0], outs[2]), (outs[1], outs[3])):
        # BF16 outputs of the same fp32 arithmetic: equal or one BF16 ulp apart (FMA contraction).
        assert ((got.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-6).all()


def test_fast_read_equals_general_read_on_cuda(monkeypatch):
    k, v = filled("key", 6, 2), filled("value", 6, 3)
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16)
    e = 6 * L
    outs = []
    for path in ("auto", "general"):
        monkeypatch.setenv("QVG_READ_PATH", path)
        reset_stats()
        outs.append(F.scaled_dot_product_attention(q, k[:, :e].transpose(1, 2), v[:, :e].transpose(1, 2)))
        assert stats()["fast_reads" if path == "auto" else "general_reads"] == 1
    rel = (outs[0].float() - outs[1].float()).norm() / outs[1].float().norm()
    assert rel <= 1e-2


def test_graphed_seals_equal_eager_seals_on_cuda(monkeypatch):
    decoded = []
    for graphs in ("1", "0"):
        monkeypatch.setenv("QVG_SEAL_GRAPHS", graphs)
        c = filled("key", 6, 4)
        decoded.append(c.dequantize())
    assert torch.equal(decoded[0], decoded[1])


def test_refused_seal_raises_at_a_later_seal_on_cuda():
    c = filled("key", 5, 5)
    c.zero_()
    c[:, :L] = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
    c[:, L:2 * L] = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
    bad = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
    bad[0, 7, 3, 5] = float("nan")
    c[:, 2 * L:3 * L] = bad  # open chunk: dense, not checked
    c[:, 3 * L:4 * L] = bad.nan_to_num()  # seals the NaN chunk: launched, not waited for
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="refused by the encoder .*NaN"):
        c[:, 4 * L:5 * L] = bad.nan_to_num()
    c.zero_()
    c[:, :L] = bad.nan_to_num()
    c[:, L:2 * L] = bad.nan_to_num()


def test_seal_ahead_on_cuda_computes_what_it_computes_without(monkeypatch):
    """Three layers of K/V caches at Wan's head shape, written and read 3 times per chunk by a
    compiled step: with `seal_ahead` the outputs and caches are bit-equal to those without, and
    layers after the first have their sealing writes opened ahead from chunk 2 on."""
    def step(kb, vb, q, x, s: int, e: int):
        kb[:, s:e] = x
        vb[:, s:e] = x * 0.5
        return F.scaled_dot_product_attention(q, kb[:, :e].transpose(1, 2), vb[:, :e].transpose(1, 2))

    compiled = torch.compile(step, fullgraph=True)
    results, counts = [], []
    for switch in ("off", "on"):
        switch_seal_ahead(monkeypatch, switch)
        gen = torch.Generator(device="cuda").manual_seed(5)
        caches = [tuple(QVGCache.empty((1, 5 * L, H, D), 1, QVGConfig.preset("qvg"), role=role, dtype=torch.bfloat16,
                                       device="cuda", chunk_tokens=L) for role in ("key", "value")) for _ in range(3)]
        outs = []
        for c in range(5):
            for _ in range(3):
                for kb, vb in caches:
                    x = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                    outs.append(compiled(kb, vb, q, x, c * L, (c + 1) * L))
        results.append(outs + [t.dequantize() for pair in caches for t in pair])
        counts.append(stats())
    assert all(torch.equal(a, b) for a, b in zip(*results))
    # From chunk 2 on, layers 1 and 2 are opened ahead: 12 opens, K and V counted apart (fewer
    # under `QVG_SEAL_AHEAD=backoff`, where an open that ended after its short attention skips
    # the next ones; exactly 12 on the H200, 2026-12-04).
    assert counts[1]["seals_ahead"] == 12 and counts[1].get("seals_undone", 0) == 0
    assert counts[1]["seals"] == counts[0]["seals"]


def test_cudagraphs_backend_computes_what_the_plain_backend_computes_on_cuda():
    """`backend(cudagraphs=True)`: Inductor's CUDA graphs around the cache ops (graph partitions,
    `cache.lean_op.CACHE_OP_TAGS`) give the outputs of the backend without them, over 5 chunks x
    3 passes of a step whose dense K/V cache the backend moves into QVG storage."""
    def step(state, q, x, s: int, e: int):
        state["k"][:, s:e] = x
        state["v"][:, s:e] = x * 0.5
        return F.scaled_dot_product_attention(q, state["k"][:, :e].transpose(1, 2), state["v"][:, :e].transpose(1, 2))

    results = []
    for graphs in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(step, backend=qvg_compile.backend(cudagraphs=graphs))
        gen = torch.Generator(device="cuda").manual_seed(6)
        state = {name: torch.zeros(1, 5 * L, H, D, device="cuda", dtype=torch.bfloat16) for name in ("k", "v")}
        outs = []
        for c in range(5):
            for _ in range(3):
                x = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                outs.append(compiled(state, q, x, c * L, (c + 1) * L).clone())
        assert isinstance(state["k"], QVGCache) and isinstance(state["v"], QVGCache)
        results.append(outs)
    assert all(torch.equal(a, b) for a, b in zip(*results))
