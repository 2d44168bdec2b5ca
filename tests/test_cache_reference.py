"""`QVGCache` against an independent reference (idioms A-J): every sealed token of
a cache, decoded, equals what the math layer makes of the token that was written, given the
codebook the cache stored for it (nearest centroid per stage with `quant.lloyd.assign`, then `quant.group` codes of the
residual); dense tokens equal what was written; attention over the cache equals SDPA over those
reference values. A bug shared by the store's decode and its attention read cannot pass.

The codebook itself (how k-means fits it) is the math layer's, tested there; here it is taken
from the store. Centroids are kept in fp32 so that the reference's assignment sees exactly the
centroids the encoder assigned to (BF16 rounding after the last Lloyd step would move ties).
Tolerance: 1e-5 absolute on O(1) values (fp32 sums in a different order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qvg_compile import QVGCache, QVGConfig, compress
from qvg_compile.cache.spec import CSIZE
from qvg_compile.cache.view import CHAN, RUN, SEQ, Lead, View
from qvg_compile.quant.group import group_dequantize, group_quantize
from qvg_compile.quant.lloyd import assign
from qvg_compile.quant.segment import gather_centroids

CFG = QVGConfig.preset("qvg").replace(centroids=16, centroid_dtype="fp32")
B, S, H, D, L = 1, 64, 2, 64, 16
ATOL = 1e-5
# A codebook budget that gives these 16-token chunks 8-centroid codebooks (the default
# budget gives them one centroid), so a short segment has fewer tokens than its codebook.
BUDGET = dict(chunk_tokens=L, codebook_bits=8.0, codebook_chunks=2)


def reference_values(cache: QVGCache, truth: torch.Tensor) -> torch.Tensor:
    """``truth`` (what the dense cache would hold, the cache's shape) with every sealed token
    replaced by the reference decode of that token under the codebook the store kept for it."""
    store = cache._handle.store
    spec = store.spec
    view = cache._view
    xs = view.to_normalised(truth).clone()  # [*lead, cap, channels]
    pm = store.pos_map.long()
    first = 0
    for p, dp in enumerate(spec.part_dims):
        part = xs[..., first:first + dp]
        config = spec.config
        for code in torch.unique(pm[pm <= -2]).tolist():
            slot = -code - 2
            pos = (pm == code).nonzero().flatten()
            c = int(store.segs[slot, CSIZE])
            cents = store.array("cents", p)[slot, ..., :c, :].float()  # [S, *lead, C, dp]
            x = part[..., pos, :].float()
            lead = x.shape[:-2]
            sets = int(torch.Size(lead).numel())
            residual = x.reshape(sets, -1, dp).clone()
            for s in range(spec.stages):
                book = cents[s].reshape(sets, c, dp)
                picked, _ = assign(residual, book)
                residual -= gather_centroids(book, picked)
            mode = config.code_mode_for(spec.roles[p])
            codes = group_quantize(residual, spec.bits(p), config.group_size, mode, config.torch_scale_dtype)
            decoded = group_dequantize(codes, spec.bits(p), config.group_size, mode)
            part[..., pos, :] = (decoded + (x.reshape(sets, -1, dp) - residual)).reshape(*lead, -1, dp).to(part.dtype)
        first += dp
    return view.from_normalised(xs)


def check(cache: QVGCache, truth: torch.Tensor, seq_dim: int) -> None:
    """Decoded cache == reference values; SDPA over the cache == SDPA over them."""
    ref = reference_values(cache, truth)
    got = cache.dequantize()
    assert (got - ref).abs().max() <= ATOL
    counts = cache.token_counts()
    assert counts["sealed"] > 0 and int(cache._handle.store.segs[:, CSIZE].max()) > 1  # exercised
    if cache.dim() == 4 and seq_dim == 1 and cache.shape[-1] == D:
        gen = torch.Generator().manual_seed(99)
        q = torch.randn(B, H, 8, D, generator=gen)
        kv = cache.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, kv, kv)
        want = F.scaled_dot_product_attention(q, ref.transpose(1, 2), ref.transpose(1, 2))
        assert (out - want).abs().max() <= ATOL


def chunks(seed: int, n: int = S // L) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, D, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("role", ["key", "value"])
def test_a_slice_writes_with_denoising_rewrites(role):
    cache = QVGCache.empty((B, S, H, D), 1, CFG, role=role, dtype=torch.float32, **BUDGET)
    truth = torch.zeros(B, S, H, D)
    for c, x in enumerate(chunks(1)):
        for step in range(3):  # the last write of a chunk is the one that lasts
            y = x + step
            cache[:, c * L:(c + 1) * L] = y
            truth[:, c * L:(c + 1) * L] = y
    check(cache, truth, 1)


def test_a_seal_of_a_short_last_chunk_on_a_shared_codebook():
    """The video ends after 5 tokens of a chunk: `seal` quantizes them with the codebook they
    share (16 centroids for 5 tokens), each token at its own position."""
    cache = QVGCache.empty((B, S, H, D), 1, CFG, dtype=torch.float32, **BUDGET)
    truth = torch.zeros(B, S, H, D)
    xs = chunks(2)
    cache[:, :L] = truth[:, :L] = xs[0]
    cache[:, L:L + 5] = xs[1][:, :5]
    truth[:, L:L + 5] = xs[1][:, :5]
    cache.seal(release=False)
    assert cache.token_counts()["dense"] == 0
    check(cache, truth, 1)


def test_b_rolling_window_relocates_open_tokens_onto_a_shared_codebook():
    """Sinks stay dense; sealed tokens move as they are; the open chunk's tokens, relocated with
    no free slot, are quantized where they land (fewer tokens than the codebook has centroids)."""
    cache = QVGCache.empty((B, S, H, D), 1, CFG, dtype=torch.float32, dense_sinks=4, **BUDGET)
    x = torch.randn(B, S, H, D, generator=torch.Generator().manual_seed(3))
    truth = torch.zeros(B, S, H, D)
    for s in range(0, 52, L):
        cache[:, s:min(s + L, 52)] = x[:, s:min(s + L, 52)]
        truth[:, s:min(s + L, 52)] = x[:, s:min(s + L, 52)]
    moved = truth[:, 36:52].clone()
    cache[:, 4:20] = cache[:, 36:52].clone()
    truth[:, 4:20] = moved
    # Tokens 4..15 of the window were sealed where they were: compare them under their codebook
    # with the original tokens (they moved bit-exactly); 16..19 were quantized on arrival.
    check(cache, truth, 1)


def test_f_packed_key_and_value_parts():
    cache = QVGCache.empty((B, S, H, 2 * D), 1, CFG, roles=("key", "value"), dtype=torch.float32, **BUDGET)
    truth = torch.zeros(B, S, H, 2 * D)
    gen = torch.Generator().manual_seed(4)
    for c in range(3):
        y = torch.randn(B, L, H, 2 * D, generator=gen)
        cache[:, c * L:(c + 1) * L] = truth[:, c * L:(c + 1) * L] = y
    check(cache, truth, 1)


def test_h_index_copy_writes():
    cache = QVGCache.empty((B, S, H, D), 1, CFG, dtype=torch.float32, **BUDGET)
    truth = torch.zeros(B, S, H, D)
    for c, x in enumerate(chunks(5, 3)):
        idx = torch.arange(c * L, (c + 1) * L)
        cache.index_copy_(1, idx, x)
        truth.index_copy_(1, idx, x)
    check(cache, truth, 1)


def test_the_reference_catches_a_token_stored_at_the_wrong_position():
    """The check is not vacuous: swapping two sealed tokens' codes makes it fail."""
    cache = QVGCache.empty((B, S, H, D), 1, CFG, dtype=torch.float32, **BUDGET)
    truth = torch.zeros(B, S, H, D)
    for c, x in enumerate(chunks(6, 3)):
        cache[:, c * L:(c + 1) * L] = truth[:, c * L:(c + 1) * L] = x
    codes = cache._handle.store.array("codes", 0)
    codes[..., [0, 1], :] = codes[..., [1, 0], :]
    with pytest.raises(AssertionError):
        check(cache, truth, 1)


def whole_store(cache: QVGCache) -> QVGCache:
    """The cache's whole store as one ``[*lead, capacity, channels]`` view."""
    store = cache._handle.store
    lead = tuple(Lead(0, n) for n in store.lead)
    view = View(tuple(range(len(lead))) + (SEQ, CHAN), lead, ((RUN, 0, store.capacity),),
                (0, len(store.spec.part_dims)))
    return QVGCache(cache._handle, view)


@pytest.mark.parametrize("peek", [False, True], ids=["store", "peek"])
def test_d_and_j_a_cache_grown_by_cat_and_read_with_the_new_chunk(peek):
    """Idiom D: the pipeline keeps ``cat([cache, new])`` (the store seals the older appended
    chunk); idiom J: a read-only pass reads ``cat([cache, new])`` and drops it. The store's
    sealed tokens follow the reference, and attention over the cat view equals SDPA over the
    reference values of its stored run and its dense pieces."""
    gen = torch.Generator().manual_seed(7)
    parts = [torch.randn(1, H, L, D, generator=gen) for _ in range(5)]
    k = QVGCache.from_dense(parts[0], 2, CFG, **BUDGET)
    for new in parts[1:4]:
        k = torch.cat([k, new], 2)
    # A read-only cat still appends the cache's own dense piece to the shared store (where the
    # pipeline's next store would put it): the reference follows the view that is read.
    peeked = torch.cat([k, parts[4]], 2) if peek else k
    truth = torch.cat(parts, 2)
    store = whole_store(peeked)
    run = peeked._view.pieces[0][2]
    truth_store = torch.zeros(store.shape)
    truth_store[:, :, :run] = truth[:, :, :run]
    ref_store = reference_values(store, truth_store)
    assert (store.dequantize() - ref_store).abs().max() <= ATOL
    assert int((peeked._handle.store.pos_map <= -2).sum()) >= 2 * L  # appended chunks were sealed
    ref_view = torch.cat([ref_store[:, :, :run], *peeked._dense], 2)
    q = torch.randn(1, H, 8, D, generator=gen)
    out = F.scaled_dot_product_attention(q, peeked, peeked)
    want = F.scaled_dot_product_attention(q, ref_view, ref_view)
    assert (out - want).abs().max() <= ATOL


def test_c_cloned_buffer_written_and_read_as_sinks_and_window():
    """Idiom C (LongLive): each step clones the cache, writes the new chunk into the clone, reads
    ``cat([sinks, window])`` of it, and the pipeline commits the chunk to the cache afterwards.
    The clone and the committed cache follow the reference; attention over the cat read equals
    SDPA over the reference values of the same tokens."""
    cache = QVGCache.empty((B, S, H, D), 1, CFG, dtype=torch.float32, dense_sinks=4, **BUDGET)
    truth = torch.zeros(B, S, H, D)
    gen = torch.Generator().manual_seed(8)
    window = 2 * L
    for c, x in enumerate(chunks(9)):
        s, e = c * L, (c + 1) * L
        work = cache.clone()
        work_truth = truth.clone()
        work[:, s:e] = x
        work_truth[:, s:e] = x
        lo = max(4, e - window)
        read = torch.cat([work[:, :4], work[:, lo:e]], 1)
        ref = reference_values(work, work_truth)
        ref_read = torch.cat([ref[:, :4], ref[:, lo:e]], 1)
        q = torch.randn(B, H, 8, D, generator=gen)
        out = F.scaled_dot_product_attention(q, read.transpose(1, 2), read.transpose(1, 2))
        want = F.scaled_dot_product_attention(q, ref_read.transpose(1, 2), ref_read.transpose(1, 2))
        assert (out - want).abs().max() <= ATOL
        cache[:, s:e] = x
        truth[:, s:e] = x
    check(cache, truth, 1)


def rope(x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Rotary embedding over ``[B, H, N, D]`` (halves rotated), positions from ``offset``."""
    n, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / 10000 ** (torch.arange(0, d // 2, dtype=torch.float32) / (d // 2))
    ang = torch.arange(offset, offset + n, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_e_rope_applied_to_the_whole_history_at_read():
    """Idiom E (LongCat-Video, LongLive): pre-RoPE keys are cached and the rotary embedding is
    applied to ``cat([cache, k_new])`` at every read. The products run on decoded values (a
    counted fallback until RoPE at read has its own path): the rotated history equals RoPE of
    the reference values."""
    gen = torch.Generator().manual_seed(10)
    parts = [torch.randn(1, H, L, D, generator=gen) for _ in range(4)]
    k = QVGCache.from_dense(torch.cat(parts[:3], 2), 2, CFG, **BUDGET)
    truth = torch.cat(parts[:3], 2)
    ref = reference_values(k, truth)
    got = rope(torch.cat([k, parts[3]], 2))
    want = rope(torch.cat([ref, parts[3]], 2))
    assert int((k._handle.store.pos_map <= -2).sum()) >= L  # history sealed
    assert (got - want).abs().max() <= 1e-4  # products of O(1) values, fp32


def test_g_positions_read_with_item_between_write_and_read():
    """Idiom G (Self-Forcing): the write position lives in a tensor and is read with ``.item()``
    between the compiled write and the compiled read (a graph break); the cache compiled this
    way (``aot_eager``: the ``qvg::cache_*`` ops in a traced graph) follows the reference."""
    cache = QVGCache.empty((B, S, H, D), 1, CFG, dtype=torch.float32, **BUDGET)
    truth = torch.zeros(B, S, H, D)
    gen = torch.Generator().manual_seed(11)

    def step(kc, x, pos, q):
        s = int(pos.item())
        kc[:, s:s + L] = x
        kv = kc[:, :s + L].transpose(1, 2)
        return F.scaled_dot_product_attention(q, kv, kv)

    compiled = torch.compile(step, backend="aot_eager")
    for c, x in enumerate(chunks(12)):
        q = torch.randn(B, H, 8, D, generator=gen)
        out = compiled(cache, x, torch.tensor(c * L), q)
        truth[:, c * L:(c + 1) * L] = x
        ref = reference_values(cache, truth)[:, :(c + 1) * L].transpose(1, 2)
        assert (out - F.scaled_dot_product_attention(q, ref, ref)).abs().max() <= ATOL
    check(cache, truth, 1)


def test_i_produced_cache_fed_back_in_tuples():
    """Idiom I (LongCat-Video's own pipeline): a cache pass returns ``{layer: (k, v)}``, the
    caller compresses it once and feeds it back; every later call reads ``cat([k, k_new])``.
    The compressed tuples follow the reference (keys and values with their roles' codes), and
    attention over the cat reads equals SDPA over the reference values."""
    gen = torch.Generator().manual_seed(13)
    k0 = torch.randn(1, H, 3 * L, D, generator=gen)
    v0 = torch.randn(1, H, 3 * L, D, generator=gen)
    caches = compress({0: (k0.clone(), v0.clone())}, CFG, seq_dim=2, **BUDGET)
    kc, vc = caches[0]
    assert isinstance(kc, QVGCache) and isinstance(vc, QVGCache)
    assert (kc._handle.spec.roles, vc._handle.spec.roles) == (("key",), ("value",))
    assert kc.token_counts()["sealed"] == vc.token_counts()["sealed"] == 2 * L  # the last chunk stays dense
    kref, vref = reference_values(kc, k0), reference_values(vc, v0)
    for _ in range(2):  # two later calls, each with its own new chunk
        kn, vn = torch.randn(1, H, L, D, generator=gen), torch.randn(1, H, L, D, generator=gen)
        q = torch.randn(1, H, 8, D, generator=gen)
        out = F.scaled_dot_product_attention(q, torch.cat([kc, kn], 2), torch.cat([vc, vn], 2))
        want = F.scaled_dot_product_attention(q, torch.cat([kref, kn], 2), torch.cat([vref, vn], 2))
        assert (out - want).abs().max() <= ATOL
    assert (kc.dequantize() - kref).abs().max() <= ATOL and (vc.dequantize() - vref).abs().max() <= ATOL
