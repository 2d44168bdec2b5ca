"""Self-Forcing reference model (examples/models/self_forcing.py): eager shapes and determinism,
and the QVG backend on it: every self-attention K/V buffer becomes a QVGCache, the text cache is
left alone, the compiled loop equals the eager loop run on caches compressed the same way
(max abs diff <= 1e-5, fp32), and the steady-state cost of a cached token is >= 6.5x below BF16."""


import pytest
import torch
from torch._inductor.compile_fx import compile_fx

import qvg_compile
from qvg_compile import QVGCache

from graph_counting import graphs_compiled

from example_models import CFG, TOL, fresh_dynamo, seeded, switch_seal_ahead  # noqa: F401
from examples.models import self_forcing as sf


def make(**overrides):
    return seeded(sf.SelfForcingModel, sf.tiny_config(**overrides))


def compressed_cache(model, frames=None):
    """The pipeline's cache with K/V buffers converted as the backend converts them."""
    kv = sf.init_kv_cache(model, 1, frames)
    return qvg_compile.compress(kv, CFG, seq_dim=1, select=lambda path, t: path[-5:] in ("['k']", "['v']"))


def test_eager_shapes_determinism_and_cache_writes():
    m = make()
    cfg = m.config
    kv = sf.init_kv_cache(m, 1, 6)
    a = sf.generate(m, 2, seed=3, progress=False, kv_cache=kv)
    assert a.shape == (1, 16, 6, cfg.latent_height, cfg.latent_width) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, sf.generate(m, 2, seed=3, progress=False))
    assert not torch.allclose(a, sf.generate(m, 2, seed=4, progress=False))
    # The clean pass of the last chunk filled every slot and advanced both indices.
    assert all(layer["k"].abs().sum(dim=(0, 2, 3)).gt(0).all() for layer in kv)
    assert int(kv[0]["global_end_index"]) == int(kv[0]["local_end_index"]) == 6 * cfg.frame_tokens


def test_rolling_window_keeps_sinks_and_capacity():
    m = make(local_attn_size=5, sink_size=1)
    kv = sf.init_kv_cache(m, 1)
    sinks = []
    sf.generate(m, 3, seed=1, progress=False, kv_cache=kv,
                on_chunk=lambda i, c: sinks.append(c[0]["k"][:, :4].clone()))
    assert kv[0]["k"].shape[1] == 5 * m.config.frame_tokens
    assert int(kv[0]["global_end_index"]) == 9 * m.config.frame_tokens
    assert int(kv[0]["local_end_index"]) == 5 * m.config.frame_tokens
    assert torch.equal(sinks[0], sinks[-1])  # the sink frame is never evicted


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="local_attn_size"):
        sf.tiny_config(local_attn_size=2, sink_size=1)
    with pytest.raises(TypeError, match="num_chunks"):
        sf.generate(make(), 1.5, seed=0)
    with pytest.raises(ValueError, match="max_frames"):
        sf.init_kv_cache(make(), 1)


@pytest.mark.parametrize("window", [None, (5, 1)], ids=["global", "rolling_sink"])
def test_compiled_equals_eager_with_the_same_quantization(window):
    overrides = {} if window is None else {"local_attn_size": window[0], "sink_size": window[1]}
    m = make(**overrides)
    frames = None if window else 9
    expected = sf.generate(m, 3, seed=1, progress=False, kv_cache=compressed_cache(m, frames))
    qvg = qvg_compile.backend(CFG)
    kv, ca = sf.init_kv_cache(m, 1, frames), sf.init_crossattn_cache(m, 1)
    got = sf.generate(torch.compile(m, backend=qvg), 3, seed=1, progress=False, kv_cache=kv, crossattn_cache=ca)
    assert (got - expected).abs().max().item() <= TOL
    # Every layer's K and V buffer was found and moved; the text K/V were not.
    assert all(isinstance(layer[name], QVGCache) for layer in kv for name in ("k", "v"))
    assert all(type(layer[name]) is torch.Tensor for layer in ca for name in ("k", "v"))
    sites = qvg.report.sites
    assert {(s.source, tuple(s.roles)) for s in sites} == {
        ("L['kv_cache']['k']", ("key",)), ("L['kv_cache']['v']", ("value",))}
    assert all("A" in s.idioms for s in sites)
    if window:
        assert any("B" in s.idioms for s in sites)
    rejected = {r.source for g in qvg.report.graphs for r in g.rejected}
    assert {"L['crossattn_cache']['k']", "L['crossattn_cache']['v']"} <= rejected
    # Every graph over the caches takes their inner tensors (no per-call unwrapping).
    flat = [g.flat_inputs for g in qvg.report.graphs if g.inputs_are_caches]
    assert flat and all(f == "yes" for f in flat), flat
    dense = sf.generate(m, 3, seed=1, progress=False, max_frames=frames)
    assert (got - dense).abs().max().item() > 1e-4  # the cache really was quantized


