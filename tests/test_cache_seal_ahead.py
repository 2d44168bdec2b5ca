"""Seal ahead (qvg_compile/cache/seal_ahead.py): a read that builds its plan learns which stores
are sealed after it and, the next time, encodes their seals ahead of the sealing writes. Results
must be bit-identical with it on and off, over the AR loop it is made for and over random
sequences of writes, rewrites, reads and resets where its predictions go wrong."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import qvg_compile
from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache import seal_ahead

H, D, CH, CHUNKS = 2, 64, 16, 5


def caches(layers: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[tuple[QVGCache, QVGCache]]:
    def one(role: str) -> QVGCache:
        return QVGCache.empty((1, CH * CHUNKS, H, D), 1, QVGConfig.preset("qvg"), role=role, chunk_tokens=CH,
                              device=device, dtype=dtype)
    return [(one("key"), one("value")) for _ in range(layers)]


def run(monkeypatch, flag: str, actions, device: str = "cpu", dtype: torch.dtype = torch.float32
        ) -> tuple[list[torch.Tensor], dict]:
    """Run ``actions`` (``("write", layer, chunk)``, ``("read", layer, chunk)``, ``("zero", layer,
    0)``) on fresh caches with seal ahead ``flag``; returns every read's output and the final
    caches, and the stats."""
    monkeypatch.setenv("QVG_SEAL_AHEAD", flag)
    seal_ahead.forget()
    qvg_compile.reset_stats()
    layers = 1 + max(a[1] for a in actions)
    kv = caches(layers, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    outs = []
    for kind, layer, chunk in actions:
        kb, vb = kv[layer]
        s, e = chunk * CH, (chunk + 1) * CH
        if kind == "write":
            kb[:, s:e] = randn(1, CH, H, D)
            vb[:, s:e] = randn(1, CH, H, D)
        elif kind == "read":
            q = randn(1, H, CH, D)
            outs.append(F.scaled_dot_product_attention(q, kb[:, :e].transpose(1, 2), vb[:, :e].transpose(1, 2)))
        else:
            kb.zero_()
            vb.zero_()
    outs += [t.dequantize() for pair in kv for t in pair]
    return outs, qvg_compile.stats()


def ar_loop(layers: int, passes: int) -> list[tuple[str, int, int]]:
    """Every chunk denoised ``passes`` times, each pass writing then reading every layer."""
    return [(kind, layer, c) for c in range(CHUNKS) for _ in range(passes) for layer in range(layers)
            for kind in ("write", "read")]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs CUDA")])])
def test_ar_loop_seals_every_layer_but_the_first_ahead_and_changes_nothing(monkeypatch, device):
    # On CUDA the encodes are replayed CUDA graphs and refusals go through the seal flags.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    off, stats_off = run(monkeypatch, "off", ar_loop(3, 3), device, dtype)
    on, stats_on = run(monkeypatch, "on", ar_loop(3, 3), device, dtype)
    assert all(torch.equal(a, b) for a, b in zip(off, on))
    assert stats_off["seals_ahead"] == 0
    # Chunk 1 seals chunk 0 and teaches each layer's read which seals follow it; from chunk 2 on,
    # layers 1 and 2 adopt both their seals (K and V) encoded ahead by the previous layer's read.
    assert stats_on["seals_ahead"] == (CHUNKS - 2) * 2 * 2
    assert stats_on["seals"] == stats_off["seals"] == (CHUNKS - 1) * 3 * 2
    assert stats_on["share_misfits"] == stats_off["share_misfits"]


def test_an_encode_made_ahead_is_dropped_when_the_rows_change_first(monkeypatch):
    # One pass per chunk: every read builds its plan, so each layer's read learns the next layer's
    # seals (and the last layer's, layer 0's of the next chunk); chunks 1 and 2 adopt 2 x 2 each.
    learn = ar_loop(2, 1)[:2 * 2 * 3]  # chunks 0-2
    plain = [("write", 0, 3), ("read", 0, 3), ("write", 1, 3), ("read", 1, 3)]
    # Layer 1's seal of chunk 2 is encoded ahead at layer 0's read of chunk 3, but layer 1 then
    # rewrites chunk 2 before advancing: that encode must not be adopted.
    twist = plain[:2] + [("write", 1, 2)] + plain[2:]
    counts = []
    for sequence in (learn + plain, learn + twist):
        off, _ = run(monkeypatch, "off", sequence)
        on, stats = run(monkeypatch, "on", sequence)
        assert all(torch.equal(a, b) for a, b in zip(off, on))
        counts.append(stats["seals_ahead"])
    assert counts == [8, 6]


def test_learned_order_of_an_unknown_or_freed_cache_is_skipped(monkeypatch):
    monkeypatch.setenv("QVG_SEAL_AHEAD", "on")
    seal_ahead.forget()
    assert seal_ahead.after_read(("a", 1), planned=True) == 0
    kv = caches(1)
    kv[0][0][:, :CH] = torch.randn(1, CH, H, D)
    kv[0][0][:, CH:2 * CH] = torch.randn(1, CH, H, D)  # one seal, recorded
    assert seal_ahead.after_read(("a", 2), planned=True) == 0  # learns ("a", 1)? no: a read came between
    kv[0][0][:, 2 * CH:3 * CH] = torch.randn(1, CH, H, D)
    assert seal_ahead.after_read(("a", 3), planned=True) == 0  # ("a", 2) -> that cache
    del kv
    assert seal_ahead.after_read(("a", 2), planned=True) == 0  # its arrays are gone


ACTIONS = st.lists(st.tuples(st.sampled_from(["write", "write", "read", "read", "zero"]), st.integers(0, 1),
                             st.integers(0, CHUNKS - 1)), min_size=4, max_size=30)


@settings(max_examples=20, deadline=None)
@given(prefix=st.integers(1, 3), actions=ACTIONS)
def test_random_sequences_give_the_same_results_with_and_without(prefix, actions):
    # A learned AR prefix first, so that later reads do encode ahead; then anything.
    with pytest.MonkeyPatch.context() as monkeypatch:
        sequence = ar_loop(2, 1)[:prefix * 2 * 2 * 2] + actions
        off, _ = run(monkeypatch, "off", sequence)
        on, _ = run(monkeypatch, "on", sequence)
    assert len(off) == len(on)
    assert all(torch.equal(a, b) for a, b in zip(off, on))
