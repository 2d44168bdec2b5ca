"""HY-WorldPlay reference model (examples/models/worldplay.py): eager shapes and determinism for
both positional layouts, and the QVG backend on it: every layer's K and V cache (returned by the
cache pass, appended by the pipeline, concatenated after the text K/V at read) is found and moved
into QVGCache."""


import pytest
import torch
from torch._inductor.compile_fx import compile_fx

import qvg_compile
from qvg_compile import QVGCache

from graph_counting import graphs_compiled

from example_models import CFG, TOL, compress_seq2, last_steady_cache, seeded, steady_state_ratio
from examples.models import worldplay as wp

def make(**overrides):
    return seeded(wp.WorldPlayModel, wp.tiny_config(**overrides))


compress = compress_seq2


@pytest.fixture(scope="module")
def compiled_run():
    torch._dynamo.reset()
    m = make()
    expected = wp.generate(m, 3, seed=1, progress=False, cache_hook=compress)
    qvg = qvg_compile.backend(CFG)
    caches = {}
    got = wp.generate(torch.compile(m, backend=qvg), 3, seed=1, progress=False,
                      on_chunk=lambda i, kv: caches.__setitem__(i, kv))
    torch._dynamo.reset()
    return got, expected, caches, qvg.report


@pytest.mark.parametrize("layout", ["batch", "head_dim"])
def test_eager_shapes_determinism_and_cache_layout(layout):
    m = make(pos_layout=layout)
    cfg = m.config
    caches = {}
    a = wp.generate(m, 3, seed=3, progress=False, on_chunk=lambda i, kv: caches.__setitem__(i, kv))
    assert a.shape == (1, 16, 6, cfg.latent_height, cfg.latent_width) and torch.isfinite(a).all()
    assert torch.equal(a, wp.generate(m, 3, seed=3, progress=False))
    assert not torch.allclose(a, wp.generate(m, 3, seed=4, progress=False))
    n = 6 * cfg.frame_tokens
    k_shape = (2, 2, n, 64) if layout == "batch" else (1, 2, n, 128)
    assert all(tuple(layer["k"].shape) == k_shape and tuple(layer["v"].shape) == (1, 2, n, 64)
               for layer in caches[2])
    # The two variants differ (the camera path is not the frame index).
    k = caches[2][0]["k"]
    first, second = (k[0], k[1]) if layout == "batch" else (k[..., :64], k[..., 64:])
    assert (first - second).abs().max() > 1e-3
    bounded = make(pos_layout=layout, memory_frames=3)
    kept = {}
    wp.generate(bounded, 3, seed=3, progress=False, on_chunk=lambda i, kv: kept.__setitem__(i, kv))
    assert kept[2][0]["v"].shape[2] == 3 * cfg.frame_tokens


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="pos_layout"):
        wp.tiny_config(pos_layout="channels")
    with pytest.raises(ValueError, match="poses"):
        wp.generate(make(), 1, seed=0, poses=torch.zeros(3, 3), progress=False)


def test_backend_finds_and_moves_every_self_attention_cache(compiled_run):
    _, _, caches, report = compiled_run
    assert all(isinstance(layer[name], QVGCache) for i in (1, 2) for layer in caches[i] for name in ("k", "v"))
    sources = {s.source: s for s in report.sites}
    for i in range(2):
        for name, role in (("k", "key"), ("v", "value")):
            site = sources[f"L['kv_cache'][{i}]['{name}']"]
            assert site.roles == [role] and site.seq_dim == 2 and "D" in site.idioms


def test_backend_leaves_the_text_kv_alone(compiled_run):
    _, _, _, report = compiled_run
    assert not [s.source for s in report.sites if s.source.startswith("L['text_kv']")]


def test_compiled_equals_eager_with_the_same_quantization(compiled_run):
    got, expected, _, _ = compiled_run
    assert (got - expected).abs().max().item() <= TOL


def test_steady_state_kv_bytes_are_6_5x_below_bf16():
    # Same knobs as the LongCat test (read-only history, toy-length codebook amortisation).
    config = wp.tiny_config(num_layers=1, dim=1024, num_heads=8, latent_height=4, latent_width=4, num_steps=1)
    marginal, _ = steady_state_ratio(
        wp.WorldPlayModel, config,
        lambda m, n: [layer[name] for layer in last_steady_cache(wp.generate, m, n) for name in ("k", "v")])
    assert marginal >= 6.5


