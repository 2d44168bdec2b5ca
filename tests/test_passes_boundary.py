"""`appended_inputs` (idiom K): which input of a graph an output appends new tokens to, through
moves, batch repeats and RoPE arithmetic; and which it must not name."""

import torch

from graph_counting import traced_module
from qvg_compile.passes.boundary import Crossing, appended_inputs

H, D = 2, 16


def graph_of(fn, *args):
    return traced_module(fn, *args).graph


def names(crossings):
    return [(c.placeholder.name, c.seq_dim, c.rope) for c in crossings]


def rope_read(cache, k, cos, sin):
    full = torch.cat([cache.to(k.device).repeat(2, 1, 1, 1), k], dim=2).contiguous()
    rotated = torch.stack([-full[..., 1::2], full[..., ::2]], dim=-1).flatten(-2)
    return full.float() * cos + rotated * sin, k * 2


def test_cat_through_move_repeat_and_rope_names_the_cache():
    cache, k = torch.randn(1, H, 8, D), torch.randn(2, H, 4, D)
    cos, sin = torch.randn(12, D), torch.randn(12, D)
    graph = graph_of(rope_read, cache, k, cos, sin)
    assert names(appended_inputs(graph, 0)) == [("l_cache_", 2, True)]
    assert all(isinstance(c, Crossing) for c in appended_inputs(graph, 0))
    # The second output is the new chunk only; an index past the outputs names nothing.
    assert appended_inputs(graph, 1) == [] and appended_inputs(graph, 5) == []


def test_plain_cat_along_the_sequence_of_bshd():
    def f(cache, k):
        return torch.cat([cache, k], dim=1)

    graph = graph_of(f, torch.randn(1, 8, H, D), torch.randn(1, 4, H, D))
    assert names(appended_inputs(graph, 0)) == [("l_cache_", 1, False)]


def test_written_reshaped_and_non_float_inputs_are_not_named():
    def written(cache, k):
        cache[:, :, :4] = k
        return torch.cat([cache, k], dim=2)

    def reshaped(flat, k):
        return torch.cat([flat.view(1, H, -1, D), k], dim=2)

    def ints(tokens, k):
        return torch.cat([tokens, k], dim=2)

    k = torch.randn(1, H, 4, D)
    assert appended_inputs(graph_of(written, torch.zeros(1, H, 8, D), k), 0) == []
    assert appended_inputs(graph_of(reshaped, torch.zeros(1, H * 8 * D), k), 0) == []
    assert appended_inputs(graph_of(ints, torch.zeros(1, H, 8, D, dtype=torch.long), k.long()), 0) == []


def test_the_new_chunk_of_a_cat_is_not_history():
    def f(k, cache):
        return torch.cat([k, cache], dim=2)

    graph = graph_of(f, torch.randn(1, H, 4, D), torch.randn(1, H, 8, D))
    assert names(appended_inputs(graph, 0)) == [("l_k_", 2, False)]
