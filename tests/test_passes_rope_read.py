"""passes/rope_read.py: RoPE chains over a cache value (here: a ``cat`` appending to a graph
input, as idiom K's producing graph has before its swap) become ``qvg::rope`` whatever their
spelling (channel pairs by unflatten/stack, halves by chunk/cat), recognised by probing; chains
that compute something else, share an intermediate, or use tables varying per head are left as
written. The rewritten graph computes what the original does."""

import torch

from graph_counting import traced_module
from qvg_compile.passes.rope_read import rope_at_read


def _pairs(x, cos, sin):
    xf = x.float()
    p = xf.unflatten(-1, (-1, 2))
    rot = torch.stack([-p[..., 1], p[..., 0]], dim=-1).flatten(-2)
    return (xf * cos + rot * sin).to(x.dtype)


def _pairs_sized(x, cos, sin):
    """Pairs as einops' ``rearrange`` traces (LongCat-Video's own RoPE): reshapes that write every
    size out, the token count included."""
    xf = x.float()
    b, h, n, d = xf.shape
    p = xf.reshape(b, h, n, d // 2, 2)
    rot = torch.stack([-p[..., 1], p[..., 0]], dim=-1).reshape(b, h, n, d)
    return (xf * cos + rot * sin).to(x.dtype)


def _halves(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


def _not_rope(x, cos, sin):
    return x * cos + x.flip(-1) * sin


def _inputs(heads_table=False):
    gen = torch.Generator().manual_seed(0)
    cache, new = torch.randn(1, 2, 6, 8, generator=gen), torch.randn(1, 2, 3, 8, generator=gen)
    shape = (2, 9, 8) if heads_table else (9, 8)
    return cache, new, torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)


def _rewrite(rope, *, extra_use=False, heads_table=False, symbolic=False):
    def fn(cache, new, cos, sin):
        full = torch.cat([cache, new], dim=2).contiguous()
        out = rope(full, cos, sin)
        return (out, full.float() * 2) if extra_use else out

    args = _inputs(heads_table)
    if symbolic:
        # Token counts as size symbols, as in a graph compiled again for a growing history.
        for t in args:
            torch._dynamo.mark_dynamic(t, 2 if t.dim() == 4 else 0)
    gm = traced_module(fn, *args)
    args = _graph_inputs(gm, args)
    want = gm(*args)
    done, _ = rope_at_read(gm.graph)
    gm.recompile()
    got = gm(*args)
    assert len(got) == len(want) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    return done, torch.ops.qvg.rope.default in ops, [n.args[3:] for n in gm.graph.nodes
                                                     if n.target is torch.ops.qvg.rope.default]


def _graph_inputs(gm, tensors):
    """The graph's inputs: ``tensors`` with the values of the size symbols Dynamo lifted as inputs."""
    it = iter(tensors)
    values = []
    for node in gm.graph.find_nodes(op="placeholder"):
        example = node.meta.get("example_value")
        values.append(example.node.hint if isinstance(example, torch.SymInt) else next(it))
    return values


def test_pairs_and_halves_spellings_become_one_rope_op():
    done, rewritten, specs = _rewrite(_pairs)
    assert rewritten and len(done) == 1 and specs == [("pairs", "float32")]
    done, rewritten, specs = _rewrite(_halves)
    assert rewritten and specs == [("halves", "float32")]


def test_a_rope_spelled_by_reshapes_that_write_the_sizes_out_becomes_one_rope_op():
    for symbolic in (False, True):
        done, rewritten, specs = _rewrite(_pairs_sized, symbolic=symbolic)
        assert rewritten and len(done) == 1 and specs == [("pairs", "float32")], symbolic


def test_other_chains_are_left_as_written():
    assert not _rewrite(_not_rope)[1]
    # An intermediate also read outside the chain: the cache would still be computed on.
    assert not _rewrite(_pairs, extra_use=True)[1]
    # Tables that differ per head are not per-token tables.
    assert not _rewrite(_pairs, heads_table=True)[1]


def test_graphs_without_a_cache_value_are_untouched():
    def fn(x, cos, sin):
        return _pairs(x, cos, sin)

    gm = traced_module(fn, torch.randn(1, 2, 9, 8), torch.randn(9, 8), torch.randn(9, 8))
    assert rope_at_read(gm.graph) == ([], [])
