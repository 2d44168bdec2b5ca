"""LongCat reference model (examples/models/longcat.py), driven as LongCat-Video's pipeline drives
its DiT (cache pass returning ``{layer: (k, v)}``, ``kv_cache_dict=`` on every CFG call, attention
behind compiler-disabled all-to-alls): eager shapes and determinism, and the QVG backend on it:
the pre-RoPE K/V of the cache pass are found across the disabled call (idioms D, K, E), moved into
QVGCache in the pipeline's own dict, RoPE over the history is applied by the read (no fallback),
the queries' padding is dropped at every length (no rotated view of padded queries),
the compiled loop equals the eager loop run on caches
compressed the same way (max abs diff <= 1e-5, fp32) once the backend has seen one cached read,
with and without offload and CFG batch repeat, and the steady-state cost of a cached token is
>= 6.5x below BF16."""


from collections.abc import Callable

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

import qvg_compile
from qvg_compile import QVGCache

from example_models import (CFG, TOL, compress_seq2, fresh_dynamo, last_steady_cache,  # noqa: F401
    seeded, steady_state_ratio)
from graph_counting import graphs_compiled
from examples.models import longcat as lc


def make(**overrides):
    return seeded(lc.LongCatModel, lc.tiny_config(**overrides))


compress = compress_seq2


def test_eager_shapes_determinism_and_cache_pass():
    m = make()
    cfg = m.config
    caches = {}
    a = lc.generate(m, 3, seed=3, progress=False, on_chunk=lambda i, kv: caches.__setitem__(i, kv))
    assert a.shape == (1, 16, 6, cfg.latent_height, cfg.latent_width) and torch.isfinite(a).all()
    assert torch.equal(a, lc.generate(m, 3, seed=3, progress=False))
    assert not torch.allclose(a, lc.generate(m, 3, seed=4, progress=False))
    assert caches[0] is None
    # The cache pass re-encodes the whole history at batch 1: {layer: ([B, H, frames * tokens, D],) * 2}.
    assert sorted(caches[2]) == [0, 1]
    assert [tuple(k.shape) for k, _ in caches[2].values()] == [(1, 2, 4 * cfg.frame_tokens, 64)] * 2
    assert all(k.is_contiguous() and v.is_contiguous() for k, v in caches[2].values())
    # Offloading only moves the cache; on one device the result is the same.
    assert torch.equal(a, lc.generate(m, 3, seed=3, progress=False, offload_kv=True))
    window = make(cond_frames=2)
    kept = {}
    lc.generate(window, 3, seed=3, progress=False, on_chunk=lambda i, kv: kept.__setitem__(i, kv))
    assert kept[2][0][0].shape[2] == 2 * cfg.frame_tokens
    # Without guidance the denoising forwards run at the cache's batch (no repeat).
    plain = lc.generate(make(guidance_scale=1.0), 2, seed=3, progress=False)
    assert plain.shape == (1, 16, 4, cfg.latent_height, cfg.latent_width) and torch.isfinite(plain).all()
    with pytest.raises(ValueError, match="kv_cache: expected K and V at batch 1 or 2"):
        kv = {i: (torch.zeros(3, 2, 16, 64),) * 2 for i in range(2)}
        m(torch.zeros(2, 16, 2, 4, 4), torch.zeros(2), torch.zeros(2, 1, 8, 24), num_cond_latents=1, kv_cache_dict=kv)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_heads"):
        lc.tiny_config(num_heads=3)
    with pytest.raises(ValueError, match="context"):
        lc.generate(make(), 1, seed=0, context=torch.zeros(1, 8, 5), progress=False)