@pytest.mark.parametrize("window", [None, (5, 1)], ids=["global", "rolling_sink"])
def test_a_whole_video_compiles_the_graphs_bf16_compiles(window):
    """8 chunks (4 denoising writes and a clean pass each). The model's own code already costs
    Inductor 15 graphs on the BF16 cache (global window) (``.item()`` graph breaks, the first chunk's constants
    made dynamic at the second). The QVG backend adds at most two: the frames that first saw the
    dense cache the backend swapped out recompile once for `QVGCache` (measured: exactly two,
    the attention block and the self-attention; everything after reuses the graphs). Every cache
    read is served compressed."""
    overrides = {} if window is None else {"local_attn_size": window[0], "sink_size": window[1]}
    frames = None if window else 24

    def run(backend) -> None:
        m = make(num_layers=1, **overrides)
        sf.generate(torch.compile(m, backend=backend), 8, seed=1, progress=False, max_frames=frames)

    dense = graphs_compiled(run, compile_fx)
    qvg_compile.reset_stats()
    qvg = graphs_compiled(run, qvg_compile.backend(CFG))
    assert dense < qvg <= dense + 2, (qvg, dense)
    assert qvg_compile.stats()["fallback_total"] == 0 and qvg_compile.stats()["seals"] > 0


def steady_state_ratio(chunks):
    """BF16 bytes over QVG bytes of the K/V caches at the end of videos of ``chunks`` chunks."""
    held, bf16 = [], []
    for n in chunks:
        torch.manual_seed(0)
        m = sf.SelfForcingModel(sf.tiny_config(num_layers=1, dim=1024, num_heads=8, latent_height=8,
                                               latent_width=8)).to(torch.bfloat16).eval()
        kv = compressed_cache(m, 3 * n)
        sf.generate(m, n, seed=1, progress=False, kv_cache=kv)
        caches = [layer[name] for layer in kv for name in ("k", "v")]
        held.append(sum(c.nbytes() for c in caches))
        bf16.append(sum(c.numel() * 2 for c in caches))
    return (bf16[1] - bf16[0]) / (held[1] - held[0]), bf16[1] / held[1]


def test_steady_state_kv_bytes_are_6_5x_below_bf16():
    # Steady state = the bytes each further chunk of history adds (the open BF16 chunk and the
    # token-state arrays are a fixed cost that long videos amortise).
    marginal, whole = steady_state_ratio((4, 8))
    assert marginal >= 6.5, (marginal, whole)
    assert whole > 3.0


@pytest.mark.parametrize("window", [None, (5, 1)], ids=["global", "rolling_sink"])
def test_seal_ahead_leaves_the_video_bit_equal(window, monkeypatch):
    """The pipeline's loop (layer after layer, 4 denoising forwards and a clean one per chunk) on
    compressed caches, with `cache.seal_ahead` and without: the same video, bit for bit. With a
    global cache later layers' seals are opened ahead; a rolling window's writes find a free slot
    after the roll, so nothing is opened there."""
    from qvg_compile.cache import stats

    overrides = {} if window is None else {"local_attn_size": window[0], "sink_size": window[1]}
    videos, opened = [], []
    for switch in ("off", "on"):
        switch_seal_ahead(monkeypatch, switch)
        m = make(**overrides)
        videos.append(sf.generate(m, 6, seed=1, progress=False, kv_cache=compressed_cache(m, None if window else 21)))
        opened.append(stats().get("seals_ahead", 0))
    assert torch.equal(*videos)
    assert opened[0] == 0
    assert (opened[1] > 0) == (window is None)
