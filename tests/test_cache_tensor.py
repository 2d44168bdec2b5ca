"""`QVGCache` as a tensor: construction, introspection, flatten/unflatten, torch.compile with
``fullgraph=True`` (compiled == eager on the same cache states, compile count bounded), and the
memory of a Wan-1.3B-sized layer cache filled the way Self-Forcing fills it."""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.compile_fx import compile_fx

from qvg_compile import QVGCache, QVGConfig
from qvg_compile.cache import reset_stats, stats

CFG = QVGConfig.preset("qvg").replace(centroids=16)
B, S, H, D, L = 1, 96, 2, 64, 16


class Counting:
    """An Inductor backend that counts the graphs it compiles."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return compile_fx(gm, example_inputs)


def pair() -> tuple[QVGCache, QVGCache]:
    return (QVGCache.empty((B, S, H, D), 1, CFG, dtype=torch.float32, chunk_tokens=L),
            QVGCache.empty((B, S, H, D), 1, CFG, role="value", dtype=torch.float32, chunk_tokens=L))


def test_empty_has_the_dense_tensors_metadata_and_validates():
    c = QVGCache.empty((2, S, H, D), 1, CFG, dtype=torch.bfloat16)
    assert c.shape == (2, S, H, D) and c.dtype == torch.bfloat16 and c.device.type == "cpu"
    assert c.seq_dim == 1 and c.token_counts()["holes"] == S
    assert "QVGCache(shape=[2, 96, 2, 64]" in repr(c)
    with pytest.raises(TypeError, match="config"):
        QVGCache.empty((B, S, H, D), 1, "qvg")
    with pytest.raises(TypeError, match="dtype"):
        QVGCache.empty((B, S, H, D), 1, CFG, dtype=torch.int32)
    with pytest.raises(ValueError, match="group_size"):
        QVGCache.empty((B, S, H, 48), 1, CFG)
    with pytest.raises(TypeError, match="unknown cache options"):
        QVGCache.empty((B, S, H, D), 1, CFG, chunk=4)
    with pytest.raises(TypeError, match="dense"):
        QVGCache.from_dense(c, 1, CFG)


def test_from_dense_keeps_the_last_slot_dense_and_seals_the_rest():
    torch.manual_seed(0)
    x = torch.zeros(B, S, H, D)
    x[:, :40] = torch.randn(B, 40, H, D)
    c = QVGCache.from_dense(x, 1, CFG, chunk_tokens=L)
    assert c.token_counts()["dense"] == L and c.token_counts()["sealed"] == 40 - L
    y = c.dequantize()
    assert torch.equal(y[:, 40 - L:40], x[:, 40 - L:40]) and torch.equal(y[:, 40:], x[:, 40:])
    rel = (y[:, :24] - x[:, :24]).norm() / x[:, :24].norm()
    # measured 0.760: 2-bit three-level key codes, one centroid (the default budget at 16 tokens), Gaussian noise
    assert 0.65 < rel < 0.85


def test_flatten_metadata_pickles_and_unflatten_rebuilds_the_same_view():
    torch.manual_seed(1)
    k, _ = pair()
    k[:, :L] = torch.randn(B, L, H, D)
    view = k[:, :L].transpose(1, 2)
    names, meta = view.__tensor_flatten__()
    assert pickle.loads(pickle.dumps(meta)) == meta
    inner = {n: getattr(view, n) for n in names}
    rebuilt = QVGCache.__tensor_unflatten__(inner, meta, view.shape, view.stride())
    assert torch.equal(rebuilt.dequantize(), view.dequantize())


def test_flatten_metadata_deep_copies_to_itself_unless_symbolic():
    """Dynamo's guard on a cache keeps a deep copy of its flatten metadata and compares it on every
    call: the copy is the same objects, so the compare is an identity check."""
    k, _ = pair()
    k[:, :L] = torch.randn(B, L, H, D)
    _, meta = k[:, :L].transpose(1, 2).__tensor_flatten__()
    assert all(a is b for a, b in zip(copy.deepcopy(meta), meta) if a is not None)
    # A view holding a length that is not a plain int is copied field by field, not shared.
    view = meta[1]
    odd = type(view)(view.dims, view.lead, (("run", 0, [L]),), view.parts, view.bcast, view.mode)
    copied = copy.deepcopy(odd)
    assert copied is not odd and copied == odd and copied.pieces[0][2] is not odd.pieces[0][2]


def _step(kb, vb, q, k, v, s: int, e: int):
    kb[:, s:e] = k
    vb[:, s:e] = v
    return F.scaled_dot_product_attention(q, kb[:, :e].transpose(1, 2), vb[:, :e].transpose(1, 2))


def test_compiled_write_and_read_equal_eager_with_at_most_two_compiles():
    torch.manual_seed(2)
    eager, compiled = pair(), pair()
    backend = Counting()
    step = torch.compile(_step, backend=backend, fullgraph=True)
    reset_stats()
    for c in range(S // L):
        for _ in range(3):
            q, k, v = torch.randn(B, H, L, D), torch.randn(B, L, H, D), torch.randn(B, L, H, D)
            out = step(*compiled, q, k, v, c * L, (c + 1) * L)
            ref = _step(*eager, q, k, v, c * L, (c + 1) * L)
            assert (out - ref).abs().max() <= 1e-5
    assert backend.graphs <= 2
    assert torch.equal(eager[0].dequantize(), compiled[0].dequantize())
    assert stats()["fallback_total"] == 0


def test_a_compiled_model_writes_again_after_an_eager_reset_of_a_released_cache():
    """Video 1 ends with `seal()` (dense rows freed); a compiled write cannot allocate them, so it
    is a clear error; an eager ``zero_()`` (the next video's reset) re-opens the slots and the
    compiled step runs again, as it does on a fresh cache."""
    torch.manual_seed(3)
    caches, fresh = pair(), pair()
    step = torch.compile(_step, backend=Counting(), fullgraph=True)
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, L, H, D), torch.randn(B, L, H, D)
    for c in range(2):
        step(*caches, q, k, v, c * L, (c + 1) * L)
    for cache in caches:
        cache.seal()
        assert cache.spec.slot_tokens == 0
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no dense slots"):
        torch.compile(_step, backend=Counting(), fullgraph=True)(*caches, q, k, v, 2 * L, 3 * L)
    for cache in caches:
        cache.zero_()
        assert cache.spec.slot_tokens == L and cache.token_counts()["sealed"] == 0
    torch._dynamo.reset()
    step = torch.compile(_step, backend=Counting(), fullgraph=True)
    out = step(*caches, q, k, v, 0, L)
    assert (out - _step(*fresh, q, k, v, 0, L)).abs().max() <= 1e-5


def _functional(k_cache, v_cache, q, k, v):
    kk, vv = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)
    return F.scaled_dot_product_attention(q, kk, vv)


def test_compiled_functional_cat_over_growing_caches():
    torch.manual_seed(3)
    backend = Counting()
    fn = torch.compile(_functional, backend=backend, fullgraph=True)
    # From 512 tokens on, the codebook has its full 16 centroids: the layout (spec) stops changing.
    for n in (512, 576, 640, 704):
        kc = QVGCache.from_dense(torch.randn(1, H, n, D), 2, CFG)
        vc = QVGCache.from_dense(torch.randn(1, H, n, D), 2, CFG, role="value")
        q, k, v = torch.randn(1, H, 8, D), torch.randn(1, H, 8, D), torch.randn(1, H, 8, D)
        assert (fn(kc, vc, q, k, v) - _functional(kc, vc, q, k, v)).abs().max() <= 1e-5
    assert backend.graphs <= 2


def _append_and_read(k_cache, q, k):
    """Idiom D fed back: the caller stores the returned, grown cache for the next call."""
    kk = torch.cat([k_cache, k], 2)
    return F.scaled_dot_product_attention(q, kk, kk), kk


def test_compiled_cache_grown_by_cat_and_fed_back_compiles_at_most_three_times():
    torch.manual_seed(5)
    backend = Counting()
    fn = torch.compile(_append_and_read, backend=backend, fullgraph=True)
    first = torch.randn(1, H, L, D)
    eager = QVGCache.from_dense(first, 2, CFG, chunk_tokens=L)
    compiled = QVGCache.from_dense(first, 2, CFG, chunk_tokens=L)
    for _ in range(8):
        q, k = torch.randn(1, H, 4, D), torch.randn(1, H, L, D)
        out, compiled = fn(compiled, q, k)
        ref, eager = _append_and_read(eager, q, k)
        assert (out - ref).abs().max() <= 1e-5
    # The first store, then (store, appended chunk) static and with symbolic lengths.
    assert backend.graphs <= 3
    assert torch.equal(compiled.dequantize(), eager.dequantize()) and compiled.shape[2] == 9 * L


def test_a_cache_pickles_without_a_cycle_and_round_trips_through_torch_save(tmp_path):
    """Compile-cache keys pickle example inputs in ``fast`` mode (no memo: a cycle raises), as
    AOTAutograd does on torch < 2.13; `torch.save` must give back the same tokens and view, and
    `copy.deepcopy` a cache that writes do not share."""
    torch.manual_seed(2)
    k, _ = pair()
    k[:, :2 * L + 3] = torch.randn(B, 2 * L + 3, H, D)  # two sealed chunks, three dense rows
    view = torch.cat([k[:, :2 * L + 3], torch.randn(B, 5, H, D)], 1).transpose(1, 2)
    for cache in (k, view):
        fast = pickle.Pickler(io.BytesIO())
        fast.fast = True
        fast.dump(cache)
        path = tmp_path / "cache.pt"
        torch.save({"cache": cache}, path)
        loaded = torch.load(path, weights_only=False)["cache"]
        assert type(loaded) is QVGCache and loaded.shape == cache.shape
        assert loaded.token_counts() == cache.token_counts()
        assert torch.equal(loaded.dequantize(), cache.dequantize())
    twin = copy.deepcopy(k)
    twin[:, 2 * L + 3:2 * L + 5] = torch.ones(B, 2, H, D)
    assert torch.equal(twin.dequantize()[:, 2 * L + 3:2 * L + 5], torch.ones(B, 2, H, D))
    assert torch.equal(k.dequantize()[:, 2 * L + 3:], torch.zeros(B, S - 2 * L - 3, H, D))


def test_recompile_for_a_larger_store_does_not_reuse_the_smaller_stores_code():
    """Same flatten metadata and a symbolic outer length, but larger inner arrays: AOTAutograd's
    cache must key them apart (else Inductor's input size asserts fail on the second call)."""
    gen = torch.Generator().manual_seed(6)
    p = QVGCache.from_dense(torch.randn(1, H, L, D, generator=gen), 2, CFG, chunk_tokens=L)
    small = torch.cat([p, torch.randn(1, H, L, D, generator=gen)], 2)
    large = torch.cat([small, torch.randn(1, H, L, D, generator=gen)], 2)
    assert small.__tensor_flatten__() == large.__tensor_flatten__()
    assert small._stable_hash_for_caching() != large._stable_hash_for_caching()
    backend = Counting()
    fn = torch.compile(lambda k, q: F.scaled_dot_product_attention(q, k, k), backend=backend, fullgraph=True)
    torch._dynamo.mark_dynamic(small, 2)
    for k in (small, large):
        q = torch.randn(1, H, 4, D, generator=gen)
        assert (fn(k, q) - F.scaled_dot_product_attention(q, k.dequantize(), k.dequantize())).abs().max() <= 1e-5
    # Caches grown by cat are marked dynamic in their store's capacity dims, so one symbolic graph
    # may serve both; a second graph for the larger store must not reuse the first one's code.
    assert backend.graphs <= 2


@pytest.mark.parametrize("frames", [21, 120])
def test_wan_sized_layer_cache_memory(frames: int):
    """12 heads x 128, 1,560 tokens per frame, chunks of 3 frames, 5 writes per chunk.

    While the video is generated, exactly one chunk (the slot the denoising steps rewrite) is BF16;
    by itself it costs ``16 / chunks`` bits per element (2.3 bits at 21 frames), which bounds the
    ratio then (measured 3.37x at 21 frames, 5.66x at 120). At the end of the video `seal` quantizes
    that chunk too (once) and frees its rows: 6.51x and 6.59x, every array counted."""
    chunk, h, d = 3 * 1560, 12, 128
    n = frames * 1560
    cache = QVGCache.empty((1, n, h, d), 1, QVGConfig.preset("qvg"), dtype=torch.bfloat16, chunk_tokens=chunk)
    gen = torch.Generator().manual_seed(frames)
    reset_stats()
    for c in range(frames // 3):
        for _ in range(5):
            cache[:, c * chunk:(c + 1) * chunk] = torch.randn(1, chunk, h, d, generator=gen, dtype=torch.bfloat16)
        counts = cache.token_counts()
        assert counts["dense"] == chunk and counts["sealed"] == c * chunk and stats()["seals"] == c
    tail_bytes = chunk * h * d * 2
    assert cache.compression_ratio() >= (3.35 if frames == 21 else 5.65)
    assert (n * h * d * 2 - tail_bytes) / (cache.nbytes() - tail_bytes) >= (5.55 if frames == 21 else 6.4)
    cache.seal()
    counts = cache.token_counts()
    assert counts == {"sealed": n, "dense": 0, "holes": 0, "segments": math.ceil(frames / 6)}
    assert stats()["seals"] == frames // 3 and stats()["sealed_tokens"] == n
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in cache._handle.arrays)
    assert cache.compression_ratio() >= 6.5


def test_a_released_cache_allocates_its_slots_again_at_the_next_write():
    """`seal()` frees the dense rows; the next write brings back slots of the same length, and
    nothing sealed changes."""
    torch.manual_seed(0)
    cache = QVGCache.empty((1, 2, 96, 64), 2, QVGConfig.preset("qvg"), dtype=torch.float32)
    first = torch.randn(1, 2, 48, 64)
    cache[:, :, :24] = first[:, :, :24]
    cache[:, :, 24:48] = first[:, :, 24:]
    full = cache.nbytes()
    sealed = cache.seal().dequantize()[:, :, :48]
    assert cache.nbytes() < full and cache.token_counts()["dense"] == 0
    assert cache.spec.slot_tokens == 0 and cache.spec.policy.chunk_tokens == 24
    second = torch.randn(1, 2, 24, 64)
    cache[:, :, 48:72] = second
    assert cache.spec.slot_tokens == 24 and cache.nbytes() == full
    out = cache.dequantize()
    torch.testing.assert_close(out[:, :, :48], sealed, rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 48:72], second, rtol=0, atol=0)
    assert cache.seal(release=False).token_counts()["dense"] == 0 and cache.nbytes() == full
    with pytest.raises(TypeError, match="release"):
        cache.seal(release=1)


def _rolling(kb, k, sink: int, keep: int, evict: int, end: int):
    """Idiom B: shift the kept window left past the sinks, write the new chunk at the end."""
    kb[:, sink:sink + keep] = kb[:, sink + evict:sink + evict + keep].clone()
    kb[:, end - k.shape[1]:end] = k
    return kb[:, :end].sum()  # any read that depends on every token


def _clone_write_cat_read(kb, vb, q, k, v, s: int, e: int):
    """Idiom C: write into clones, read sinks + window by cat; the buffers are not mutated."""
    tk, tv = kb.clone(), vb.clone()
    tk[:, s:e] = k
    tv[:, s:e] = v
    rk = torch.cat([tk[:, :4], tk[:, 16:e]], 1).transpose(1, 2)
    rv = torch.cat([tv[:, :4], tv[:, 16:e]], 1).transpose(1, 2)
    return F.scaled_dot_product_attention(q, rk, rv)


def _index_write(kb, vb, q, k, v, idx):
    """Idiom H: tensor-indexed writes, then attention over the whole buffer."""
    kb.index_copy_(1, idx, k)
    vb[:, idx] = v
    return F.scaled_dot_product_attention(q, kb.transpose(1, 2), vb.transpose(1, 2))


@pytest.mark.parametrize("idiom", ["B", "C", "H"])
def test_compiled_idioms_equal_eager(idiom: str):
    torch.manual_seed(4)
    eager, compiled = pair(), pair()
    backend = Counting()
    for caches in (eager, compiled):
        gen = torch.Generator().manual_seed(0)
        for c in range(4):
            x = torch.randn(B, L, H, D, generator=gen)
            caches[0][:, c * L:(c + 1) * L] = x
            caches[1][:, c * L:(c + 1) * L] = x
    if idiom == "B":
        fn = torch.compile(_rolling, backend=backend, fullgraph=True)
        for step in range(3):
            k = torch.randn(B, L, H, D)
            out = fn(compiled[0], k, 4, 44, 16, 64)
            ref = _rolling(eager[0], k, 4, 44, 16, 64)
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-3)
    elif idiom == "C":
        fn = torch.compile(_clone_write_cat_read, backend=backend, fullgraph=True)
        for step in range(3):
            q, k, v = torch.randn(B, H, L, D), torch.randn(B, L, H, D), torch.randn(B, L, H, D)
            out = fn(*compiled, q, k, v, 64, 80)
            assert (out - _clone_write_cat_read(*eager, q, k, v, 64, 80)).abs().max() <= 1e-5
    else:
        fn = torch.compile(_index_write, backend=backend, fullgraph=True)
        for step in range(3):
            idx = torch.arange(64 + step * 8, 72 + step * 8)
            q, k, v = torch.randn(B, H, 8, D), torch.randn(B, 8, H, D), torch.randn(B, 8, H, D)
            out = fn(*compiled, q, k, v, idx)
            assert (out - _index_write(*eager, q, k, v, idx)).abs().max() <= 1e-5
    assert torch.equal(eager[0].dequantize(), compiled[0].dequantize())
    assert backend.graphs <= 2


