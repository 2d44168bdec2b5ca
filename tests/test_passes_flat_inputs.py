"""`flatten_cache_inputs`: a graph over `QVGCache` inputs rewritten to take their inner tensors
computes what the graph computes; graphs that return a cache, or take one of symbolic length,
keep their cache inputs (and still equal eager); the ``QVG_FLAT_INPUTS`` switch; through the
backend, compiled calls never unwrap a cache beyond Dynamo's guards and write the same codes as
Inductor's own unwrapping."""

import pytest
import torch

import qvg_compile
from qvg_compile import QVGCache, QVGConfig
from qvg_compile.passes.flat_inputs import FlatCall, UnflattenCache, flatten_cache_inputs

H, D, CHUNK = 2, 64, 32
N = 4 * CHUNK


def qvg(role, seed=0):
    torch.manual_seed(seed)
    return QVGCache.empty((1, N, H, D), 1, QVGConfig.preset("qvg"), role=role, dtype=torch.float32,
                          chunk_tokens=CHUNK)


def step(kb, vb, q, k, v, s: int, e: int):
    kb[:, s:e] = k
    vb[:, s:e] = v
    return torch.nn.functional.scaled_dot_product_attention(q, kb[:, :e].transpose(1, 2), vb[:, :e].transpose(1, 2))


def returns_cache(kb, k):
    kb[:, :CHUNK] = k
    return kb


def captured(fn, *args):
    """The graph and example inputs Dynamo hands a backend for ``fn(*args)``."""
    seen = []

    def backend(gm, inputs):
        seen.append((gm, list(inputs)))
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    assert len(seen) == 1
    return seen[0]


def chunk(i, seed=1):
    gen = torch.Generator().manual_seed(seed + i)
    q = torch.randn(1, H, CHUNK, D, generator=gen)
    k = torch.randn(1, CHUNK, H, D, generator=gen)
    return q, k, torch.randn(1, CHUNK, H, D, generator=gen)


def test_rewritten_graph_takes_inner_tensors_and_computes_the_same():
    kb, vb = qvg("key"), qvg("value")
    gm, inputs = captured(step, kb, vb, *chunk(0), 0, CHUNK)
    flat, why = flatten_cache_inputs(gm, inputs)
    assert why == "" and flat is not None
    flat_gm, flat_inputs, wrap = flat
    placeholders = [n for n in flat_gm.graph.nodes if n.op == "placeholder"]
    inner = len(kb.__tensor_flatten__()[0])
    # Each cache is its inner tensors; q, k, v stay (s and e are constants on a first trace).
    assert len(placeholders) == len(flat_inputs) == 2 * inner + 3
    assert not any(isinstance(x, QVGCache) for x in flat_inputs)
    assert sum(isinstance(m, UnflattenCache) for m in flat_gm.modules()) == 2
    # The same call on two copies of the caches: the graph on the caches, the rewritten one on
    # their inner tensors (eagerly, through `FlatCall`); outputs and stored codes bit-equal.
    copies = {id(x): x.snapshot({}) for x in inputs if isinstance(x, QVGCache)}
    want = gm(*inputs)
    call = wrap(flat_gm)
    assert isinstance(call, FlatCall)
    got = call(*[copies.get(id(x), x) for x in inputs])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for x in inputs:
        if isinstance(x, QVGCache):
            assert torch.equal(copies[id(x)].dequantize(), x.dequantize())


def test_graph_returning_a_cache_keeps_its_cache_inputs():
    kb = qvg("key")
    gm, inputs = captured(returns_cache, kb, torch.randn(1, CHUNK, H, D))
    flat, why = flatten_cache_inputs(gm, inputs)
    assert flat is None and why.startswith("the graph returns a cache")


def test_switch_leaves_graphs_to_aotautograd_and_checks_its_value(monkeypatch):
    kb, vb = qvg("key"), qvg("value")
    gm, inputs = captured(step, kb, vb, *chunk(0), 0, CHUNK)
    monkeypatch.setenv("QVG_FLAT_INPUTS", "0")
    assert flatten_cache_inputs(gm, inputs) == (None, "QVG_FLAT_INPUTS=0")
    monkeypatch.setenv("QVG_FLAT_INPUTS", "yes")
    with pytest.raises(ValueError, match="QVG_FLAT_INPUTS: expected 0 or 1"):
        flatten_cache_inputs(gm, inputs)