@pytest.mark.parametrize("offload_kv,guidance", [(False, 4.0), (True, 4.0), (False, 1.0)])
def test_compiled_equals_eager_with_the_same_quantization(offload_kv, guidance):
    # The cat and RoPE of the cache run in one graph, the attention after the compiler-disabled
    # all-to-all in the next (idiom K): the first cached denoising call shows the backend the
    # cache and reads it in BF16; every later call, and every later video, reads QVG.
    m = make(guidance_scale=guidance)
    expected = lc.generate(m, 3, seed=1, offload_kv=offload_kv, progress=False, cache_hook=compress)
    qvg = qvg_compile.backend(CFG)
    compiled = torch.compile(m, backend=qvg)
    qvg_compile.reset_stats()
    first = {}
    learning = lc.generate(compiled, 3, seed=1, offload_kv=offload_kv, progress=False,
                           on_chunk=lambda i, kv: first.__setitem__(i, kv))
    assert (learning[:, :, :2] - expected[:, :, :2]).abs().max().item() <= TOL  # chunk 0 has no cache
    assert all(isinstance(t, QVGCache) for layer in first[2].values() for t in layer)
    caches = {}
    got = lc.generate(compiled, 3, seed=1, offload_kv=offload_kv, progress=False,
                      on_chunk=lambda i, kv: caches.__setitem__(i, kv))
    assert (got - expected).abs().max().item() <= TOL
    assert all(isinstance(t, QVGCache) for i in (1, 2) for layer in caches[i].values() for t in layer)
    # RoPE over the cached keys is applied at read (passes/rope_read.py): nothing falls back to a
    # decoded copy, and every cached read is a compressed one.
    stats = qvg_compile.stats()
    assert stats["fallback_total"] == 0 and stats["fast_reads"] > 0, stats["fallbacks"]
    assert any("RoPE" in line and "applied at read" in line for g in qvg.report.graphs for line in g.rewrites)
    # The queries' padding is dropped in every graph, also once the cache's length is symbolic
    # (passes/pad_slice.py): only the keys' RoPE is applied at read, so no rotated view of padded
    # queries reaches attention (torch 2.11's Dynamo could not guard on one; before 2.13 its RoPE
    # would be a fallback).
    for g in qvg.report.graphs:
        rope = [line for line in g.rewrites if "applied at read" in line]
        assert len(rope) <= 1 and (not rope or any("queries padded" in line for line in g.rewrites)), g.rewrites
    # (The attention graphs also list the appended values they get as QVGCache, at ``___stack``.)
    sources = {s.source: s for s in qvg.report.sites if "___stack" not in s.source}
    assert set(sources) == {"L['kv_cache'][0]", "L['kv_cache'][1]"}
    for name, site in sources.items():
        assert site.seq_dim == 2 and {"D", "K"} <= set(site.idioms)
        assert site.roles == (["key"] if name.endswith("[0]") else ["value"])
        assert ("E" in site.idioms) == name.endswith("[0]")  # RoPE over the whole key sequence
    dense = lc.generate(m, 3, seed=1, progress=False)
    assert (got - dense).abs().max().item() > 1e-4


def test_steady_state_kv_bytes_are_6_5x_below_bf16():
    # Steady state = the bytes each further chunk of history adds to the cache. The cache pass's
    # caches are sealed whole by from_dense, with codebooks sized by the policy's bit budget; at
    # this toy length (<= 224 tokens) the default budget (0.25 bit) plus its spare codebook slot
    # cost 0.5 bit per element (5.8x), while at real lengths C saturates at 256 and the cost
    # falls to ~0.2 bit (`STEADY_POLICY`).
    config = lc.tiny_config(num_layers=1, dim=1024, num_heads=8, latent_height=8, latent_width=8, num_steps=1)
    marginal, whole = steady_state_ratio(
        lc.LongCatModel, config,
        lambda m, n: [t for layer in last_steady_cache(lc.generate, m, n).values() for t in layer])
    assert marginal >= 6.5, (marginal, whole)


def test_compiles_one_graph_more_than_inductor_however_deep():
    """Driven the real way (2 videos of 3 chunks, CFG), the backend compiles Inductor's graphs
    plus one, however deep the model: the first cached chunk's caches become QVGCache at their
    first read (idiom K's pending swap; the layers already past are swapped with the one read),
    every later cache pass's dense caches are swapped in the pipeline's dict by the first graph
    that runs while a frame holds it (`swap._PLACES`), before a frame reads them, every one is
    marked growing, and so are the RoPE tables of a rotated view made eagerly. Over Inductor: the
    attention and block frames compiled again over QVGCache in chunk 1; under it: the block
    frame's recompile for the cache's new length in chunk 2, already symbolic. Swapped one layer
    at a time and at every chunk's first read, 2 and 3 layers compiled 43 graphs (Inductor: 36)."""
    def run(layers: int) -> Callable[[Callable], None]:
        def drive(backend: Callable) -> None:
            compiled = torch.compile(make(num_layers=layers), backend=backend)
            for _ in range(2):
                lc.generate(compiled, 3, seed=1, progress=False)
        return drive

    dense = graphs_compiled(run(2), compile_fx)
    qvg_compile.reset_stats()
    qvg = graphs_compiled(run(2), qvg_compile.backend(CFG))
    assert qvg_compile.stats()["fallback_total"] == 0
    deeper = graphs_compiled(run(3), qvg_compile.backend(CFG))
    assert (dense, qvg, deeper) == (36, 37, 37)