def _video(steps_per_chunk: int = 2):
    """(chunk index, start, end) of every call over a video of S // L chunks, each chunk written
    ``steps_per_chunk`` times (denoising steps rewrite the open slot)."""
    return [(c, c * L, (c + 1) * L) for c in range(S // L) for _ in range(steps_per_chunk)]


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _rope_at_read(kb, vb, q, k, v, cos, sin, s: int, e: int):
    """Idiom E: the cache holds pre-RoPE keys; RoPE is applied to the whole history at read."""
    kb[:, s:e] = k
    vb[:, s:e] = v
    kr = _rope(kb[:, :e], cos[:e, None], sin[:e, None])
    return F.scaled_dot_product_attention(q, kr.transpose(1, 2), vb[:, :e].transpose(1, 2))


# Fallbacks of a compiled graph are counted when AOTAutograd traces it: a graph loaded from a
# warm AOTAutograd cache is not traced, so this test compiles afresh.
@torch._functorch.config.patch(enable_autograd_cache=False)
def test_compiled_idiom_e_rope_at_read_equals_eager_and_dense():
    gen = torch.Generator().manual_seed(7)
    cos, sin = torch.randn(S, D // 2, generator=gen), torch.randn(S, D // 2, generator=gen)
    eager, compiled = pair(), pair()
    backend = Counting()
    fn = torch.compile(_rope_at_read, backend=backend, fullgraph=True)
    fallbacks = {"eager": Counter(), "traced": Counter(), "run": Counter()}
    for _, s, e in _video():
        q, k, v = torch.randn(B, H, L, D, generator=gen), torch.randn(B, L, H, D, generator=gen), \
            torch.randn(B, L, H, D, generator=gen)
        reset_stats()
        ref = _rope_at_read(*eager, q, k, v, cos, sin, s, e)
        fallbacks["eager"].update(stats()["fallbacks"])
        reset_stats()
        graphs = backend.graphs
        out = fn(*compiled, q, k, v, cos, sin, s, e)
        fallbacks["traced" if backend.graphs > graphs else "run"].update(stats()["fallbacks"])
        assert (out - ref).abs().max() <= 1e-5
        # A dense tensor holding the same quantized values (the rewrite of the open slot is exact).
        dense = [c.dequantize() for c in eager]
        assert (_rope_at_read(*dense, q, k, v, cos, sin, s, e) - ref).abs().max() <= 1e-5
    assert torch.equal(eager[0].dequantize(), compiled[0].dequantize())
    assert backend.graphs <= 3
    # RoPE needs the keys dense: the half split of the head dim falls back, and attention over
    # dense keys with cached values decodes the values. Counted once per eager call; compiled,
    # only while a graph is traced (AOTAutograd traces each graph once or twice, depending on its
    # caches), never when a compiled graph runs.
    ops = ("aten.split.Tensor", "qvg.sdpa.default")
    assert fallbacks["eager"] == {op: len(_video()) for op in ops}
    assert set(fallbacks["traced"]) == set(ops) and fallbacks["run"] == Counter()


def _packed_kv(kv, q, k, v, s: int, e: int):
    """Idiom F: K and V packed along the last dim, read by split, chunk and slices; GQA."""
    kv[:, s:e] = torch.cat([k, v], dim=-1)
    kk, vv = kv[:, :e].split(D, dim=-1)
    k2, _ = kv[:, :e].chunk(2, dim=-1)
    v2 = kv[:, :e, :, D:]
    gqa = F.scaled_dot_product_attention(q, kk.repeat_interleave(2, dim=2).transpose(1, 2),
                                         vv.repeat_interleave(2, dim=2).transpose(1, 2))
    return gqa[:, ::2] + F.scaled_dot_product_attention(q[:, ::2], k2.transpose(1, 2), v2.transpose(1, 2))


def test_compiled_idiom_f_packed_kv_equals_eager_and_dense_without_fallback():
    gen = torch.Generator().manual_seed(8)

    def packed():
        return QVGCache.empty((B, S, H, 2 * D), 1, CFG, roles=("key", "value"), dtype=torch.float32,
                              chunk_tokens=L)

    eager, compiled = packed(), packed()
    backend = Counting()
    fn = torch.compile(_packed_kv, backend=backend, fullgraph=True)
    reset_stats()
    for _, s, e in _video():
        q, k, v = torch.randn(B, 2 * H, L, D, generator=gen), torch.randn(B, L, H, D, generator=gen), \
            torch.randn(B, L, H, D, generator=gen)
        ref = _packed_kv(eager, q, k, v, s, e)
        assert (fn(compiled, q, k, v, s, e) - ref).abs().max() <= 1e-5
        assert (_packed_kv(eager.dequantize(), q, k, v, s, e) - ref).abs().max() <= 1e-5
    assert torch.equal(eager.dequantize(), compiled.dequantize())
    assert eager.token_counts()["sealed"] == S - L
    assert backend.graphs <= 3
    assert stats()["fallback_total"] == 0


class _Layer(torch.nn.Module):
    """Idiom G: the caches live in a dict held by a module attribute across calls; one compiled
    call writes them, another reads them, a third resets them for the next video."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = dict(zip("kv", pair()))

    def write(self, k, v, s: int, e: int) -> None:
        self.cache["k"][:, s:e] = k
        self.cache["v"][:, s:e] = v

    def read(self, q, e: int):
        return F.scaled_dot_product_attention(q, self.cache["k"][:, :e].transpose(1, 2),
                                              self.cache["v"][:, :e].transpose(1, 2))

    def reset(self) -> None:
        self.cache["k"].zero_()
        self.cache["v"].fill_(0)


def test_compiled_idiom_g_module_state_written_and_read_in_separate_graphs():
    gen = torch.Generator().manual_seed(9)
    eager, compiled = _Layer(), _Layer()
    backends = {name: Counting() for name in ("write", "read", "reset")}
    fns = {name: torch.compile(getattr(compiled, name), backend=b, fullgraph=True) for name, b in backends.items()}
    reset_stats()
    for video in range(2):
        for _, s, e in _video():
            q, k, v = torch.randn(B, H, L, D, generator=gen), torch.randn(B, L, H, D, generator=gen), \
                torch.randn(B, L, H, D, generator=gen)
            eager.write(k, v, s, e)
            fns["write"](k, v, s, e)
            ref = eager.read(q, e)
            assert (fns["read"](q, e) - ref).abs().max() <= 1e-5
            dense = {name: c.dequantize() for name, c in eager.cache.items()}
            assert (F.scaled_dot_product_attention(q, dense["k"][:, :e].transpose(1, 2),
                                                   dense["v"][:, :e].transpose(1, 2)) - ref).abs().max() <= 1e-5
        assert all(torch.equal(eager.cache[n].dequantize(), compiled.cache[n].dequantize()) for n in "kv")
        eager.reset()
        fns["reset"]()
        assert all(compiled.cache[n].token_counts()["holes"] == S for n in "kv")
    assert all(isinstance(compiled.cache[n], QVGCache) for n in "kv")
    assert {name: b.graphs <= 3 for name, b in backends.items()} == {name: True for name in backends}
    assert stats()["fallback_total"] == 0


def test_memory_splits_the_bytes_by_component():
    """256 tokens x 4 heads x 64 channels, BF16, chunks of 64 (``qvg`` preset): one open chunk of
    64 BF16 rows (16 x 64 / 256 = 4 bits per element), the codes 2 bits, scales (FP8 per 64
    channels) 0.125, assignments (one byte per token and head) 0.125; seal frees the rows."""
    x = torch.randn(1, 256, 4, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    c = QVGCache.from_dense(x, 1, QVGConfig.preset("qvg"), chunk_tokens=64)
    mem = c.memory()
    assert (mem["codes"], mem["scales"], mem["assignments"], mem["open_rows"]) == (2.0, 0.125, 0.125, 4.0)
    # Codebooks sized by the 0.25-bit budget: 2 slots (shared by 2 chunks each) of 2 BF16
    # centroids, 0.25 bits; token map, slots and segment ids: 0.1377 bits.
    assert mem["codebooks"] == 0.25 and mem["token_state"] == pytest.approx(0.1377, abs=1e-4)
    assert mem["dense_pieces"] == 0
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k not in ("total", "ratio")))
    assert mem["ratio"] == pytest.approx(c.compression_ratio()) == pytest.approx(16 / mem["total"])
    c.seal()
    assert c.memory()["open_rows"] == 0 and c.memory()["ratio"] == pytest.approx(6.07, abs=0.01)