def test_backend_raises_on_a_bad_switch_instead_of_running_eagerly(monkeypatch):
    torch._dynamo.reset()
    fn = torch.compile(step, backend=qvg_compile.backend())
    kb, vb = qvg("key"), qvg("value")
    monkeypatch.setenv("QVG_FLAT_INPUTS", "on")
    with pytest.raises(Exception, match="QVG_FLAT_INPUTS: expected 0 or 1, got 'on'"):
        fn(kb, vb, *chunk(0), 0, CHUNK)
    torch._dynamo.reset()


def test_graph_without_caches_is_not_rewritten():
    gm, inputs = captured(lambda x: x * 2, torch.randn(3))
    assert flatten_cache_inputs(gm, inputs) == (None, "no cache input")


def test_backend_flattens_and_matches_inductors_own_unwrapping(monkeypatch):
    """Four chunks of five passes (a seal at each chunk's first write) through the backend and
    through plain Inductor (AOTAutograd unwraps the caches): same outputs and codes at every step,
    every cache graph flattened, and a compiled call reads each cache's flatten only for Dynamo's
    two guards on it (AOTAutograd on torch < 2.13 adds one more per cache)."""
    torch._dynamo.reset()
    backend = qvg_compile.backend()
    runs = {"qvg": (torch.compile(step, backend=backend), qvg("key"), qvg("value")),
            "inductor": (torch.compile(step), qvg("key"), qvg("value"))}
    for c in range(4):
        for p in range(5):
            q, k, v = chunk(10 * c + p)
            outs = [fn(kb, vb, q, k, v, c * CHUNK, (c + 1) * CHUNK) for fn, kb, vb in runs.values()]
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    (_, kb, vb), (_, kb2, vb2) = runs.values()
    assert torch.equal(kb.dequantize(), kb2.dequantize()) and torch.equal(vb.dequantize(), vb2.dequantize())
    graphs = [g for g in backend.report.graphs if g.inputs_are_caches]
    assert graphs and all(g.flat_inputs == "yes" for g in graphs)
    calls = []
    flatten = QVGCache.__tensor_flatten__
    monkeypatch.setattr(QVGCache, "__tensor_flatten__", lambda self: calls.append(1) or flatten(self))
    fn = runs["qvg"][0]
    q, k, v = chunk(99)
    for _ in range(3):
        fn(kb, vb, q, k, v, 3 * CHUNK, 4 * CHUNK)
    assert len(calls) == 3 * 2 * 2
    torch._dynamo.reset()


def test_backend_reports_a_graph_it_leaves_to_aotautograd():
    torch._dynamo.reset()
    backend = qvg_compile.backend()
    fn = torch.compile(returns_cache, backend=backend)
    kb = qvg("key")
    for _ in range(2):
        out = fn(kb, torch.randn(1, CHUNK, H, D))
    assert out is kb
    reasons = [g.flat_inputs for g in backend.report.graphs if g.inputs_are_caches]
    assert reasons and all(r.startswith("the graph returns a cache") for r in reasons)
    assert "cache inputs unwrapped by AOTAutograd at every call" in backend.report.summary()
    torch._dynamo.reset()


def read(kview, vview, q):
    return torch.nn.functional.scaled_dot_product_attention(q, kview.transpose(1, 2), vview.transpose(1, 2))


def test_caches_of_symbolic_length_keep_aotautograds_unwrapping_and_compute_the_same():
    """Views of a growing length: Dynamo recompiles the second call with the length symbolic.
    That graph is left to AOTAutograd (a size symbol passed to the rebuilding module did not bind
    in Inductor's code on torch 2.13: not supported yet), reported, and every call equals eager."""
    torch._dynamo.reset()
    kb, vb = qvg("key"), qvg("value")
    for c in range(4):
        _, k, v = chunk(c)
        kb[:, c * CHUNK:(c + 1) * CHUNK] = k
        vb[:, c * CHUNK:(c + 1) * CHUNK] = v
    backend = qvg_compile.backend()
    fn = torch.compile(read, backend=backend)
    q = chunk(9)[0]
    for e in (CHUNK, 2 * CHUNK, 3 * CHUNK, 4 * CHUNK):
        torch.testing.assert_close(fn(kb[:, :e], vb[:, :e], q), read(kb[:, :e], vb[:, :e], q), rtol=0, atol=0)
    reasons = [g.flat_inputs for g in backend.report.graphs if g.inputs_are_caches]
    assert reasons[0] == "yes" and reasons[1:] and all(r.endswith("a cache of symbolic size") for r in reasons[1:])
    torch._dynamo.reset()
