"""qvg_backend end to end on the tiny AR video model: the compiled model computes what the eager
model computes with the same quantization, the dense caches are freed, compiles are bounded."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import qvg_compile
from qvg_compile import QVGCache, QVGConfig
from qvg_compile.tiny.model import TinyVideoModel, allocate_cache, generate

CFG = QVGConfig.preset("qvg", centroids=32, kmeans_iters=2)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def model():
    torch.manual_seed(0)
    return TinyVideoModel().eval()


def test_compiled_equals_eager_with_the_same_quantization():
    m = model()
    eager_cache = qvg_compile.compress(allocate_cache(m, 6), CFG)
    expected = generate(m, 3, seed=1, cache=eager_cache, progress=False)
    qvg = qvg_compile.backend(CFG)
    cache = allocate_cache(m, 6)
    got = generate(torch.compile(m, backend=qvg), 3, seed=1, cache=cache, progress=False)
    assert (got - expected).abs().max() <= 1e-5
    assert all(isinstance(layer[name], QVGCache) for layer in cache for name in ("k", "v"))
    dense = generate(m, 3, seed=1, progress=False)
    assert (got - dense).abs().max() > 1e-4  # the cache really was quantized


def test_dense_buffers_are_freed_and_sites_reported():
    m = model()
    cache = allocate_cache(m, 4)
    refs = [weakref.ref(layer["k"]) for layer in cache]
    qvg = qvg_compile.backend(CFG)
    generate(torch.compile(m, backend=qvg), 2, cache=cache, progress=False)
    gc.collect()
    assert all(r() is None for r in refs)
    sources = {s.source for s in qvg.report.sites}
    assert len(sources) == 2 * m.cfg.layers
    assert {i for s in qvg.report.sites for i in s.idioms} == {"A"}
    assert sum(len(g.swapped) for g in qvg.report.graphs) == 2 * m.cfg.layers


def test_compile_count_is_bounded_over_a_long_video():
    m = model()
    qvg = qvg_compile.backend(CFG)
    generate(torch.compile(m, backend=qvg), 6, progress=False)
    graphs_after_six = len(qvg.report.graphs)
    generate(torch.compile(m, backend=qvg), 6, progress=False)
    assert len(qvg.report.graphs) == graphs_after_six


def test_model_without_cache_is_left_alone():
    lin = torch.nn.Linear(8, 8)
    qvg = qvg_compile.backend(CFG)
    x = torch.randn(2, 8)
    torch.testing.assert_close(torch.compile(lin, backend=qvg)(x), lin(x))
    assert qvg.report.sites == []


def test_explain_reports_without_side_effects():
    m = model()
    cache = allocate_cache(m, 2 * m.cfg.frames_per_chunk)
    x = torch.randn(1, m.cfg.frames_per_chunk, 3, m.cfg.size, m.cfg.size)
    report = qvg_compile.explain(m, x, torch.ones(1), cache, 0, config=CFG)
    assert all(type(layer["k"]) is torch.Tensor for layer in cache)
    assert len({s.source for s in report.sites}) == 2 * m.cfg.layers
    text = report.summary()
    assert "cache (source)" in text and "idiom" in text
    assert report.to_dict()["graphs"]


def test_explain_on_model_without_cache_says_so():
    report = qvg_compile.explain(torch.nn.Linear(4, 4), torch.randn(1, 4))
    assert "No KV cache found" in report.summary()


def test_patch_compiles_attention_regions_and_undo_restores():
    m = model()
    handle = qvg_compile.patch(m, config=CFG)
    assert handle.modules == ["blocks.0", "blocks.1"]
    cache = allocate_cache(m, 2)
    generate(m, 1, cache=cache, progress=False)
    assert isinstance(cache[0]["k"], QVGCache)
    handle.undo()
    assert "forward" not in m.blocks[0].__dict__


def test_backend_registered_by_name_and_config_errors():
    assert "qvg" in torch._dynamo.list_backends()
    with pytest.raises(ValueError, match="key_bits"):
        qvg_compile.backend(bits=5)
    with pytest.raises(TypeError, match="config"):
        qvg_compile.QVGBackend(config={"bits": 2})
