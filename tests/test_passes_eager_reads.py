"""passes/eager_reads: the cache reads of a compiler-disabled function, found on fake copies."""

import pytest
import torch
import torch.nn.functional as F

from qvg_compile.passes.eager_reads import EagerRead, observe_reads


def attend(q, k_new, v_new, cache, cache_txt):
    """Attention only inside this function: text repeated along the batch, history, new tokens."""
    text_k = cache["k_txt"].unsqueeze(1).expand(-1, 2, -1, -1, -1).flatten(0, 1)
    k = torch.cat([text_k, torch.cat([cache["k_vision"], k_new], 2)], 2)
    v = torch.cat([cache["v_txt"].repeat(2, 1, 1, 1), torch.cat([cache["v_vision"], v_new], 2)], 2)
    return F.scaled_dot_product_attention(q, k, v)


def test_reads_through_repeat_expand_and_nested_cat_are_found_with_roles():
    torch.manual_seed(0)
    cache = {"k_txt": torch.randn(1, 2, 4, 8), "v_txt": torch.randn(1, 2, 4, 8),
             "k_vision": torch.randn(2, 2, 6, 8), "v_vision": torch.randn(2, 2, 6, 8)}
    q, kn, vn = (torch.randn(2, 2, 3, 8) for _ in range(3))
    reads = observe_reads(attend, {"q": q, "k_new": kn, "v_new": vn, "cache": cache, "cache_txt": True})
    assert sorted(reads, key=lambda r: r.path) == [
        EagerRead(("cache", "k_txt"), 2, "key"), EagerRead(("cache", "k_vision"), 2, "key"),
        EagerRead(("cache", "v_txt"), 2, "value"), EagerRead(("cache", "v_vision"), 2, "value")]
    assert all(type(t) is torch.Tensor for t in cache.values())  # the real tensors are untouched


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="fn"):
        observe_reads(None, {})
    with pytest.raises(TypeError, match="args"):
        observe_reads(attend, [1])
