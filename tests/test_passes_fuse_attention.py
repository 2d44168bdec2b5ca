"""`passes.fuse_attention.fuse_matmul_softmax`: the exact hand-written attention chain becomes one SDPA
call with the same values; near misses are left as written."""

import torch

from qvg_compile.passes.readers import find_readers
from qvg_compile.passes.fuse_attention import fuse_matmul_softmax

D = 16


def rewritten(fn, *args, masks=True):
    """Dynamo graph of ``fn`` after the rewrite, what was done, and the graph's output."""
    out = {}

    def backend(gm, example_inputs):
        readers = find_readers(gm.graph)
        out["done"] = [fuse_matmul_softmax(gm.graph, r, masks=masks) for r in readers]
        gm.recompile()
        out["code"] = gm.code
        return gm

    torch._dynamo.reset()
    out["value"] = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return out


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, D, generator=g) for n in (4, 12, 12)]


def scaled_masked(q, k, v, mask):
    scores = (q @ k.transpose(-2, -1)) * D ** -0.5 + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def divided(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / D ** 0.5, dim=-1) @ v


def test_exact_chains_become_sdpa_with_the_same_values():
    mask = torch.randn(4, 12)
    for fn, args in ((scaled_masked, (*qkv(), mask)), (divided, qkv(1))):
        out = rewritten(fn, *args)
        assert out["done"][0] is not None and "scaled_dot_product_attention" in out["code"]
        assert "softmax" not in out["code"] and "matmul" not in out["code"]
        torch.testing.assert_close(out["value"], fn(*args), rtol=0, atol=1e-6)


def test_masked_chain_kept_when_masks_are_not_wanted():
    out = rewritten(scaled_masked, *qkv(), torch.randn(4, 12), masks=False)
    assert out["done"] == [None] and "softmax" in out["code"]


def test_near_misses_are_left_as_written():
    def mask_before_scale(q, k, v, mask):
        return torch.softmax((q @ k.transpose(-2, -1) + mask) * 0.25, dim=-1) @ v

    def probs_also_returned(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        return p @ v, p

    def other_dim(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-2) @ v

    for fn, args in ((mask_before_scale, (*qkv(), torch.randn(4, 12))), (probs_also_returned, qkv()),
                     (other_dim, (torch.randn(1, 2, 12, D), *qkv()[1:]))):
        out = rewritten(fn, *args)
        assert all(d is None for d in out["done"]), fn.__name__
        assert "scaled_dot_product_attention" not in out["code"]