def test_pipeline_graphs_settle_like_bf16_and_stay_under_the_recompile_limit():
    """5 chunks: no cache, the dense cache the backend swaps, then caches grown by cat and fed
    back (denoising reads, cache pass returns). BF16 Inductor settles at 6 graphs; QVG may add one
    (the swapped-in cache has no appended piece yet), and its grown caches are symbolic in their
    length from the first graph that reads them (no static-then-dynamic pair)."""
    def run(backend) -> None:
        wp.generate(torch.compile(make(num_layers=1), backend=backend), 5, seed=2, progress=False)

    dense = graphs_compiled(run, compile_fx)
    qvg_compile.reset_stats()
    qvg = graphs_compiled(run, qvg_compile.backend(CFG))
    assert dense <= 6 and qvg <= dense + 1 < torch._dynamo.config.recompile_limit
    # Every read of the grown caches went to the compressed attention (K and V appended pieces
    # are sized by symbols of their own; the graphs guard on their equality).
    assert qvg_compile.stats()["fallback_total"] == 0 and qvg_compile.stats()["attention_calls"] > 0


# --- HY-WorldPlay's own rollout: attention in compiler-disabled functions (issue #23) ----------
def make_ar(**overrides):
    torch.manual_seed(0)
    return wp.WorldPlayAR(wp.tiny_config(**({"num_layers": 1, "memory_frames": 4} | overrides))).eval()


@pytest.fixture(scope="module")
def ar_run():
    """The real rollout's convention, eager on caches compressed where the pipeline rebinds its
    lists, and compiled with the backend (no hook): 3 chunks, CFG, text and vision caches."""
    m = make_ar()
    qvg_compile.reset_stats()
    expected = wp.rollout(m, 3, seed=1, progress=False, cache_hook=compress)
    eager_fallbacks = qvg_compile.stats()["fallback_total"]
    torch._dynamo.reset()
    qvg_compile.reset_stats()
    qvg = qvg_compile.backend(CFG)
    caches = {}
    got = wp.rollout(torch.compile(m, backend=qvg), 3, seed=1, progress=False,
                     on_chunk=lambda i, kv: caches.__setitem__(i, kv))
    stats = qvg_compile.stats()
    torch._dynamo.reset()
    return got, expected, caches, qvg.report, stats, eager_fallbacks


def test_ar_rollout_eager_is_deterministic_and_keeps_the_real_cache_layout():
    m = make_ar()
    seen = {}
    a = wp.rollout(m, 2, seed=3, progress=False, on_chunk=lambda i, kv: seen.__setitem__(i, kv))
    assert a.shape == (1, 16, 4, 2, 2) and torch.isfinite(a).all()
    assert torch.equal(a, wp.rollout(m, 2, seed=3, progress=False))
    layer = seen[1][0][0]
    assert set(layer) == set(wp.CACHE_NAMES)
    assert tuple(layer["k_txt"].shape) == (1, 2, 8, 64) and tuple(layer["k_vision"].shape) == (2, 2, 8, 64)
    assert seen[0][1][0]["k_vision"] is None and seen[1][0] is not seen[0][0]  # rebound lists


def test_ar_rollout_compiled_replaces_every_cache_of_both_branches(ar_run):
    got, expected, caches, report, stats, eager_fallbacks = ar_run
    for branch in caches[2]:
        for name in wp.CACHE_NAMES:
            cache = branch[0][name]
            assert isinstance(cache, QVGCache)
            assert cache._handle.spec.roles == (("value",) if name.startswith("v_") else ("key",))
    assert stats["fallback_total"] == 0 and eager_fallbacks == 0
    assert {s.idioms[0] for s in report.sites} == {"L"} and len({s.source for s in report.sites}) == 4
    assert "attention_vision" in report.summary() and "replaced by QVGCache" in report.summary()
    # fp32: the compiled rollout computes what eager computes on the same compressed caches.
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4


def test_backend_roles_option_is_validated():
    with pytest.raises(ValueError, match="roles"):
        qvg_compile.backend(CFG, roles={"k_txt": "keys"})
    with pytest.raises(TypeError, match="roles"):
        qvg_compile.backend(CFG, roles=["k_txt"])


def test_ar_rollout_compiles_the_graphs_inductor_compiles_however_deep():
    """Caches made inside the compiler-disabled attention are swapped for every layer at once and
    where they are returned: the compiled frames see each cache change type once, so the backend
    compiles what Inductor compiles (swapped layer by layer and at first read, 4 layers over 4
    chunks compiled 19 graphs against Inductor's 17, and two frames reached Dynamo's recompile
    limit: they ran eagerly from then on)."""
    def run(backend) -> None:
        wp.rollout(torch.compile(make_ar(num_layers=3), backend=backend), 3, seed=1, progress=False)

    dense = graphs_compiled(run, compile_fx)
    qvg_compile.reset_stats()
    qvg = graphs_compiled(run, qvg_compile.backend(CFG))
    assert qvg == dense
    assert qvg_compile.stats()["fallback_total"] == 0
